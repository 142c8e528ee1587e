"""Time to a converged accuracy across link rates, from the suite's trained runs and the cost model.

`bench sweep` measures time to an early target (60 updates) on the emulated link; the accuracy a
user trains for is the converged one. At F1's trained budget (1,260 updates, where all-reduce has
converged by the suite's rule) the target here is all-reduce's final validation accuracy of model 0
(mean over its seeds) less 0.5 points (`convergence.TARGET_MARGIN`, the suite's floor for calling two
accuracies different). Training 1,260 updates per arm per link rate on the emulated machines does not
fit this 2-core host, so the cells are derived, not measured on a link:

- steps to the target: measured, the first evaluation of each seed's run (the suite's rows, every
  126 updates) at or above it; training is bitwise identical at every link rate, so these steps hold
  at every rate. An arm whose run never reaches it is reported so, with its best accuracy and when.
- compute per step: all-reduce's measured training clock per step (its rows: wall time / updates),
  times each arm's compute relative to all-reduce's: codistillation's from `bench step_overhead`'s
  teacher-cost table (cnn, the ratio of a codistillation step to an all-reduce step, interleaved
  medians), 1 for DiLoCo and local SGD (a worker's own step at the same per-worker batch; their outer
  step's local arithmetic is a few vector operations every H steps).
- the link's cost per step: the cost model (`codistill.cost_model`, the functions `bench sweep`
  validates on measured cells), two machines with one model group each (all-reduce spread over both),
  the exchange and outer all-reduce hierarchical (bitwise the same training, `bench sweep`).

`python -m codistill.bench.converged --results results --teacher-cost DIR/step_overhead.json --out DIR`
writes converged.md / converged.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import cost_model as cm
from ..convergence import TARGET_MARGIN
from .common import Result, fmt, machine_info, markdown_table, reachable_target

RATES_MBIT = (1000, 100, 25, 10)

# (label, experiment, variant, teacher-cost setting or None): the first is the reference; of an arm
# listed twice, the source with more seeds is used (the Teachers rows are F1's config in the current
# seed derivation).
ARMS = (
    ("all-reduce", "F1", "allreduce-long", None),
    ("codistillation, paper's teacher (library default, burn-in)", "Teachers", "codistill-trained",
     "fp32, full batch, every step (paper)"),
    ("codistillation, paper's teacher (library default, burn-in)", "F1", "codistill-trained",
     "fp32, full batch, every step (paper)"),
    ("codistillation, distill_fraction 0.25", "Teachers", "codistill-fraction0.25-trained", "distill_fraction 0.25"),
    ("codistillation, distill_fraction 0.5", "Teachers", "codistill-fraction0.5-trained", "distill_fraction 0.5"),
    ("codistillation, teacher_every 4", "Teachers", "codistill-every4-trained", "teacher_every 4"),
    ("DiLoCo", "Peers", "diloco-long", None),
    ("local SGD", "Peers", "localsgd-long", None),
)


# Translation at F5's trained budget (2,000 updates, a quarter of the corpus): all-reduce with its
# regularization, codistillation with F5's setting best on validation there; no DiLoCo or local SGD
# rows exist at this budget.
ARMS_MT = (
    ("all-reduce", "F5", "allreduce-trained", None),
    ("codistillation, paper's teacher (library default, burn-in)", "TeachersMT", "codistill-trained",
     "fp32, full batch, every step (paper)"),
    ("codistillation, paper's teacher (library default, burn-in)", "F5", "codistill-ls0-drop0-trained",
     "fp32, full batch, every step (paper)"),
    ("codistillation, teacher_every 4", "TeachersMT", "codistill-every4-trained", "teacher_every 4"),
)

NLL_MARGIN = 0.02  # the suite's floor for calling two validation NLLs different (verdicts.NLL_FLOOR)

# task -> (arms, curve key, final key, higher is better, margin, teacher-cost model, unit scale, unit)
TASKS = {
    "image": (ARMS, "val/accuracy", "val_accuracy", True, TARGET_MARGIN, "cnn", 100, "%"),
    "translation": (ARMS_MT, "val/loss", "val_loss", False, NLL_MARGIN, "transformer_tiny", 1, ""),
}


def _rows(results: Path, experiment: str, variant: str) -> list[dict]:
    path = results / f"{experiment}.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_seed = {r["seed"]: r for r in rows if r["variant"] == variant and not r.get("quick") and r.get("budget", 1) == 1}
    return [by_seed[s] for s in sorted(by_seed)]


def reach(row: dict, target: float, task: str = "image") -> dict:
    """Step at which one run first reaches `target` (None: never), its best value and when."""
    _, key, final_key, higher, *_ = TASKS[task]
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    curve = (row.get("curve") or {}).get(key)
    if not curve:  # rows from before curves were kept: only the final value is known
        final = row[final_key][0]
        return {"step": "by the end" if better(final, target) else None, "best": final, "best_step": row["steps"],
                "curve": False}
    hit = next((int(s) for s, a in curve if better(a, target)), None)
    sign = 1 if higher else -1
    best_step, best = max(curve, key=lambda p: (sign * p[1], -p[0]))
    return {"step": hit, "best": best, "best_step": int(best_step), "curve": True}


def link_s_per_step(kind: str, compute_s: float, m: dict, link: cm.Link) -> float:
    """The cost model's seconds per step of one arm on `link` (hierarchical: r = 1 crosses)."""
    if kind == "allreduce":
        return cm.allreduce_step_s(compute_s, m["grad"], m["world"], link)
    if kind == "codistill":
        return cm.codistill_run_s_per_step(compute_s, 0.0, m["n"], 1, m["state"], m["period"], m["steps"], link,
                                           m["delay"])
    return cm.outer_sync_run_s_per_step(compute_s, m["n"], 1, m["state"], m["period"], m["steps"], link)


