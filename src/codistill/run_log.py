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
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text
from .trackers import numbers, open_trackers


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


RUN_MARKER = "codistill_run.json"
"""Written atomically the moment codistill creates a run (or comparison) directory, and by nothing
else: the only thing that lets `--overwrite` delete a directory."""
MARKER_FORMAT = "codistill run"
MARKER_VERSION = 1


def write_run_marker(path: Path, config: dict | None = None) -> None:
    """The run's identity: a random id, where it was created, when, by which codistill, with which
    resolved config (so a resume can tell that config.yaml was edited since)."""
    import time
    import uuid

    from .version import __version__

    write_json(path / RUN_MARKER, {
        "format": MARKER_FORMAT, "version": MARKER_VERSION, "run_id": uuid.uuid4().hex,
        "directory": str(path.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "codistill": __version__, "config": config})


def read_run_marker(path: Path) -> dict | None:
    """The marker of the run in `path`, or None when it has none or it is not one of ours."""
    try:
        marker = json.loads((path / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT
          and isinstance(marker.get("version"), int) and isinstance(marker.get("directory"), str))
    return marker if ok else None


def not_a_run(path: Path) -> str | None:
    """Why `path` is not a codistill run that --overwrite may delete, or None when it is one.

    Only the marker counts. Names a run leaves (summary.json, config.yaml, checkpoints/) are written
    by other tools too, and a directory that merely holds them is refused, runs made before codistill
    wrote markers included: deleting somebody's files is worse than asking them to delete an old run
    by hand. A marker naming another directory means a copied or moved run, perhaps into a folder of
    the user's own, and is refused too."""
    if not (path / RUN_MARKER).exists():
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        return (f"it holds {shown} but no {RUN_MARKER}, which codistill writes into every run it creates "
                "(not a codistill run, or one made before markers: delete it yourself)")
    marker = read_run_marker(path)
    if marker is None:
        return f"its {RUN_MARKER} is not a codistill run marker"
    if marker["version"] > MARKER_VERSION:
        return f"its {RUN_MARKER} is of a newer codistill (marker version {marker['version']})"
    if Path(marker["directory"]) != path.resolve():
        return (f"its {RUN_MARKER} belongs to the run created in {marker['directory']} "
                "(copied or moved here?)")
    return None


def check_run_dir(path: str | Path, overwrite: bool = False) -> None:
    """Everything prepare_run_dir would refuse, checked without touching anything."""
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            raise UserError(f"run directory {path} is a symbolic link to {target}, which does not exist")
        if overwrite:
            raise UserError(f"--overwrite refuses to replace {path}: it is a symbolic link (to {target}); "
                            "give the directory itself as --out")
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
    reason = not_a_run(path)
    if reason is not None:
        raise UserError(f"--overwrite refuses to delete {path}: {reason}; choose another --out")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"--overwrite cannot replace {path}: no write permission in {path.parent}")


def doomed_run_dir(path: str | Path | None, overwrite: bool) -> Path | None:
    """The directory that preparing `path` would delete (resolved), or None (nothing there, or
    something check_run_dir refuses to delete anyway)."""
    if path is None or not overwrite:
        return None
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or not any(path.iterdir()) or not_a_run(path) is not None:
        return None
    return path.resolve()


def prepare_run_dir(path: str | Path, overwrite: bool = False, config: dict | None = None) -> Path:
    """Create the run directory with its marker; replace a non-empty one only with `overwrite`, and
    only when its marker says it is a codistill run created right there (never the current
    directory, a parent of it or the home directory). `config`: the resolved config, for the marker."""
    path = Path(path)
    check_run_dir(path, overwrite)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {path}: {e.strerror}") from None
    write_run_marker(path, config)
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
        # A resumed run replays the steps the interrupted run logged after its checkpoint (bitwise, at
        # the same k). metrics.jsonl and TensorBoard drop the first copy; MLflow and wandb keep every
        # point they are sent, so they are not sent the replay: the last step they got is kept here.
        self._sent = self.directory / "trackers_last_step"
        kept = resumed_at is not None and self._sent.is_file()
        self._replayed_through = int(self._sent.read_text()) if kept else -1

    def log(self, step: int, metrics: dict) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = numbers(metrics)
        replay = step <= self._replayed_through
        for tracker in self._trackers:
            if not (replay and tracker.keeps_every_point):
                tracker.log(step, values)
        if not replay and any(t.keeps_every_point for t in self._trackers):
            atomic_write_text(self._sent, f"{step}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
