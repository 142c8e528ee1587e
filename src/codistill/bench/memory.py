"""Peak memory per worker, measured and predicted as model-state copies: every method, DDP and FSDP.

Each row is a real run of the library's `Trainer` (language modeling, `gpt2_small`'s 12 blocks with
a short context and a 256-piece vocabulary, so that the model's state dominates what the process
adds). Measured: on CPU the rise of the process's resident set over the run (VmHWM after the run
minus VmRSS before it, the high-water mark reset with /proc/self/clear_refs and freed heap returned
to the system first, so that several runs can share one start of the workers); on CUDA
`max_memory_allocated`. Predicted: the copies of one model's parameters (M, fp32) that the code
holds per worker, read from the code (terms below), at the worst of three moments:

  state        what lives through the run: the model (s = 1/k of M sharded over k workers, else 1),
               AdamW's two moments (2 s), theta_0 for the parameter distance (s, on the CPU:
               evaluation.initial_parameters), DDP's gradient buckets (1, DDP over k > 1 workers),
               teachers ((n - 1) s: exchange.Teachers, the receive buffer IS the teacher), the send
               buffer (s), staging ((n - 1) s, exchange_delay > 0), the wire buffers (n s / 2 for
               bf16: one per model of the column), DiLoCo's global copy and momentum (2 s; local
               SGD: the copy, s)
  step         state + gradients (s); sharded, FSDP's gathered units in flight: the root (embeddings
               and final norm, gathered for the whole step) and four blocks (the block being
               differentiated and the one prefetched, the block's unsharded gradients and their
               reduce-scatter input)
  outer step   state + gradients (s: the last outer step runs after the last update, in
               `Codistillation.finish`, before the next zero_grad) + three temporaries (s each:
               the deltas, their flat copy, the mean deltas)
  evaluation   state + gradients (kept from the last update) + sharded, the whole model gathered (1)

Activations are left out of the prediction (a few blocks of 32 tokens: small beside M); the
prediction and the measurement must agree within TOLERANCE.
"""

from __future__ import annotations

import ctypes
import gc
import json
import random
import time
from pathlib import Path

from ..config import Config, load_config
from .common import Result, machine_info, markdown_table

TOLERANCE = 0.20  # |measured - predicted| / predicted, per row (tests/test_bench_memory.py)
ARMS = {
    "allreduce": ["codistill.n_models=1"],
    "codistill": ["codistill.n_models=2"],
    "codistill async D=2": ["codistill.n_models=2", "codistill.exchange_delay=2"],
    "codistill async D=2 bf16": ["codistill.n_models=2", "codistill.exchange_delay=2", "codistill.exchange_dtype=bf16"],
    "diloco": ["codistill.n_models=2", "codistill.method=diloco"],
    "localsgd": ["codistill.n_models=2", "codistill.method=localsgd"],
}
QUICK_ARMS = ("allreduce", "codistill")
# gpt2_small's 12 blocks at half its width (M = 82 MiB): its state is what each run adds (activations
# of 32-token blocks are a few MiB), and the full table's largest rows (2 x 2 DDP, async bf16: 10 M per
# worker beside ~0.7 GiB of libraries; 8 workers of FSDP) stay under ~8 GiB resident in all on a
# machine of 24 GiB shared with other runs, so nothing is swapped out under the measurement;
# gpt2_small itself (M = 340 MiB) would need ~16 GiB.
FULL_MODEL = {"dropout": 0.0, "d_model": 384, "heads": 6}
QUICK_MODEL = {"dropout": 0.0, "d_model": 256, "heads": 4}  # its depth at a third of its width


def _corpus(root: Path) -> Path:
    """train/valid/test.txt of pseudo-words: what the text says does not change the memory."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", 1500), ("valid.txt", 20), ("test.txt", 20)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n))
        (root / name).write_text(text + "\n")
    return root


def config(arm: str, parallel: str, world: int, model: dict, data: Path, steps: int = 3) -> Config:
    opts = ", ".join(f"{k}: {v}" for k, v in {**model, "context": 32}.items())  # a 32-row position table
    return load_config(None, [
        "data.name=text_files", f"data.root={data / 'text'}", f"lm.cache_dir={data / 'cache'}", "lm.context=32",
        "lm.vocab_size=256", "data.batch_size=32", "data.eval_batch_size=64", "model.name=gpt2_small",
        f"model.options={{{opts}}}", "optim.name=adamw", "optim.lr=0.001", "schedule.name=constant",
        "schedule.warmup_epochs=0", "schedule.scale_lr=false", "train.progress=false", f"train.steps={steps}",
        f"train.log_every={steps}", "train.eval_every=0", "dist.threads=1", "lm.sample_tokens=0",
        "codistill.exchange_every=2", f"train.parallel={parallel}", f"dist.nproc={world}", *ARMS[arm]])


def model_fractions(cfg: Config) -> tuple[int, float, float]:
    """(M in bytes, the root's fraction of M, the largest block's fraction) of the config's model:
    FSDP's units (sharding.shard_model), counted on the meta device."""
    import torch
    import torch.nn as nn

    from ..models import build_model

    with torch.device("meta"):
        m = build_model(cfg.model.name, cfg.lm.vocab_size, (), **cfg.model.options)
    total = sum(p.numel() for p in m.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for x in m.modules() if isinstance(x, nn.ModuleList) for b in x]
    return total * 4, (total - sum(blocks)) / total, max(blocks, default=0) / total