def model_facts(experiment: str, variant: str) -> dict:
    """The arm's resolved config (seed 0): what the cost model needs besides the model's bytes."""
    from ..experiments.runner import variant_config
    from ..experiments.suite import EXPERIMENTS

    e = EXPERIMENTS[experiment]
    cfg, world = variant_config(e, e.variant(variant), 0, False)
    c = cfg.codistill
    kind = "allreduce" if c.n_models == 1 else ("codistill" if c.method == "distill" else "outer")
    return {"world": world, "n": c.n_models, "period": c.exchange_every,
            "delay": c.exchange_delay, "steps": cfg.train.steps, "kind": kind}


def build(results: Path, teacher_cost: dict | None) -> Result:
    tables, notes, data = [], [], {}
    for task in TASKS:
        table, task_notes, task_data = build_task(results, teacher_cost, task)
        if table:
            tables.append(table)
            notes += task_notes
            data[task] = task_data
    return Result(name="converged", title="Time to a converged accuracy across link rates (cost model x measured runs)",
                  command="python -m codistill.bench.converged", table="\n\n".join(tables), notes=notes,
                  data={**data, "rates_mbit": list(RATES_MBIT)}, machine=machine_info())


def build_task(results: Path, teacher_cost: dict | None, task: str) -> tuple[str, list[str], dict]:
    spec, _, final_key, higher, margin, cost_model_name, scale, unit = TASKS[task]
    arms = {}  # label -> the source with the most seeds (the first of equals)
    for label, experiment, variant, setting in spec:
        rows = _rows(results, experiment, variant)
        if rows and len(rows) > len(arms.get(label, {}).get("rows", ())):
            arms[label] = {"label": label, "source": f"{experiment}/{variant}", "rows": rows, "setting": setting,
                           **model_facts(experiment, variant)}
    arms = list(arms.values())
    if not arms or arms[0]["kind"] != "allreduce":
        return "", [], {}
    ref = arms[0]
    # The model's gradient bytes from all-reduce's own counters (per worker per step, 2 (W - 1) / W G);
    # the exchanged state is the same tensors (BatchNorm's running statistics aside: < 1%).
    row, world = ref["rows"][0], ref["world"]
    grad = row["bytes_allreduce"] / row["steps"] / (2 * (world - 1) / world)
    for a in arms:
        a.update(grad=grad, state=grad)
    final = statistics.fmean(r[final_key][0] for r in ref["rows"])
    target = final - margin if higher else final + margin
    ar_clock = statistics.median(r["wall_seconds"] / r["steps"] for r in ref["rows"])
    cost = (teacher_cost or {}).get(cost_model_name, {}).get("ratio", {})
    table, records = _table(arms, target, ar_clock, cost, task)
    what = "validation accuracy" if higher else "validation NLL"
    words = (f"{scale * final:.2f}{unit}) {'less' if higher else 'plus'} {scale * margin:g}"
             f"{' points' if higher else ''} = {scale * target:.2f}{unit}")
    heading = ("Fashion-MNIST, width-8 CNN, 4 workers (all-reduce 1 x 4, the others 2 x 2), 1,260 updates, "
               "T = H = 25" if task == "image" else
               "Bible En -> Es, transformer_tiny, 2 workers (all-reduce 1 x 2, codistillation 2 x 1), 2,000 updates "
               "on a quarter of the corpus, T = 50")
    notes = [f"{task}: target = all-reduce's final {what} (model 0, mean of {len(ref['rows'])} seeds, {words}. "
             f"{heading}. Updates to the target: measured (the suite's rows and their evaluations); s/step and "
             f"time: projected by the cost model from all-reduce's measured clock ({1e3 * ar_clock:.1f} ms/step, "
             "median of its rows) x each arm's compute ratio, plus the link (two machines, one model group each, "
             "hierarchical exchange and outer all-reduce). Time to target = median updates x s/step, only where "
             "every seed reaches it. One run per seed; no cell is measured on the emulated link."]
    table = f"{task}, target {what} {scale * target:.2f}{unit}:\n\n" + table
    data = {"target": target, "allreduce_final": final, "allreduce_clock_s": ar_clock, "arms": records,
            "teacher_cost": cost}
    if higher:  # the early-target view at the same budget: the highest level every run reaches
        common = reachable_target([reach(r, 0.0, task)["best"] for a in arms for r in a["rows"]], target)
        common_table, data["arms_common_target"] = _table(arms, common, ar_clock, cost, task)
        data["common_target"] = common
        table += f"\n\n{task}, at {scale * common:.1f}{unit}, the highest level (0.5-point steps) every run reaches:\n\n" \
            + common_table
    return table, notes, data


