"""Bytes sent per worker per step: all-reduce vs codistillation, counted in real runs and by formula.

For W workers, n models, k = W / n replicas per model, G the model's gradient bytes and S its
state bytes (parameters and buffers, what an exchange moves):

    all-reduce (n = 1, k = W):  2 (W - 1) / W * G                 per step (ring all-reduce)
    codistillation:             2 (k - 1) / k * G                 per step (all-reduce in the model group)
                              + (n - 1) * S                       per exchange, one exchange every T steps

For each W, one real run of each mode (the library's `Trainer` on W local workers) gives the
counters of `summary.json` (`bytes_per_worker`, `exchanges`); they are set beside the formulas
evaluated on the model's own tensors. The per-step average at T = 50, 500, 2500 is the counted
all-reduce bytes per step plus the counted bytes of one exchange divided by T (the long-run
average: a run of s steps makes ceil(s / T) exchanges, the first at step 0).

Not in the counters of summary.json, hence not in the table: before each exchange, replica 0 of
each model broadcasts its BatchNorm buffers to the other replicas (`buffer_sync_sent`, (k - 1) x
buffer bytes per exchange on replica 0 only).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import load_config
from ..data import load_dataset
from ..models import build_model
from .common import Result, machine_info, markdown_table
from .local import run_local

PERIODS = (50, 500, 2500)


def model_bytes(name: str, data_name: str) -> dict:
    """Gradient, state and buffer bytes of one model, from its own tensors."""
    splits = load_dataset(data_name)
    model = build_model(name, splits.num_classes, splits.input_shape)
    grad = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"grad": grad, "state": state, "buffers": buffers,
            "params": sum(p.numel() for p in model.parameters())}


def formulas(world: int, n_models: int, m: dict) -> dict:
    k = world // n_models
    return {"allreduce_per_step": 2.0 * (k - 1) / k * m["grad"] if k > 1 else 0.0,
            "exchange_per_exchange": float((n_models - 1) * m["state"])}


def _agree(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def make_table(records: list[dict], period: int) -> str:
    """The table of counted vs formula bytes, and codistillation relative to all-reduce."""
    rows, ratio_rows = [], []
    for r in records:
        n, world = r["n_models"], r["world"]
        rows.append([world, r["mode"], f"{n} x {world // n}",
                     f"{r['steps']} steps" + (f", T={period}: {r['exchanges']} exchanges" if n > 1 else ""),
                     f"{r['counted_allreduce_per_step']:,.0f} / {r['formula_allreduce_per_step']:,.0f}",
                     f"{r['counted_per_exchange']:,.0f} / {r['formula_per_exchange']:,.0f}" if n > 1 else "-",
                     "yes" if r["agree"] else "**NO**",
                     *[f"{r['per_step_at_T'][T]:,.0f}" for T in PERIODS]])
        ref = next(x for x in records if x["world"] == world and x["n_models"] == 1)
        if n > 1:
            ratio_rows.append([world, *[f"{r['per_step_at_T'][T] / ref['per_step_at_T'][T]:.3f}" for T in PERIODS]])
    table = markdown_table(
        ["W", "mode", "models x workers", "real run", "all-reduce B/step: counted / formula",
         "exchange B/exchange: counted / formula", "agree", *[f"B/step at T={T}" for T in PERIODS]], rows)
    return table + "\n\nCodistillation bytes per worker per step relative to all-reduce at the same W:\n\n" + \
        markdown_table(["W", *[f"T={T}" for T in PERIODS]], ratio_rows)


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    if quick:
        data, model, batch, worlds, steps, period = "digits", "cnn_tiny", 16, [2], 6, 3  # W = 4, 8: full mode
    else:
        data, model, batch, worlds, steps, period = "fashion_mnist", "cnn", 64, [4, 8], 20, 5
    base = [f"data.name={data}", f"model.name={model}", f"data.batch_size={batch}", f"train.steps={steps}",
            f"codistill.exchange_every={period}", "schedule.name=constant", "schedule.warmup_epochs=0",
            "schedule.milestones=[]", f"train.eval_every={steps}", f"train.log_every={steps}",
            "train.progress=false", "dist.threads=1"]
    m = model_bytes(model, data)
    records, all_agree = [], True
    for world in worlds:
        runs = [(f"W{world}_allreduce", load_config(None, base + ["codistill.n_models=1"])),
                (f"W{world}_codistill", load_config(None, base + ["codistill.n_models=2"]))]
        summaries = run_local(runs, world, Path(out) / "bytes_runs")
        for (name, cfg), mode in zip(runs, ("all-reduce", "codistill")):
            s = summaries[name]
            n = cfg.codistill.n_models
            f = formulas(world, n, m)
            ar = s["bytes_per_worker"]["allreduce"] / s["steps"]
            ex = s["bytes_per_worker"]["exchange"] / s["exchanges"] if s["exchanges"] else 0.0
            agree = _agree(ar, f["allreduce_per_step"]) and _agree(ex, f["exchange_per_exchange"])
            if n > 1:  # every exchange of the run was counted: ceil(steps / T), the first at step 0
                agree = agree and s["exchanges"] == math.ceil(s["steps"] / period)
            all_agree &= agree
            per_t = {T: ar + ex / T for T in PERIODS}
            records.append({"world": world, "mode": mode, "n_models": n, "replicas": world // n,
                            "steps": s["steps"], "exchanges": s["exchanges"], "counted_allreduce_per_step": ar,
                            "formula_allreduce_per_step": f["allreduce_per_step"],
                            "counted_per_exchange": ex, "formula_per_exchange": f["exchange_per_exchange"],
                            "per_step_at_T": per_t, "agree": agree})
    table = make_table(records, period)
    notes = [f"bytes per worker (B); model `{model}` on `{data}`: {m['params']:,} parameters, gradient G = {m['grad']:,} B, "
             f"state S = {m['state']:,} B (of which buffers {m['buffers']:,} B); batch {batch} per worker.",
             "counted = `summary.json` counters of a real run (mean over workers); formula = 2(k-1)/k G per step "
             "and (n-1) S per exchange, k = workers per model.",
             f"counters and formulas agree: {'yes, exactly, in every run' if all_agree else 'NO: see the table'}.",
             "B/step at T: counted all-reduce per step + counted bytes of one exchange / T. Within its own model "
             "group codistillation still all-reduces gradients every step; what it removes is the traffic "
             "between model groups, which is only the exchange (see `bench slow_network`)."]
    return Result(name="bytes", title="Bytes per worker per step: all-reduce vs codistillation",
                  command=f"codistill bench bytes{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"model": model, "data": data, "model_bytes": m, "runs": records, "agree": all_agree},
                  machine=machine_info())
