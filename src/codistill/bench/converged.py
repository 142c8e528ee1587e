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
writes converged.md / converged.json. With `--measure-link` (root) it also measures the projection:
each image arm's s/step on `bench sweep`'s emulated link, from short runs of its suite config (training
is the same at every rate, so measured updates x measured s/step is the measured time to the target),
beside the cost model's s/step from a calibration cell of the same invocation and from the suite's
rows, with the model's median error (`measure_link`, `link_table` below).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import cost_model as cm
from ..config import dump_yaml
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


def build(results: Path, teacher_cost: dict | None, link_cells: list[dict] | None = None) -> Result:
    """The tables; with `link_cells` (`measure_link`), the image arms' s/step measured on the link beside
    the projections."""
    tables, notes, data = [], [], {}
    for task in TASKS:
        table, task_notes, task_data = build_task(results, teacher_cost, task)
        if table:
            tables.append(table)
            notes += task_notes
            data[task] = task_data
    if link_cells and "image" in data:
        image = data["image"]
        targets = {f"{100 * image['target']:.2f}%": image["arms"]}
        if "common_target" in image:
            targets[f"{100 * image['common_target']:.1f}%"] = image["arms_common_target"]
        table, link_notes, image["link"] = link_table(link_cells, targets)
        tables.append("image, s/step measured on the emulated link (two machines, hierarchical exchange) and "
                      "time to the target = measured updates x measured s/step; projections beside (% vs "
                      "measured):\n\n" + table)
        notes += link_notes
    elif "image" in data:
        notes.append("No cell is measured on the emulated link (`--measure-link` measures s/step there).")
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
             "every seed reaches it. One run per seed."]
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


# --- s/step measured on the emulated link (issue 29): the projection's error on these cells ---------
#
# Training is bitwise identical at every link rate, so time to the target = the suite's measured
# updates to it x s/step at the rate; s/step is what the link changes, and a short run measures it:
# each image arm's own suite config (model, batch, T = H, teacher setting; exchange and outer all-reduce
# hierarchical, which trains bitwise the same) on `bench sweep`'s two emulated machines, a warm-up
# (start-up and the burn-in: no teacher forwards for K = T + D = 25 steps) and then a few exchange
# periods, each period's clock per step from model 0's training rows (logged every T steps, before the
# only evaluation, at the end). The cells resume like the sweep's (`<out>/converged/cells.jsonl`).

def link_settings(quick: bool) -> dict:
    if quick:  # the machinery in seconds (digits, cnn_tiny, 2 workers, 2 periods of 2 updates, 100 Mbit/s)
        return {"rates": [100], "nproc_per_node": 1, "warmup": 2, "periods": 2, "timeout_s": 300,
                "labels": ("all-reduce", "codistillation, paper's teacher (library default, burn-in)", "local SGD"),
                "overrides": ["data.name=digits", "model.name=cnn_tiny", "model.options={}", "data.batch_size=16",
                              "codistill.exchange_every=2"]}
    # the slowest and a fast rate first: what an interrupted run has measured is the extremes
    return {"rates": [10, 100, 25, 1000], "nproc_per_node": 2, "warmup": 25, "periods": 3, "timeout_s": 1200,
            "labels": None, "overrides": []}


def link_arms(st: dict, results: Path | None = None) -> dict:
    """Label -> (experiment, variant): each image arm once (its first source with rows in `results`,
    when given: an arm the table cannot show is not measured), or the quick subset."""
    arms = {}
    for label, experiment, variant, _ in ARMS:
        if (st["labels"] is None or label in st["labels"]) and (results is None or _rows(results, experiment, variant)):
            arms.setdefault(label, (experiment, variant))
    return arms


def link_config(experiment: str, variant: str, st: dict):
    """The arm's suite config (seed 0), cut to warm-up + periods x T updates, one evaluation at the end."""
    from ..config import from_dict, parse_override, set_dotted, to_dict
    from ..experiments.runner import variant_config
    from ..experiments.suite import EXPERIMENTS

    e = EXPERIMENTS[experiment]
    tree = to_dict(variant_config(e, e.variant(variant), 0, False)[0])
    for item in st["overrides"]:
        set_dotted(tree, *parse_override(item))
    period = tree["codistill"]["exchange_every"]
    steps = st["warmup"] + st["periods"] * period
    tree["train"].update(steps=steps, eval_every=steps, log_every=period, progress=False)
    tree["dist"].update(threads=1, nproc=2 * st["nproc_per_node"])
    tree["codistill"]["exchange_hierarchical"] = True
    return from_dict(tree)