def predict(cfg: Config, world: int, root: float, block: float) -> dict[str, float]:
    """Peak copies of M per worker at each moment (module docstring), and the peak."""
    n, method = cfg.codistill.n_models, cfg.codistill.method
    k = world // n
    sharded = cfg.train.parallel == "fsdp"
    s = 1 / k if sharded else 1.0
    codistill, outer = n > 1 and method not in ("diloco", "localsgd"), method in ("diloco", "localsgd")
    state = {"model": s, "optimizer": 2 * s, "theta_0": s,
             "ddp_buckets": 1.0 if not sharded and k > 1 else 0.0,
             "teachers": (n - 1) * s if codistill else 0.0, "send": s if codistill else 0.0,
             "staging": (n - 1) * s if codistill and cfg.codistill.exchange_delay > 0 else 0.0,
             "wire": n * s / 2 if codistill and cfg.codistill.exchange_dtype == "bf16" else 0.0,
             "outer": (2 * s if method == "diloco" else s) if outer else 0.0}
    base = sum(state.values())
    gathered_step = root + 4 * block if sharded else 0.0
    return {**state, "state": base, "step": base + s + gathered_step, "outer_step": base + s + 3 * s if outer else 0.0,
            "evaluation": base + s + (1.0 if sharded else 0.0)}


def peak(p: dict[str, float]) -> float:
    return max(p["step"], p["outer_step"], p["evaluation"])


# -- measurement ----------------------------------------------------------------------------------


def _status(field: str) -> float:
    """A /proc/self/status memory field, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _exact_heap() -> None:
    """Every allocation of 64 KiB or more gets its own mapping, returned to the system when freed
    (glibc's mallopt M_MMAP_THRESHOLD; by default the threshold grows to 32 MiB and freed tensors
    stay in the heap), so the resident set follows the live tensors and its peak is theirs."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _settle() -> float:
    """Free what the last run left, return freed heap to the system, reset the high-water mark;
    the resident set now (MiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    return _status("VmRSS")


def _worker(rank: int, world: int, init_method, runs: list[tuple[str, Config]], out: str) -> None:
    import torch

    from ..distributed import init_distributed, shutdown
    from ..trainer import Trainer

    d = runs[0][1].dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s, init_method=init_method, rank=rank, world_size=world)
    try:
        for name, cfg in runs:
            cuda = ctx.device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ctx.device)
                before = torch.cuda.memory_allocated(ctx.device) / 2**20
            else:
                _exact_heap()
                before = _settle()
            # No run directory: no checkpoint at the end, whose CPU copy of the state is host memory
            # on a GPU and not what a training step holds.
            start = time.perf_counter()
            trainer = Trainer(cfg, ctx, None)
            built = time.perf_counter()
            trainer.fit()
            del trainer
            after = torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else _status("VmHWM")
            record = {"rank": rank, "before_mib": before, "peak_mib": after, "rise_mib": after - before,
                      "kind": "cuda_max_allocated" if cuda else "process_rss",
                      "build_s": built - start, "fit_s": time.perf_counter() - built}
            (Path(out) / name / f"memory_rank{rank}.json").write_text(json.dumps(record))
    finally:
        shutdown()


def measure(runs: list[tuple[str, Config]], world: int, out: Path) -> dict[str, list[dict]]:
    """Train each run in turn on `world` local workers (one start); each run's records per rank.
    The first run is a small warm-up: a process's first run pays for what every later one reuses."""
    from ..config import dump_yaml
    from ..distributed import spawn
    from ..run_log import atomic_write_text, prepare_run_dir

    out = Path(out).resolve()
    for name, cfg in runs:
        atomic_write_text(prepare_run_dir(out / name, overwrite=True) / "config.yaml", dump_yaml(cfg))
    spawn(_worker, world, out, args=(runs, str(out)), threads=1)
    return {name: [json.loads((out / name / f"memory_rank{r}.json").read_text()) for r in range(world)]
            for name, _ in runs}


# -- the table ------------------------------------------------------------------------------------


def plan(quick: bool) -> list[tuple[str, str, int]]:
    """(arm, parallel, world) rows: every arm at 4 workers (two models: 2 x 2), DDP and FSDP; one
    model alone with FSDP over 2 workers (the target's reference for k = 2); unless quick, the
    two-model arms with FSDP over k = 4 (8 workers) and their reference (1 x 4)."""
    arms = QUICK_ARMS if quick else tuple(ARMS)
    rows = [("allreduce", "fsdp", 2), ("allreduce", "ddp", 2)]
    rows += [(a, p, 4) for a in arms for p in ("ddp", "fsdp")]
    if not quick:
        rows += [(a, "fsdp", 8) for a in arms if a != "allreduce"]
    return rows


