"""Run a function in N local gloo processes: file rendezvous in a temp dir (no ports), a hard
timeout, and results passed back as tensors saved per rank (loaded with weights_only=True).

The workers are forked from a fork server that imported torch and codistill once for the whole
test session: a spawned worker spends ~5 CPU-seconds importing them, which was a large share of
the suite on 2 cores. Each worker still starts clean of the test process's state (the server never
runs a test) and takes the caller's environment as spawn would (see _entry)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from codistill.distributed import FORKSERVER_PRELOAD, exit_skipping_teardown


def _entry(rank: int, fn, world_size: int, tmp: str, args: tuple, environ: dict) -> None:
    import torch.distributed as dist

    os.environ.clear()  # the server's environment is the one it started with: take the caller's now
    os.environ.update(environ)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, f"{tmp}/result_{rank}.pt")
    finally:
        dist.destroy_process_group()
    # As the product's own workers do: the result is saved, and gloo's threads must not turn a
    # finished worker into a SIGABRT while Python finalizes (seen in CI).
    exit_skipping_teardown(0)


def run_workers(fn, world_size: int, tmp_path: Path, args: tuple = (), timeout: float = 240.0) -> list:
    """fn(rank, world_size, *args) in `world_size` processes; returns each rank's return value."""
    tmp = Path(tmp_path) / f"mp_{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)  # the server codistill.spawn uses too
    ctx = mp.start_processes(_entry, args=(fn, world_size, str(tmp), args, dict(os.environ)),
                             nprocs=world_size, start_method="forkserver", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"workers did not finish within {timeout} s")
    return [torch.load(tmp / f"result_{r}.pt", weights_only=True) for r in range(world_size)]


def digits_config(**overrides):
    """A tiny, fast config on scikit-learn's digits; `section__key=value` overrides."""
    from codistill.config import load_config, replace

    cfg = load_config(None, [
        "data.name=digits", "data.batch_size=16", "data.val_fraction=0.1", "model.name=cnn_tiny",
        "schedule.name=constant", "schedule.warmup_epochs=0", "schedule.milestones=[]",
        "optim.lr=0.05", "optim.weight_decay=0.0005", "schedule.scale_lr=false",
        "train.progress=false", "train.log_every=2", "dist.threads=1",
        # The mechanics tests distill from step 0 (the paper's constant alpha); the default burn-in
        # has its own tests (test_prelaunch.py).
        "codistill.alpha_schedule=constant", "codistill.alpha_steps=0",
    ])
    return replace(cfg, **overrides) if overrides else cfg
