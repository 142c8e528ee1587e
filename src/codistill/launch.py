"""Run one training job: standalone (spawning local workers) or as one torchrun process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import load_entry, read_latest
from .config import Config, check_world_size, dump_yaml, load_config
from .distributed import init_distributed, shutdown, spawn, torchrun_world_size, under_torchrun
from .errors import UserError
from .faults import parse_fault
from .run_log import atomic_write_text, prepare_run_dir
from .trainer import Trainer, run_worker


def check_data(cfg: Config, world_size: int) -> None:
    """Open the dataset once before starting workers, so a missing file or a batch larger than the
    data is one clear error (and an existing run directory is not touched)."""
    from .data import load_dataset
    from .tasks import ClassificationTask, steps_per_epoch, task_class

    if task_class(cfg) is ClassificationTask or getattr(task_class(cfg), "sized_without_run_dir", False):
        steps_per_epoch(cfg, world_size)  # loads the data once (LM: builds its token cache)
    else:  # translation needs its tokenizer before it can batch: only check the files here
        load_dataset(cfg.data.name, cfg.data.root)


def prepare_task(cfg: Config, run_dir: Path) -> None:
    from .tasks import task_class

    task_class(cfg).prepare(cfg, run_dir)


def resume_config(run_dir: str | Path) -> tuple[Config, int]:
    """The resolved config and world size of a run to resume."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot resume {run_dir}: no config.yaml (not a codistill run directory?)")
    manifest = read_latest(run_dir)
    if manifest is None:
        raise UserError(f"cannot resume {run_dir}: it has no checkpoint yet")
    for name in manifest["sha256"]:  # verify every file here: one clear error before any worker starts
        load_entry(run_dir, manifest, name)
    return load_config(run_dir / "config.yaml"), int(manifest["world_size"])


def train(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None,
          resume: bool = False) -> dict:
    """Train one run into `out` (or continue it from its last checkpoint with `resume`); returns
    its summary (on every worker under torchrun)."""
    if under_torchrun():
        return _train_torchrun(cfg, Path(out), overwrite, resume)
    world = nproc if nproc is not None else cfg.dist.nproc
    check_world_size(cfg, world)
    parse_fault(os.environ.get("CODISTILL_FAULT"))
    check_data(cfg, world)
    if resume:
        run_dir = Path(out)
    else:
        run_dir = prepare_run_dir(out, overwrite)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        prepare_task(cfg, run_dir)
    spawn(run_worker, world, run_dir, args=(cfg, str(run_dir), resume), threads=cfg.dist.threads)
    return json.loads((run_dir / "summary.json").read_text())


def _train_torchrun(cfg: Config, out: Path, overwrite: bool, resume: bool) -> dict:
    check_world_size(cfg, torchrun_world_size())
    # torchrun --max-restarts restarts every worker after a failure: continue from the checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not resume:
        resume = read_latest(out) is not None
        overwrite = overwrite or not resume  # our own first attempt left the directory behind
    d = cfg.dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s)
    try:
        # Rank 0 prepares the directory; everyone learns whether that worked before going on.
        error = [None]
        if ctx.rank == 0 and not resume:
            try:
                check_data(cfg, ctx.world_size)
                prepare_run_dir(out, overwrite)
                atomic_write_text(out / "config.yaml", dump_yaml(cfg))
                prepare_task(cfg, out)
            except UserError as e:
                error[0] = str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0]) if ctx.rank == 0 else SystemExit(2)
        return Trainer(cfg, ctx, out, resume=resume).fit()
    finally:
        shutdown()
