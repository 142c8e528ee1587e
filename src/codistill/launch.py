"""Run one training job: standalone (spawning local workers) or as one torchrun process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import CheckpointError, read_latest, verify_entry
from .config import Config, check_world_size, dump_yaml, load_config, replace, to_dict
from .distributed import init_distributed, shutdown, spawn, torchrun_world_size, under_torchrun
from .errors import UserError
from .prelaunch import warn_before_launch
from .preflight import check_data, preflight  # noqa: F401  (check_data: imported from here by callers)
from .run_log import atomic_write_text, prepare_run_dir
from .trainer import Trainer, run_worker


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


def resume_config(run_dir: str | Path, nproc: int | None = None) -> tuple[Config, int]:
    """The resolved config and world size of a run to resume, with its checkpoint verified.
    nproc: resume with this many workers instead of the checkpoint's (`resize_for_resume`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"cannot resume {run_dir}: " + ("not a directory" if run_dir.exists() else "no such directory"))
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot resume {run_dir}: no config.yaml (not a codistill run directory?)")
    manifest = read_latest(run_dir)
    if manifest is None:
        raise UserError(f"cannot resume {run_dir}: it has no checkpoint yet")
    cfg, world = load_config(run_dir / "config.yaml"), manifest["world_size"]
    edited = config_edits(run_dir, cfg)
    if edited:
        raise UserError(f"cannot resume {run_dir}: its config.yaml was edited after the run started ({edited}); "
                        "a resumed run keeps its own config: undo the edit, or start a new run")
    check_world_size(cfg, world)
    if nproc not in (None, world) and cfg.train.parallel != "fsdp":
        raise UserError(f"cannot resume {run_dir} with --nproc {nproc}: it was trained by {world} workers with "
                        "train.parallel=ddp, whose checkpoint is per worker; only sharded runs "
                        "(train.parallel=fsdp) resume at another number of workers")
    for name in manifest["sha256"]:  # verify every file here: one clear error before any worker starts
        verify_entry(run_dir, manifest, name)
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
    if cfg.train.parallel == "fsdp":
        return resize_for_resume(cfg, run_dir, manifest, nproc or world)
    return cfg, world


def resize_for_resume(cfg: Config, run_dir: Path, manifest: dict, world: int) -> tuple[Config, int]:
    """A sharded run resumed by `world` workers: each worker's batch is the checkpoint's model batch
    over the new number of workers per model (and accumulation), so every optimizer step sees the
    same examples as before and the run continues exactly (up to reduction order); an error when
    the model batch does not divide. Also right for a run resized before: config.yaml keeps the
    batch it started with, the checkpoint the model batch."""
    from .checkpoint import load_entry

    replicas = check_world_size(cfg, world)
    model_batch = load_entry(run_dir, manifest, "rank_0.pt")["model_batch"]
    per_worker, left = divmod(model_batch, replicas * cfg.train.accumulate)
    if left or not per_worker:
        raise UserError(f"cannot resume {run_dir} with {world} workers: its model batch of {model_batch} "
                        f"examples does not split into {replicas} worker(s) per model x train.accumulate="
                        f"{cfg.train.accumulate}; use a number of workers per model that divides it")
    return replace(cfg, data__batch_size=per_worker), world


def config_edits(run_dir: Path, cfg: Config) -> str:
    """The settings of config.yaml that differ from the config the run started with (recorded in
    its marker), as `key: old -> new`; empty when none do or the run has no marker."""
    from .run_log import read_run_marker

    started = (read_run_marker(run_dir) or {}).get("config")
    if not isinstance(started, dict):
        return ""
    now = json.loads(json.dumps(to_dict(cfg)))
    changes = [f"{section}.{key}: {old!r} -> {now.get(section, {}).get(key)!r}"
               for section, fields in started.items() if isinstance(fields, dict)
               for key, old in fields.items() if now.get(section, {}).get(key) != old]
    return "; ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def train(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None,
          resume: bool = False, warn: bool = False) -> dict:
    """Train one run into `out` (or continue it from its last checkpoint with `resume`); returns
    its summary (on every worker under torchrun). `warn`: print the pre-launch warnings
    (prelaunch.py) once the config has passed every check."""
    if under_torchrun():
        return _train_torchrun(cfg, Path(out), overwrite, resume, warn)
    world = nproc if nproc is not None else cfg.dist.nproc
    preflight(cfg, world, out, overwrite, resume)
    if resume:
        run_dir = Path(out)
        check_resume(cfg, run_dir)
    else:
        run_dir = prepare_run_dir(out, overwrite, config=to_dict(cfg))
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        prepare_task(cfg, run_dir)
    if warn:  # after every check: a warning never comes with an error
        warn_before_launch([cfg], world)
    spawn(run_worker, world, run_dir, args=(cfg, str(run_dir), resume), threads=cfg.dist.threads,
          timeout_s=cfg.dist.timeout_s)
    return json.loads((run_dir / "summary.json").read_text())


def _train_torchrun(cfg: Config, out: Path, overwrite: bool, resume: bool, warn: bool) -> dict:
    # torchrun --max-restarts restarts every worker after a failure: continue from the checkpoint.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not resume:
        resume = read_latest(out) is not None
        overwrite = overwrite or not resume  # our own first attempt left the directory behind
    # Every process, before any of them waits for the others; the one that prepares the directory
    # checks it too (the others may not see it).
    first = os.environ.get("RANK") == "0" and not resume
    preflight(cfg, torchrun_world_size(), out if first else None, overwrite, resume)
    if resume:
        check_resume(cfg, out)
    d = cfg.dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s)
    try:
        # Rank 0 prepares the directory; everyone learns whether that worked before going on.
        error = [None]
        if ctx.rank == 0 and not resume:
            try:
                prepare_run_dir(out, overwrite, config=to_dict(cfg))
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
