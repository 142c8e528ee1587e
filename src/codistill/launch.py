"""Run one training job: standalone (spawning local workers) or as one torchrun process."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from .config import Config, check_world_size, dump_yaml
from .distributed import init_distributed, shutdown, spawn, torchrun_world_size, under_torchrun
from .errors import UserError
from .run_log import atomic_write_text, prepare_run_dir
from .trainer import Trainer, run_worker


def check_data(cfg: Config) -> None:
    """Open the dataset once before starting workers, so a missing file is one clear error."""
    from .data import load_dataset

    load_dataset(cfg.data.name, cfg.data.root)


def prepare_task(cfg: Config, run_dir: Path) -> None:
    from .tasks import task_class

    task_class(cfg).prepare(cfg, run_dir)


def train(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None) -> dict:
    """Train one run into `out`; returns its summary (on the first worker under torchrun)."""
    if under_torchrun():
        return _train_torchrun(cfg, Path(out), overwrite)
    world = nproc if nproc is not None else cfg.dist.nproc
    check_world_size(cfg, world)
    check_data(cfg)
    run_dir = prepare_run_dir(out, overwrite)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    prepare_task(cfg, run_dir)
    spawn(run_worker, world, run_dir, args=(cfg, str(run_dir)), threads=cfg.dist.threads)
    return json.loads((run_dir / "summary.json").read_text())


def _train_torchrun(cfg: Config, out: Path, overwrite: bool) -> dict:
    check_world_size(cfg, torchrun_world_size())
    d = cfg.dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s)
    try:
        # Rank 0 prepares the directory; everyone learns whether that worked before going on.
        error = [None]
        if ctx.rank == 0:
            try:
                check_data(cfg)
                prepare_run_dir(out, overwrite)
                atomic_write_text(out / "config.yaml", dump_yaml(cfg))
                prepare_task(cfg, out)
            except UserError as e:
                error[0] = str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise UserError(error[0]) if ctx.rank == 0 else SystemExit(2)
        return Trainer(cfg, ctx, out).fit()
    finally:
        shutdown()