def period_seconds_per_step(run_dir: Path, warmup: int) -> list[float]:
    """Model 0's training clock per step over each logged interval after `warmup` (one per period)."""
    from ..run_log import read_jsonl

    times = {r["step"]: r["time"] for r in read_jsonl(run_dir / "model_0" / "metrics.jsonl") if "train/loss" in r}
    marks = [s for s in sorted(times) if s >= warmup]
    return [(times[b] - times[a]) / (b - a) for a, b in zip(marks, marks[1:])]


def measure_link(out: Path, quick: bool = False, results: Path | None = None) -> list[dict]:
    """Every (rate, arm) cell's median s/step on the link, calibration (unshaped veth) first."""
    import os

    from .netns import TwoMachines, torchrun_train
    from .sweep import CELLS, cell_key, load_cells, tensor_bytes

    st = link_settings(quick)
    out = Path(out) / "converged"
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / CELLS
    cells = [c for c in load_cells(cells_path) if c.get("quick", False) == quick]
    done = {cell_key(c) for c in cells}
    sources = link_arms(st, None if quick else results)
    arms = {label: link_config(*source, st) for label, source in sources.items()}
    budget = {label: model_facts(*source)["steps"] for label, source in sources.items()}
    plan = [(rate, [a for a in (list(arms) if i % 2 == 0 else list(arms)[::-1])  # alternate: drifts hit both ends
                    if ("image", rate, a) not in done]) for i, rate in enumerate([None, *st["rates"]])]
    if not any(todo for _, todo in plan):
        return cells
    with TwoMachines(None) as link:
        for rate, todo in plan:
            if not todo:
                continue
            link.shape(rate)
            mbit = link.measure_throughput(nbytes=20_000_000 if rate is None else int(rate * 1e6 / 8 * 0.5))
            for label in todo:
                cfg = arms[label]
                run_dir = out / ("unshaped" if rate is None else f"{rate}mbit") / str(len(cells))
                config_path = run_dir.parent / f"{run_dir.name}.yaml"
                config_path.parent.mkdir(parents=True, exist_ok=True)
                config_path.write_text(dump_yaml(cfg))
                load = os.getloadavg()[0]
                torchrun_train(link, ["--config", str(config_path), "--out", str(run_dir), "--overwrite"],
                               run_dir.parent / f"{run_dir.name}_logs", st["timeout_s"],
                               nproc_per_node=st["nproc_per_node"])
                periods = period_seconds_per_step(run_dir, st["warmup"])
                cell = {"profile": "image", "rate_mbit": rate, "arm": label, "quick": quick, "measured_mbit": mbit,
                        "s_per_step": statistics.median(periods), "period_s_per_step": periods,
                        "steps": cfg.train.steps, "load_before": load, "load_after": os.getloadavg()[0],
                        "model_bytes": tensor_bytes(cfg), "facts": cell_facts(cfg, budget[label])}
                cells.append(cell)
                with cells_path.open("a") as f:  # one line per finished cell: the resume point
                    f.write(json.dumps(cell) + "\n")
                print(f"{rate or 'unshaped'} Mbit/s {label}: {cell['s_per_step']:.3f} s/step "
                      f"(periods {', '.join(f'{p:.3f}' for p in periods)}; load {load:.1f})", flush=True)
    return cells


def cell_facts(cfg, budget: int) -> dict:
    """What the cost model needs of a measured cell's config; steps: the suite's trained budget."""
    c = cfg.codistill
    kind = "allreduce" if c.n_models == 1 else ("codistill" if c.method == "distill" else "outer")
    return {"kind": kind, "world": cfg.dist.nproc, "n": c.n_models, "period": c.exchange_every,
            "delay": c.exchange_delay, "steps": budget}


