"""Several short training runs on W local workers, started once.

Starting W processes costs far more than a short run on a 2-core machine (each imports torch), so
the benchmarks that need several small real runs at one world size start the workers once and
run the library's `Trainer` on each config in turn, each into its own run directory (config.yaml,
summary.json, metrics.jsonl: the same files `codistill train` writes). Workers meet through a
rendezvous file (`codistill.distributed.spawn`), over loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, dump_yaml
from ..run_log import atomic_write_text, prepare_run_dir


def _worker(rank: int, world_size: int, init_method: str, runs: list[tuple[str, Config]], out: str) -> None:
    from ..distributed import init_distributed, shutdown
    from ..trainer import Trainer

    d = runs[0][1].dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s, init_method=init_method, rank=rank,
                           world_size=world_size)
    try:
        for name, cfg in runs:
            Trainer(cfg, ctx, Path(out) / name).fit()
    finally:
        shutdown()


def run_local(runs: list[tuple[str, Config]], world_size: int, out: Path) -> dict[str, dict]:
    """Train each (name, config) in turn on `world_size` local workers; returns summaries by name."""
    from ..distributed import spawn

    out = Path(out).resolve()  # absolute: the spawned workers and the summaries name the same directories
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in runs:
        run_dir = prepare_run_dir(out / name, overwrite=True)
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    spawn(_worker, world_size, out, args=(runs, str(out)), threads=runs[0][1].dist.threads)
    return {name: json.loads((out / name / "summary.json").read_text()) for name, _ in runs}