def _table(arms: list[dict], target: float, ar_clock: float, cost: dict, task: str) -> tuple[str, list[dict]]:
    _, _, final_key, higher, _, model_name, scale, unit = TASKS[task]
    ref = arms[0]
    table_rows, records = [], []
    for a in arms:
        if a["kind"] == "codistill":
            ratio, ratio_src = cost.get(a["setting"]), f"teacher-cost table ({model_name})"
            if ratio is None:  # no table given: the arm's own clock against all-reduce's
                ratio = statistics.median(r["wall_seconds"] / r["steps"] for r in a["rows"]) / ar_clock
                ratio_src = "run clocks"
        else:
            ratio, ratio_src = 1.0, "measured" if a is ref else "assumed (same per-worker step)"
        compute = ar_clock * ratio
        hits = [reach(r, target, task) for r in a["rows"]]
        steps = [h["step"] for h in hits if isinstance(h["step"], int)]
        reached = sum(h["step"] is not None for h in hits)
        best = max(hits, key=lambda h: h["best"] if higher else -h["best"])
        per_rate = {}
        for rate in RATES_MBIT:
            s = link_s_per_step(a["kind"], compute, a, cm.Link(rate * 1e6))
            ttt = s * statistics.median(steps) if reached == len(hits) and len(steps) == len(hits) else None
            per_rate[rate] = {"s_per_step": s, "time_to_target_s": ttt}
        if reached == len(hits) and steps:
            where = f"{statistics.median(steps):.0f} (seeds: {', '.join(str(s) for s in steps)})"
        elif reached:
            where = (f"{reached} of {len(hits)} seeds ("
                     + ", ".join(str(h["step"]) for h in hits if h["step"] is not None) + ")")
        else:
            where = "never"
        # "no curve": rows kept before curves were, whose final accuracy passes the target at an unknown update
        unknown = "not reached" if reached < len(hits) else "no curve"
        value = f"{scale * best['best']:.2f}{unit}"
        best_words = f"{value} at {best['best_step']}" if best["curve"] else f"{value} final (no curve kept)"
        table_rows.append([a["label"], len(a["rows"]), f"{ratio:.2f} ({ratio_src})", where, best_words,
                           *[f"{per_rate[r]['s_per_step']:.3f} / "
                             + fmt(per_rate[r]["time_to_target_s"], ".0f", unknown) for r in RATES_MBIT]])
        records.append({"label": a["label"], "source": a["source"], "seeds": len(a["rows"]), "compute_ratio": ratio,
                        "compute_ratio_source": ratio_src, "compute_s_per_step": compute, "reach": hits,
                        "per_rate": {str(r): v for r, v in per_rate.items()},
                        f"mean_final_{final_key}": statistics.fmean(r[final_key][0] for r in a["rows"])})
    return markdown_table(
        ["arm", "seeds", "compute/step vs all-reduce", "updates to target",
         f"best {'val acc' if higher else 'val NLL'} (model 0), at update",
         *[f"{r} Mbit/s: s/step / s to target" for r in RATES_MBIT]], table_rows), records


def main() -> None:
    import argparse

    from .common import write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("results"), help="the suite's results directory")
    p.add_argument("--teacher-cost", type=Path, help="a `bench step_overhead` step_overhead.json (or its "
                   "teacher_cost part); without it, the arms' own clocks give their compute ratios")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cost = None
    if args.teacher_cost:  # a step_overhead.json, or its teacher_cost part alone
        cost = json.loads(args.teacher_cost.read_text())
        cost = cost["data"]["teacher_cost"] if "data" in cost else cost
    result = build(args.results, cost)
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    print(result.markdown())


if __name__ == "__main__":
    main()