def link_table(cells: list[dict], targets: dict[str, list[dict]]) -> tuple[str, list[str], dict]:
    """Measured s/step per (arm, rate) beside the two projections, time to each target (name -> the
    converged table's records for it) = measured updates x s/step, measured and projected, and errors.

    Projection "calibration": the cost model from the arm's unshaped cell of the same invocation (its
    s/step less its link time at the veth's measured throughput is its compute), as `bench sweep`.
    Projection "rows": the converged table's own (all-reduce's clock in the suite's rows x the arm's
    compute ratio). Both add the link at the nominal rate for the trained budget's steps."""
    by_target = {name: {r["label"]: r for r in records} for name, records in targets.items()}
    first = next(iter(by_target.values()))
    cal = {c["arm"]: c for c in cells if c["rate_mbit"] is None}
    rows, out = [], []
    for c in sorted((c for c in cells if c["rate_mbit"] is not None and c["arm"] in first and c["arm"] in cal),
                    key=lambda c: (list(first).index(c["arm"]), -c["rate_mbit"])):
        m = {**c["facts"], "grad": c["model_bytes"]["grad"], "state": c["model_bytes"]["state"]}
        calib = cal[c["arm"]]
        compute = max(calib["s_per_step"] - link_s_per_step(m["kind"], 0.0, m, cm.Link(calib["measured_mbit"] * 1e6)),
                      0.0)
        projected = {"calibration": link_s_per_step(m["kind"], compute, m, cm.Link(c["rate_mbit"] * 1e6)),
                     "rows": first[c["arm"]]["per_rate"][str(c["rate_mbit"])]["s_per_step"]}
        error = {k: abs(v - c["s_per_step"]) / c["s_per_step"] for k, v in projected.items()}
        reached = {}
        for name, by_label in by_target.items():
            steps = [h["step"] for h in by_label[c["arm"]]["reach"]]
            updates = statistics.median(steps) if steps and all(isinstance(s, int) for s in steps) else None
            reached[name] = {"updates": updates, **{k: updates * v if updates else None for k, v in
                                                    [("measured", c["s_per_step"]), *projected.items()]}}
        out.append({"arm": c["arm"], "rate_mbit": c["rate_mbit"], "s_per_step": c["s_per_step"],
                    "period_s_per_step": c["period_s_per_step"], "projected_s_per_step": projected, "error": error,
                    "time_to_target_s": reached, "compute_s_calibration": compute})
        rows.append([c["arm"], f"{c['rate_mbit']} Mbit/s",
                     f"{c['s_per_step']:.3f} ({', '.join(f'{p:.2f}' for p in c['period_s_per_step'])})",
                     *[f"{projected[k]:.3f} ({100 * (projected[k] / c['s_per_step'] - 1):+.0f}%)"
                       for k in ("calibration", "rows")],
                     *[f"{r['updates']:.0f}: {r['measured']:.0f} / {r['calibration']:.0f} / {r['rows']:.0f}"
                       if r["updates"] else "not every seed" for r in reached.values()]])
    medians = {}
    for k in ("calibration", "rows"):
        errs = [r["error"][k] for r in out]
        medians[k] = {"s_per_step": statistics.median(errs) if errs else None, "cells": len(errs)}
        for name in targets:
            hit = [r["error"][k] for r in out if r["time_to_target_s"][name]["updates"]]
            medians[k][f"time_to_{name}"] = statistics.median(hit) if hit else None
            medians[k][f"cells_reaching_{name}"] = len(hit)
    table = markdown_table(["arm", "link", "measured s/step: median (periods)", "projected s/step: calibration",
                            "projected s/step: suite rows",
                            *[f"to {name}: updates (measured): s measured / calibration / suite rows"
                              for name in targets]], rows)
    pct = lambda x: fmt(x and 100 * x, ".1f")  # noqa: E731
    notes = [f"cost model's median absolute error over {medians[k]['cells']} measured cells ({k} projection): "
             f"s/step {pct(medians[k]['s_per_step'])}%; time to "
             + "; to ".join(f"{name} {pct(medians[k][f'time_to_{name}'])}% over the "
                            f"{medians[k][f'cells_reaching_{name}']} cells whose arm reaches it" for name in targets)
             + " (the same measured updates multiply both: cell by cell the time error is the s/step error)"
             for k in ("calibration", "rows")]
    loads = [x for c in cells for x in (c["load_before"], c["load_after"])]
    notes.append(f"1-minute load average during the link cells: {min(loads):.1f} - {max(loads):.1f} "
                 "(shared host); calibration ran in the same invocation.")
    return table, notes, {"cells": out, "median_error": medians, "load_average": [min(loads), max(loads)]}


def main() -> None:
    import argparse

    from .common import write_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("results"), help="the suite's results directory")
    p.add_argument("--teacher-cost", type=Path, help="a `bench step_overhead` step_overhead.json (or its "
                   "teacher_cost part); without it, the arms' own clocks give their compute ratios")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--measure-link", action="store_true", help="also measure each image arm's s/step on "
                   "two emulated machines at every rate (root; resumes from OUT/converged/cells.jsonl)")
    p.add_argument("--quick", action="store_true", help="with --measure-link: digits, a few updates, 100 Mbit/s")
    args = p.parse_args()
    cost = None
    if args.teacher_cost:  # a step_overhead.json, or its teacher_cost part alone
        cost = json.loads(args.teacher_cost.read_text())
        cost = cost["data"]["teacher_cost"] if "data" in cost else cost
    cells = measure_link(args.out, args.quick, args.results) if args.measure_link else None
    result = build(args.results, cost, cells)
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)
    print(result.markdown())


if __name__ == "__main__":
    main()
