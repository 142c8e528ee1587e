"""Run directory files: metrics.jsonl (and the trackers: TensorBoard, MLflow, wandb), config.yaml, summary.json.

Only the first rank of each model group logs; on other ranks `RunLog(None)` is a no-op by design.
Every metrics line is flushed as written, so a crash loses nothing already logged. Whole files
(config, summary) are written atomically: a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .trackers import numbers, open_trackers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes files 0600


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


RUN_MARKERS = ("summary.json", "compare.json", "checkpoints/latest.json")


def is_run_dir(path: Path) -> bool:
    """Recognizably made by codistill: a summary, a comparison, checkpoints, or the resolved
    config.yaml (all sections) that every run writes first."""
    if any((path / name).exists() for name in RUN_MARKERS):
        return True
    try:
        import yaml

        tree = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and {"data", "model", "codistill", "optim", "train", "dist"} <= tree.keys()


def check_run_dir(path: str | Path, overwrite: bool = False) -> None:
    """Everything prepare_run_dir would refuse, checked without touching anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} exists and is not a directory")
    existing = next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():  # mkdir would fail with "Not a directory"
        raise UserError(f"run directory {path} cannot be created: {existing} is a file, not a directory")
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run directory {path} cannot be created: no write permission in {existing}")
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not overwrite:
        raise UserError(f"run directory {path} already exists and is not empty; "
                        "pass --overwrite to replace it or choose another --out")
    real, cwd = path.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve() or real == Path(real.anchor):
        raise UserError(f"--overwrite refuses to delete {path}: it is the current directory, one of its "
                        "parents or the home directory; choose another --out")
    if not is_run_dir(path):
        raise UserError(f"--overwrite refuses to delete {path}: it does not look like a codistill run "
                        "(no config.yaml, summary.json, compare.json or checkpoints); choose another --out")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"--overwrite cannot replace {path}: no write permission in {path.parent}")


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the run directory; replace a non-empty one only with `overwrite`, and only when it is
    an earlier codistill run (never the current directory, a parent of it or the home directory)."""
    path = Path(path)
    check_run_dir(path, overwrite)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {path}: {e.strerror}") from None
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLog:
    """metrics.jsonl plus the run's trackers (trackers.py; TensorBoard by default) in `directory`;
    a no-op when `directory` is None.

    `resumed_at`: the step of the checkpoint a resumed run starts from. TensorBoard then hides what
    the interrupted run logged after it (its events stay in the old file; readers purge them), as
    the trainer does for metrics.jsonl; MLflow and wandb continue the same run.
    """

    def __init__(self, directory: str | Path | None, tensorboard: bool = True, resumed_at: int | None = None,
                 trackers: list[str] | None = None, run_dir: str | Path | None = None, config: dict | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._file = None
        self._trackers = []
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self.directory / "metrics.jsonl", "a")
        names = trackers if trackers is not None else (["tensorboard"] if tensorboard else [])
        run_dir = Path(run_dir) if run_dir is not None else self.directory.parent
        self._trackers = open_trackers(names, self.directory, run_dir=run_dir,
                                       run_name=f"{run_dir.name}/{self.directory.name}", config=config or {},
                                       resumed_at=resumed_at)

    def log(self, step: int, metrics: dict) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = numbers(metrics)
        for tracker in self._trackers:
            tracker.log(step, values)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