def _name(arm: str, parallel: str, world: int) -> str:
    return f"{arm}-{parallel}-{world}".replace(" ", "_").replace("=", "")


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    from ..lm.task import LMTask

    out = Path(out).resolve() / "memory_runs"
    data = out / "data"
    _corpus(data / "text")
    model = QUICK_MODEL if quick else FULL_MODEL
    rows = plan(quick)
    cfgs = {(a, p, w): config(a, p, w, model, data) for a, p, w in rows}
    LMTask.prepare(next(iter(cfgs.values())), out)  # the tokenizer and token ids, once
    tiny = {"dropout": 0.0, "d_model": 32, "heads": 2, "layers": 2}
    records = {}
    for world in sorted({w for _, _, w in rows}):
        runs = [(_name(a, p, w), c) for (a, p, w), c in cfgs.items() if w == world]
        warmup = ("warmup", config("allreduce" if world < 4 else "codistill", "fsdp", world, tiny, data, steps=2))
        records.update(measure([warmup, *runs], world, out / f"w{world}"))
    return report(cfgs, records, model, quick)


def report(cfgs: dict, records: dict, model: dict, quick: bool) -> Result:
    """The table, notes and targets from each row's config and its workers' records."""
    nbytes, root, block = model_fractions(next(iter(cfgs.values())))
    mib = nbytes / 2**20
    table_rows, data_rows = [], []
    for (a, p, w), c in cfgs.items():
        recs = records[_name(a, p, w)]
        measured = max(r["rise_mib"] for r in recs) / mib
        pred = predict(c, w, root, block)
        n = c.codistill.n_models
        table_rows.append([a, p, f"{n} x {w // n}", f"{max(r['rise_mib'] for r in recs):.0f}", f"{measured:.2f}",
                           f"{peak(pred):.2f}", f"{measured / peak(pred):.2f}"])
        data_rows.append({"arm": a, "parallel": p, "world": w, "n_models": n, "k": w // n, "measured_copies": measured,
                          "measured_mib": max(r["rise_mib"] for r in recs), "predicted_copies": peak(pred),
                          "predicted": pred, "ranks": recs})
    table = markdown_table(["arm", "parallel", "models x workers", "peak rise per worker (MiB)",
                            "measured (copies of M)", "predicted (copies of M)", "measured / predicted"], table_rows)
    targets = check_targets(data_rows)
    notes = [f"M = one model's fp32 parameters: {mib:.1f} MiB (gpt2_small options {model}, context 32, vocabulary 256).",
             "peak rise per worker: the highest over the run's workers of (peak resident set during the run - "
             "resident set before it); on CUDA max_memory_allocated.",
             f"predicted: the copies the code holds at its worst moment (bench/memory.py); agreement within "
             f"{TOLERANCE:.0%} asserted by tests/test_bench_memory.py on the quick rows.",
             *[f"target: {t['target']}: {'met' if t['met'] else 'MISSED'} ({t['detail']})" for t in targets]]
    return Result(name="memory", title="Peak memory per worker: measured and predicted",
                  command=f"codistill bench memory{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"rows": data_rows, "model_mib": mib, "root_fraction": root, "block_fraction": block,
                        "tolerance": TOLERANCE, "targets": targets}, machine=machine_info())


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's memory targets on the measured rows, for every k present."""
    by = {(r["arm"], r["parallel"], r["world"]): r for r in rows}
    out = []
    for (arm, parallel, world), r in by.items():
        if arm != "codistill" or parallel != "fsdp":
            continue
        k = world // 2
        # DDP's copies per worker do not depend on k > 1 (the plan runs no 1 x 8 DDP: 8 whole models
        # and their state would not fit beside the other rows' processes here): its 1 x 4 stands in.
        ddp = by.get(("allreduce", "ddp", world)) or by.get(("allreduce", "ddp", 4))
        if ddp is not None:
            out.append({"target": f"codistill 2 x {k} FSDP < all-reduce 1 x {world} DDP",
                        "met": r["measured_copies"] < ddp["measured_copies"],
                        "detail": f"{r['measured_copies']:.2f} vs {ddp['measured_copies']:.2f} copies"
                                  + ("" if ddp["world"] == world else f" (DDP measured at 1 x {ddp['world']})")})
        alone = by.get(("allreduce", "fsdp", k))
        if alone is not None:
            bound = alone["measured_copies"] + 2 / k
            out.append({"target": f"codistill 2 x {k} FSDP <= 1 x {k} FSDP alone + 1/k teacher + 1/k send",
                        "met": r["measured_copies"] <= bound * (1 + TOLERANCE) and r["predicted_copies"] <= bound,
                        "detail": f"{r['measured_copies']:.2f} vs {alone['measured_copies']:.2f} + {2 / k:.2f} = "
                                  f"{bound:.2f} copies"})
    return out
