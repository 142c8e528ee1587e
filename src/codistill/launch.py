"""Run one training job: standalone (spawning local workers) or as one torchrun process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import CheckpointError, load_entry, read_latest
from .config import Config, check_world_size, dump_yaml, load_config
from .distributed import check_rendezvous, init_distributed, resolve_backend, shutdown, spawn, torchrun_world_size, under_torchrun
from .errors import UserError
from .faults import parse_fault
from .prelaunch import warn_before_launch
from .run_log import atomic_write_text, prepare_run_dir
from .trainer import Trainer, run_worker


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be checked without training, in the main process, before any run
    directory is touched or any worker starts: torchrun's store, world size, fault spec, backend,
    data, model."""
    check_rendezvous()  # first: a leftover torchrun environment fails in seconds, not after a timeout
    check_world_size(cfg, world_size)
    parse_fault(os.environ.get("CODISTILL_FAULT"))
    resolve_backend(cfg.dist.backend)
    if cfg.codistill.exchange == "storage":  # a path or URL the exchange can use (exchange_store.py)
        from .exchange_store import check_exchange_dir

        check_exchange_dir(cfg.codistill.exchange_dir)
    check_data(cfg, world_size)


def check_data(cfg: Config, world_size: int) -> None:
    """Open the dataset once before starting workers, so a missing file, splits that disagree, a
    batch larger than the data or a model option the model cannot take is one clear error (and an
    existing run directory is not touched). What to check is the task's (`Task.check`)."""
    from .tasks import steps_per_epoch, task_class

    task_class(cfg).check(cfg, world_size)
    if cfg.train.accumulate > 1:  # an epoch must hold one optimizer step's micro-batches
        steps_per_epoch(cfg, world_size)


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Before a resume: a task that keeps what it derived from the data in the run directory (the
    LM's tokenizer and token checksums) checks that the data still gives the same."""
    from .tasks import task_class

    check = getattr(task_class(cfg), "check_resume", None)
    if check is not None:
        check(cfg, run_dir)


def prepare_task(cfg: Config, run_dir: Path) -> None:
    from .tasks import task_class
    from .trackers import prepare_trackers

    task_class(cfg).prepare(cfg, run_dir)
    prepare_trackers(cfg.train.trackers, run_dir)  # e.g. the MLflow experiment, before workers race to make it


def resume_config(run_dir: str | Path) -> tuple[Config, int]:
    """The resolved config and world size of a run to resume, with its checkpoint verified."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"cannot resume {run_dir}: " + ("not a directory" if run_dir.exists() else "no such directory"))
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot resume {run_dir}: no config.yaml (not a codistill run directory?)")
    manifest = read_latest(run_dir)
    if manifest is None:
        raise UserError(f"cannot resume {run_dir}: it has no checkpoint yet")
    cfg, world = load_config(run_dir / "config.yaml"), manifest["world_size"]
    check_world_size(cfg, world)
    for name in manifest["sha256"]:  # verify every file here: one clear error before any worker starts
        load_entry(run_dir, manifest, name)
    expected = {f"rank_{r}.pt" for r in range(world)}
    ranks = {name for name in manifest["sha256"] if name.startswith("rank_")}
    if ranks != expected:
        raise CheckpointError(f"cannot resume {run_dir}: its manifest says world_size {world} but the checkpoint "
                              f"holds {len(ranks)} rank file(s) ({', '.join(sorted(ranks)) or 'none'})")
    # Last: a damaged checkpoint of a finished run is reported as such.
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            done = json.loads(summary.read_text()).get("steps")
        except (ValueError, AttributeError):
            done = None
        if done == manifest["step"]:
            raise UserError(f"run {run_dir} is already complete ({done} steps); nothing to resume, nothing changed")
    return cfg, world


def train(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None,
          resume: bool = False, warn: bool = False) -> dict:
    """Train one run into `out` (or continue it from its last checkpoint with `resume`); returns
    its summary (on every worker under torchrun). `warn`: print the pre-launch warnings
    (prelaunch.py) once the config has passed every check."""
    if under_torchrun():
        return _train_torchrun(cfg, Path(out), overwrite, resume, warn)
    world = nproc if nproc is not None else cfg.dist.nproc
    preflight(cfg, world)
    if resume:
        run_dir = Path(out)
        check_resume(cfg, run_dir)
    else:
        run_dir = prepare_run_dir(out, overwrite)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        prepare_task(cfg, run_dir)
    if warn:  # after every check: a warning never comes with an error
        warn_before_launch([cfg], world)
    spawn(run_worker, world, run_dir, args=(cfg, str(run_dir), resume), threads=cfg.dist.threads,
          timeout_s=cfg.dist.timeout_s)
    return json.loads((run_dir / "summary.json").read_text())


def _train_torchrun(cfg: Config, out: Path, overwrite: bool, resume: bool, warn: bool) -> dict:
    preflight(cfg, torchrun_world_size())  # every process, before any of them waits for the others
    # torchrun --max-restarts restarts every worker after a failure: continue from the checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not resume:
        resume = read_latest(out) is not None
        overwrite = overwrite or not resume  # our own first attempt left the directory behind
    if resume:
        check_resume(cfg, out)
    d = cfg.dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s)
    try:
        # Rank 0 prepares the directory; everyone learns whether that worked before going on.
        error = [None]
        if ctx.rank == 0 and not resume:
            try:
                prepare_run_dir(out, overwrite)
                atomic_write_text(out / "config.yaml", dump_yaml(cfg))
                prepare_task(cfg, out)
            except UserError as e:
                error[0] = str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0]) if ctx.rank == 0 else SystemExit(2)
        if warn and ctx.rank == 0:
            warn_before_launch([cfg], ctx.world_size)
        return Trainer(cfg, ctx, out, resume=resume).fit()
    finally:
        shutdown()
