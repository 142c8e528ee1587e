"""Exchange stall: the fraction of training time a worker is blocked in the exchange.

Synchronous exchange (codistill.exchange_delay = 0: every T steps the worker waits for the other
models' weights) against the asynchronous one (delay D: the transfer runs in the background while
training goes on with the old teachers, which are swapped D steps later), at T = 50.

Real runs of `codistill train` on the two emulated machines of `bench slow_network` (100 Mbit/s
link, one model per machine, so the exchange is exactly the traffic that crosses the link) when
this runs as root with iproute2; otherwise on loopback (local workers), and the table says so.

Two fractions per run:
- whole run: `exchange_blocked_fraction` of summary.json (the slowest worker's blocked time over the
  run's wall time). It includes the exchange at step 0, which is always synchronous (there are no
  teachers to train with before it);
- steady state: the same from metrics.jsonl, between the first log (before the second exchange)
  and the last, i.e. without step 0's exchange (model leaders only, the larger of the two).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import dump_yaml, load_config
from ..run_log import atomic_write_text, read_jsonl
from .common import Result, machine_info, markdown_table
from .local import run_local

TARGET = 0.01


def settings(quick: bool) -> dict:
    if quick:
        return {"network": "loopback", "world": 2, "period": 5, "delays": [0, 2],
                "overrides": ["data.name=digits", "model.name=cnn_tiny", "data.batch_size=16", "train.steps=20",
                              "train.log_every=2", "train.eval_every=20"]}
    netns = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
    return {"network": "netns" if netns else "loopback", "world": 4, "period": 50, "delays": [0, 10, 25],
            "rate_mbit": 100,
            "overrides": ["data.name=fashion_mnist", "model.name=cnn", "data.batch_size=64", "train.steps=150",
                          "train.log_every=10", "train.eval_every=150"]}


def steady_state(run_dir: Path, n_models: int) -> dict:
    """From the model leaders' logs, without step 0's exchange: the blocked fraction and blocked
    seconds (the larger over models), and the mean teacher staleness."""
    fractions, blocked, staleness = [], [], []
    for m in range(n_models):
        rows = [r for r in read_jsonl(run_dir / f"model_{m}" / "metrics.jsonl") if "exchange_blocked_s" in r]
        if len(rows) >= 2:
            first, last = rows[0], rows[-1]
            blocked.append(last["exchange_blocked_s"] - first["exchange_blocked_s"])
            fractions.append(blocked[-1] / max(last["time"] - first["time"], 1e-9))
        staleness += [r["staleness"] for r in rows]
    return {"fraction": max(fractions) if fractions else None, "blocked_s": max(blocked) if blocked else None,
            "staleness": sum(staleness) / len(staleness) if staleness else None}


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    st = settings(quick)
    T = st["period"]
    base = ["codistill.n_models=2", f"codistill.exchange_every={T}", "schedule.name=constant",
            "schedule.warmup_epochs=0", "schedule.milestones=[]", "train.progress=false", "dist.threads=1",
            *st["overrides"]]
    runs = [(f"delay{d}", load_config(None, base + [f"codistill.exchange_delay={d}"])) for d in st["delays"]]
    out = Path(out) / "stall"
    if st["network"] == "netns":
        summaries = _run_netns(runs, out, st)
    else:
        summaries = run_local(runs, st["world"], out)
    rows, records = [], []
    for (name, cfg), d in zip(runs, st["delays"]):
        s = summaries[name]
        ss = steady_state(out / name, s["n_models"])
        steady = ss["fraction"]
        per_exchange = ss["blocked_s"] / (s["exchanges"] - 1) if ss["blocked_s"] is not None and s["exchanges"] > 1 else None
        records.append({"delay": d, "whole_run": s["exchange_blocked_fraction"], "steady_state": steady,
                        "blocked_per_exchange_s": per_exchange, "mean_staleness": ss["staleness"],
                        "wall_seconds": s["wall_seconds"], "steps": s["steps"], "exchanges": s["exchanges"],
                        "val_accuracy": s["models"][0]["val_accuracy"]})
        rows.append([f"{d} ({'synchronous' if d == 0 else 'asynchronous'})", s["steps"], s["exchanges"],
                     f"{100 * s['exchange_blocked_fraction']:.2f}%",
                     "-" if steady is None else f"{100 * steady:.2f}%",
                     "-" if per_exchange is None else f"{1e3 * per_exchange:.1f}",
                     "-" if ss["staleness"] is None else f"{ss['staleness']:.1f}",
                     f"{s['wall_seconds'] / s['steps']:.3f}", f"{100 * s['models'][0]['val_accuracy']:.2f}"])
    table = markdown_table(["exchange_delay D", "steps", "exchanges", "blocked, whole run",
                            "blocked, steady state", "blocked per exchange after step 0 (ms)",
                            "mean teacher staleness (steps)", "s/step", "val acc model 0 (%)"], rows)
    best = min((r for r in records if r["delay"] > 0), key=lambda r: r["steady_state"] or 0.0)
    sync = records[0]
    where = (f"two emulated machines, {st['rate_mbit']} Mbit/s link (one model per machine)"
             if st["network"] == "netns" else f"loopback, {st['world']} local workers")
    met = best["steady_state"] is not None and best["steady_state"] < TARGET
    notes = [f"T = {T}, n = 2 models, W = {st['world']}, {where}; "
             f"{'digits, cnn_tiny (quick)' if quick else 'Fashion-MNIST, cnn, batch 64 per worker'}; one run per row.",
             f"target < {100 * TARGET:.0f}% of training time at T = {T}: "
             f"{'met' if met else 'missed'} by the asynchronous exchange (D = {best['delay']}: "
             f"{100 * (best['steady_state'] or 0):.2f}% steady state, {100 * best['whole_run']:.2f}% over the whole "
             f"run with step 0's synchronous exchange); synchronous: {100 * (sync['steady_state'] or 0):.2f}%."]
    return Result(name="stall", title="Exchange stall: synchronous vs asynchronous exchange",
                  command=f"codistill bench stall{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"network": st["network"], "period": T, "runs": records, "met": met},
                  machine=machine_info())


def _run_netns(runs, out: Path, st: dict) -> dict:
    from .netns import TwoMachines, torchrun_train

    summaries = {}
    with TwoMachines(st["rate_mbit"]) as link:
        for name, cfg in runs:
            path = out / "configs" / f"{name}.yaml"
            atomic_write_text(path, dump_yaml(cfg))
            torchrun_train(link, ["--config", str(path), "--out", str(out / name), "--overwrite"],
                           out / f"{name}_logs", timeout_s=900, nproc_per_node=st["world"] // 2)
            summaries[name] = json.loads((out / name / "summary.json").read_text())
    return summaries
