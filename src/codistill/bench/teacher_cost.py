"""Teacher cost: a codistillation step's time over an all-reduce step's compute, per teacher setting.

    ratio = t(optimizer step of a codistillation worker, n = 2, one teacher, setting s)
            / t(optimizer step of an all-reduce worker: its own model only)

Both are the library's `Trainer.train_step` on one fixed batch of the same per-worker size, in one
process with one intra-op thread and no link (a single-process gloo group: no DDP, no exchange
inside the timed steps; the exchange is `bench bytes` / `bench stall`). The settings are the
cheaper teachers of `cheap_teachers.py`. Blocks of steps are a multiple of every teacher_every
tried, so a block of `teacher_every = m` steps runs the teacher on exactly 1 in m of them. Each
repeat times one block of every variant, in an order rotated between repeats (drifts of a shared
machine hit every variant alike); the ratio is taken within each repeat and the median reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..config import load_config
from .common import median

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# model -> (config file or None, data, per-worker batch: examples, or tokens for the sequence tasks)
MODELS = {
    "cnn_tiny": (None, "fashion_mnist", 16),
    "cnn": (None, "fashion_mnist", 64),
    "resnet20": (None, "fashion_mnist", 64),
    "transformer_tiny": ("translation_tiny.yaml", None, None),  # the config's batch: 2,048 tokens
    "gpt_tiny": ("lm_tiny.yaml", None, None),  # the config's batch: 1,024 tokens (8 x 128)
}
SEQUENCE_MODELS = ("transformer_tiny", "gpt_tiny")
FULL_MODELS = ["cnn", "resnet20", "transformer_tiny", "gpt_tiny"]
# setting -> codistill.* overrides; the first is the paper's teacher
SETTINGS = {
    "fp32, full batch, every step (paper)": {},
    "distill_fraction 0.5": {"distill_fraction": 0.5},
    "distill_fraction 0.25": {"distill_fraction": 0.25},
    "teacher_every 2": {"teacher_every": 2},
    "teacher_every 4": {"teacher_every": 4},
    "teacher_dtype bf16": {"teacher_dtype": "bf16"},
    "teacher_dtype int8": {"teacher_dtype": "int8"},
    "teacher_topk 32": {"teacher_topk": 32},  # language models only
}
BLOCK = 4  # steps per timed block: a multiple of every teacher_every above
TARGET = 1.15


def build_trainer(ctx, model: str, n: int, exchange_dir: Path, extra: dict | None = None, precision: str = "fp32",
                  data: str | None = None, batch: int | None = None):
    """A real Trainer of one model group of one worker; with n > 1 its teachers hold weights and
    take part from the first step (the exchange runs through storage at step 0 only, in
    `exchange_dir`, which must be this trainer's own). data, batch: override MODELS' choice."""
    from ..trainer import Trainer

    config, default_data, default_batch = MODELS.get(model, (None, "fashion_mnist", 64))
    data, batch = data or default_data, batch or default_batch
    sets = [f"model.name={model}", f"codistill.n_models={n}", "train.progress=false", "train.steps=1000000",
            f"codistill.teacher_precision={precision}"]
    if data is not None:
        sets += [f"data.name={data}", f"data.batch_size={batch}"]
    if n > 1:
        exchange_dir.mkdir(parents=True, exist_ok=True)
        sets += ["codistill.exchange=storage", f"codistill.exchange_dir={exchange_dir}", "codistill.model_index=0",
                 "codistill.exchange_every=1000000",
                 "codistill.alpha_schedule=constant"]  # the default burn-in would skip the teachers for T steps
    sets += [f"codistill.{k}={v}" for k, v in (extra or {}).items()]
    trainer = Trainer(load_config(CONFIGS / config if config else None, sets), ctx, None)
    trainer.maybe_exchange()  # step 0's (publishes this model; no peer publishes here)
    trainer.teachers.mark_received(0)  # as after the first exchange with peers: every teacher takes part
    return trainer


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile of repeats (both the value itself for one repeat)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def settings_for(model: str) -> dict:
    return {k: v for k, v in SETTINGS.items() if "teacher_topk" not in v or model in SEQUENCE_MODELS}


def measure(model: str, repeats: int, tmp: Path, ctx) -> dict:
    """Per-repeat seconds per step of the all-reduce worker and of each setting, and the ratios."""
    torch.manual_seed(0)
    own = build_trainer(ctx, model, 1, tmp / "own")
    variants = {name: build_trainer(ctx, model, 2, tmp / f"s{i}", extra)
                for i, (name, extra) in enumerate(settings_for(model).items())}
    batch = next(iter(own.task.train_batches(own.topo, 0)[0]))
    fns = {"allreduce": own, **variants}
    forwards = {}
    for name, trainer in fns.items():  # warm-up, and count the teacher forwards of one block
        calls = []
        hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in trainer.teachers.modules.values()]
        for _ in range(BLOCK):
            trainer.train_step(batch)
        for h in hooks:
            h.remove()
        forwards[name] = len(calls)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                fns[k].train_step(batch)
            times[k].append((time.perf_counter() - t0) / BLOCK)
    ratios = {k: [times[k][r] / times["allreduce"][r] for r in range(repeats)] for k in variants}
    return {"median_s": {k: median(v) for k, v in times.items()}, "ratio": {k: median(v) for k, v in ratios.items()},
            "ratio_per_repeat": ratios, "teacher_forwards_per_block": forwards, "block": BLOCK,
            "repeats": repeats}


def run_all(models: list[str], repeats: int) -> dict:
    import tempfile

    from ..distributed import init_distributed, shutdown

    with tempfile.TemporaryDirectory(prefix="codistill_teacher_cost_") as tmp:
        ctx = init_distributed("gloo", threads=1, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            return {m: measure(m, repeats, Path(tmp) / m, ctx) for m in models}
        finally:
            shutdown()


def table(results: dict) -> tuple[str, list[str]]:
    from .common import markdown_table

    rows = []
    for model, r in results.items():
        base = r["median_s"]["allreduce"]
        for name, ratio in r["ratio"].items():
            q1, q3 = quartiles(r["ratio_per_repeat"][name])
            rows.append([model, name, f"{1e3 * base:.1f}", f"{1e3 * r['median_s'][name]:.1f}", f"{ratio:.2f}",
                         f"{q1:.2f} - {q3:.2f}", "yes" if ratio <= TARGET else "no"])
    md = markdown_table(["model", "teacher setting", "all-reduce step (ms)", "codistill step (ms)",
                         "ratio", "quartiles over repeats", f"<= {TARGET}"], rows)
    paper = {m: r["ratio"][next(iter(SETTINGS))] for m, r in results.items()}
    notes = [f"ratio = codistillation step (n = 2, one teacher) / all-reduce step's compute, same per-worker "
             f"batch, no link; median over {next(iter(results.values()))['repeats']} interleaved repeats of "
             f"{BLOCK}-step blocks.",
             "paper's teacher: " + ", ".join(f"{m} {v:.2f}x" for m, v in paper.items()) + f" (target <= {TARGET}x)."]
    return md, notes
