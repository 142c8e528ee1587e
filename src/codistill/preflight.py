"""Everything checked before a run directory is touched or a worker starts: one entry point.

`preflight` runs in the main process (in every process under torchrun) before any deletion or
creation; a failure is one `UserError` line and nothing on disk has changed. In order:

1. torchrun's store (a leftover environment fails in seconds), the config against the world
   size, the fault spec, the backend;
2. every setting that names a path (`config.path_fields()`): the kind of thing it names, places
   nothing can be written (/proc, /sys, /dev), write permission, and not inside the run directory
   that `--overwrite` is about to delete;
3. the models against the task (an image model on text data);
4. the run directory itself (`run_log.check_run_dir`: `--overwrite` only of a marked run);
5. the data and everything read from caches (the task's `check`).

A new check belongs here, in this order; a new kind of path (a URL scheme, say) in `check_path`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import Config, check_world_size, path_fields
from .errors import ConfigError

PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
"""Kernel views, not storage: no data is read from there and nothing codistill writes belongs there."""
ORDINARY_UNDER_DEV = (Path("/dev/shm"),)  # tmpfs: a fine place for data or an exchange directory
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def preflight(cfg: Config, world_size: int, out: str | Path | None = None, overwrite: bool = False,
              resume: bool = False) -> None:
    """Raise a UserError on anything that would fail (or do damage) later. `out`: the run directory
    about to be prepared (None when another process prepares it); `resume`: it is continued, not
    replaced."""
    from .distributed import check_rendezvous, resolve_backend
    from .faults import parse_fault
    from .run_log import check_run_dir, doomed_run_dir
    from .tasks import check_names  # the registries: filled above config.py, so checked here

    check_rendezvous()  # first: a leftover torchrun environment fails in seconds, not after a timeout
    check_names(cfg)
    check_world_size(cfg, world_size)
    parse_fault(os.environ.get("CODISTILL_FAULT"))
    resolve_backend(cfg.dist.backend)
    check_paths(cfg, None if resume else doomed_run_dir(out, overwrite))
    check_models(cfg)
    if out is not None and not resume:
        check_path("--out", str(out), "output")  # the run directory is a path like any other
        check_run_dir(out, overwrite)
    check_data(cfg, world_size)


def check_paths(cfg: Config, doomed: Path | None = None) -> None:
    """Every path-valued setting that is set; `doomed`: the (resolved) directory --overwrite deletes."""
    for key, kind in path_fields().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            check_path(key, value, kind, doomed)
    if cfg.codistill.exchange == "storage":  # a URL's bucket and credentials (exchange_store.py)
        from .exchange_store import check_exchange_dir

        check_exchange_dir(cfg.codistill.exchange_dir)


def check_path(key: str, value: str, kind: str, doomed: Path | None = None) -> None:
    """One setting naming a path of `kind` (`input`: read, must be a file or directory if it exists;
    `output`: a directory codistill creates and writes; `location`: the same, or a URL, whose storage
    exchange_store.check_exchange_dir checks where it is used)."""
    if not value.strip():
        raise ConfigError(f"{key} is empty; give a path, or null for the default")
    if "\0" in value:
        raise ConfigError(f"{key} holds a NUL character")
    if URL.match(value):
        if kind == "location":
            return
        raise ConfigError(f"{key}={value}: URLs are not supported here; give a local path")
    if kind == "location":  # its reader expands '~' (exchange_store.Store)
        from .exchange_store import half_url

        scheme = half_url(value)
        if scheme is not None:
            raise ConfigError(f"{key}={value} looks like a URL missing '//' (write {scheme}://...); a local path "
                              f"would create a directory named '{scheme}:'")
        value, kind = str(Path(value).expanduser()), "output"
    elif value.startswith("~"):
        raise ConfigError(f"{key}={value}: '~' is not expanded here (only an unquoted shell argument is); "
                          "write the full path")
    path = Path(value)
    real = Path(os.path.realpath(path))
    pseudo = next((fs for fs in PSEUDO_FILESYSTEMS if real == fs or fs in real.parents), None)
    if pseudo is not None and not any(real == ok or ok in real.parents for ok in ORDINARY_UNDER_DEV):
        what = "data is read" if kind == "input" else "codistill writes files"
        raise ConfigError(f"{key}={value} is under {pseudo}, a kernel pseudo-filesystem, not a place where {what}")
    if doomed is not None and (real == doomed or doomed in real.parents):
        raise ConfigError(f"{key}={value} lies inside the run directory {doomed} that --overwrite would delete; "
                          "move it or choose another --out")
    if kind == "input":
        if path.exists() and not (path.is_dir() or path.is_file()):
            raise ConfigError(f"{key}={value} is neither a directory nor a regular file")
        return
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}={value} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: no write permission in that directory")
        return
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={value} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value} cannot be created: no write permission in {existing}")


def check_models(cfg: Config) -> None:
    """Every model reads what the dataset's task gives it (no image model on text)."""
    from .models import check_model_kind
    from .tasks import task_class

    kind = getattr(task_class(cfg), "model_kind", None)  # optional for a plug-in task
    if kind is not None:
        check_model_kind(cfg.model_names(), kind, cfg.data.name)


def check_data(cfg: Config, world_size: int) -> None:
    """Open the dataset once before starting workers, so a missing file, splits that disagree, a
    batch larger than the data, a damaged cache or a model option the model cannot take is one clear
    error (and an existing run directory is not touched). What to check is the task's (`Task.check`)."""
    from .tasks import steps_per_epoch, task_class

    task_class(cfg).check(cfg, world_size)
    if cfg.train.accumulate > 1:  # an epoch must hold one optimizer step's micro-batches
        steps_per_epoch(cfg, world_size)
