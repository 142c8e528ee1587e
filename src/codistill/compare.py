"""`codistill compare`: the matched arms of `arms.py` (same workers W, same updates S), one after
another through the same trainer, then one table and what it can be trusted for.

Per arm, beside accuracy, bytes and time: whether its validation metric had stopped improving over
the last quarter (the budget rule, `convergence.py`, applied to every model) and its measured compute
per step relative to all-reduce's (what the teachers' forwards cost). Under the table: a line when an
arm had not converged, and the cost model's projected time to all-reduce's final accuracy (less
TARGET_MARGIN) over links of PROJECTED_RATES between the model groups (`--link RATE`: one more rate,
in detail). Before launch: a warning when the run is too short for its recipe to converge.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from . import tasks
from .arms import arm_configs, without_outer_sync_for_mixed_models
from .config import Config, to_dict
from .convergence import TARGET_MARGIN, ArmConvergence, judge_arm, not_converged_line, short_run_warning
from .curves import compute_seconds_per_step, training_clock, validation_curve
from .distributed import is_leader, torchrun_world_size, under_torchrun
from .launch import train
from .run_log import atomic_write_text, prepare_run_dir, write_json

PROJECTED_RATES = (1e9, 1e8, 1e7)
"""Links printed under every table: a fast data-center link, and two slow ones where the choice of
method decides (issue 29; the sweep measures 1 Gbit/s to 10 Mbit/s)."""


def run_compare(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None,
                link_bps: float | None = None) -> dict:
    # Under torchrun every process runs this: the world is torchrun's, and only rank 0 touches
    # the directory and writes reports (each arm's own directory is prepared inside `train`).
    leader = is_leader()
    world = torchrun_world_size() if under_torchrun() else (nproc if nproc is not None else cfg.dist.nproc)
    cfg, left_out = without_outer_sync_for_mixed_models(cfg)
    arms = arm_configs(cfg, world)  # validate every arm before training any
    if leader:
        from .prelaunch import warn_before_launch

        if left_out:
            print(f"codistill: warning: {left_out}", file=sys.stderr, flush=True)
        warn_before_launch([c for _, c in arms], world, given=cfg)
        short = short_run_warning(cfg, max(c.train.steps for _, c in arms))
        if short:
            print(f"codistill: warning: {short}", file=sys.stderr, flush=True)
    out = prepare_run_dir(out, overwrite, config=to_dict(cfg)) if leader else Path(out)
    results = []
    for name, arm_cfg in arms:
        if leader:
            print(f"== arm {name}: {arm_cfg.codistill.n_models} model(s) x "
                  f"{world // arm_cfg.codistill.n_models} worker(s), {arm_cfg.train.steps} steps", flush=True)
        summary = train(arm_cfg, out / name, overwrite=overwrite, nproc=world)
        results.append({"name": name, "summary": summary})
    if not leader:
        return {"arms": results}
    metric = "val/accuracy" if tasks.task_class(cfg) is tasks.ClassificationTask else "val/loss"
    report, table = judge_and_project(results, dict(arms), out, metric, link_bps)
    write_json(out / "compare.json", report)
    atomic_write_text(out / "compare.md", compare_markdown(results, table))
    from .plots import plot_compare  # training never imports matplotlib

    plot_compare(out, [name for name, _ in arms])
    print(table, flush=True)
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'} and plots in {out}", flush=True)
    return report


def judge_and_project(results: list[dict], configs: dict, out: Path, metric: str,
                      link_bps: float | None) -> tuple[dict, str]:
    """compare.json's content and the printed text: the table with the budget rule and the compute
    per step of every arm, the line when an arm had not converged, and the projections."""
    verdicts = {}
    for r in results:
        verdicts[r["name"]] = verdict = arm_convergence(out / r["name"], r["summary"], metric)
        r["convergence"] = {"metric": metric, "changes": list(verdict.changes), "converged": verdict.converged}
        r["compute_s_per_step"] = compute_seconds_per_step(out / r["name"])
    report, table = {"arms": results}, format_table(results)
    budget = not_converged_line(verdicts)
    if budget:
        table += "\n\n" + budget
    reference = reference_arm(results)
    report["projections"] = [{"bits_per_s": rate, "arms": link_projection(results, configs, out, rate)}
                             for rate in PROJECTED_RATES]
    table += "\n\n" + projections_table(report["projections"], reference)
    if link_bps is not None:  # one more rate, in detail
        report["link"] = {"bits_per_s": link_bps, "arms": link_projection(results, configs, out, link_bps)}
        table += "\n\n" + projection_table(report["link"]["arms"], link_bps, reference)
    return report, table


def arm_convergence(run_dir: Path, summary: dict, metric: str) -> ArmConvergence:
    """The budget rule on every model of one finished arm (its logged validation curves)."""
    curves = [validation_curve(run_dir, m["index"], metric) for m in summary["models"]]
    return judge_arm(curves, summary["steps"], metric)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def cross_groups(results: list[dict]) -> int:
    """Model groups of the comparison (machines, when each model group has its own)."""
    return max(r["summary"]["n_models"] for r in results)


def link_projection(results: list[dict], configs: dict, out: Path, link_bps: float) -> list[dict]:
    """Each arm's cost-model projection onto a link of `link_bps` between model groups."""
    from .cost_model import Link, project_arm

    target = projection_target(reference_arm(results))
    projected = []
    for r in results:
        c = configs[r["name"]].codistill
        period = configs[r["name"]].outer.every or c.exchange_every
        crossing = 1 if c.exchange_hierarchical else None
        projected.append(project_arm(r["name"], r["summary"], training_clock(out / r["name"]), target,
                                     Link(link_bps), cross_groups(results), delay=c.exchange_delay,
                                     compute_s=r.get("compute_s_per_step"), crossing=crossing, period=period))
    return projected


def projection_target(reference: dict) -> float:
    return reference["summary"]["models"][0]["val_accuracy"] - TARGET_MARGIN


def reference_arm(results: list[dict]) -> dict:
    """The arm whose final accuracy is the target: all-reduce when compared, else the first."""
    return next((r for r in results if r["name"] == "allreduce"), results[0])


def projection_table(projected: list[dict], link_bps: float, reference: dict) -> str:
    from .cost_model import format_rate

    rows = [f"Projected on a {format_rate(link_bps)} link between model groups (cost model, one model group "
            f"per machine; target: {_target_words(reference)}):",
            "", "| arm | local s/step (measured) | projected s/step | step at target | projected time to target (s) |",
            "|" + "---|" * 5]
    for p in projected:
        rows.append(f"| {p['name']} | {_fmt(p['local_s_per_step'], '.3f')} | {_fmt(p['s_per_step'], '.3f')} | "
                    f"{_fmt(p['steps_to_target'], 'd', 'not reached')} | "
                    f"{_fmt(p['time_to_target_s'], '.1f', 'not reached' if p['s_per_step'] else '-')} |")
    return "\n".join(rows)


def projections_table(projections: list[dict], reference: dict) -> str:
    """Time to the target per arm (rows) and link rate (columns), x how much sooner than the reference."""
    from .cost_model import format_rate

    rates = [p["bits_per_s"] for p in projections]
    rows = [f"Projected time to {_target_words(reference)}, with each model group on its own machine and "
            "the machines joined by a link of each rate (cost model, docs/performance.md section 6: the "
            "compute per step measured here plus what crosses the link; not a measurement):", "",
            "| arm | compute s/step (measured) | step at target | "
            + " | ".join(format_rate(rate) for rate in rates) + " |", "|" + "---|" * (3 + len(rates))]
    for i, r in enumerate(projections[0]["arms"]):
        cells = []
        for proj in projections:
            p, ref = proj["arms"][i], next(a for a in proj["arms"] if a["name"] == reference["name"])
            if p["time_to_target_s"] is None:
                cells.append("-" if p["s_per_step"] is None else "not reached")
                continue
            sooner = (f" ({ref['time_to_target_s'] / p['time_to_target_s']:.2f}x)"
                      if ref["time_to_target_s"] and p["name"] != reference["name"] else "")
            cells.append(f"{_seconds(p['time_to_target_s'])}{sooner}")
        best = (f"not reached (best {100 * r['best_accuracy']:.2f}% at step {r['best_step']})"
                if r["steps_to_target"] is None and r["best_accuracy"] is not None else _fmt(r["steps_to_target"], "d"))
        compute = r["compute_s_per_step"] if r["compute_s_per_step"] is not None else r["local_s_per_step"]
        rows.append(f"| {r['name']} | {_fmt(compute, '.3f')} | {best} | " + " | ".join(cells) + " |")
    rows += ["", f"(Nx): N times as fast to the target as {reference['name']} over the same link."]
    return "\n".join(rows)


def _target_words(reference: dict) -> str:
    final = 100 * reference["summary"]["models"][0]["val_accuracy"]
    return (f"{100 * projection_target(reference):.2f}% validation accuracy (the {reference['name']} arm's "
            f"final {final:.2f}%, model 0, less {100 * TARGET_MARGIN:.1f} points)")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 100 else f"{s:,.0f} s"


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    if all("val_perplexity" in m and "test_bleu" not in m for r in results for m in r["summary"]["models"]):
        return format_lm_table(results)
    from .cost_model import cross_group_bytes_per_step

    head = ("| arm | models x workers | steps | val acc per model (%) | ensemble val acc (%) | "
            "test acc model 0 (%) | train loss | param distance | all-reduce bytes/worker | "
            "exchange bytes/worker | eval bytes/worker | cross-group bytes/step | wall (s) | "
            "compute/step vs all-reduce | converged (last quarter) |")
    rows = [head, "|" + "---|" * 15]
    for r in results:
        s = r["summary"]
        accs = " / ".join(f"{100 * m['val_accuracy']:.2f}" for m in s["models"])
        loss = sum(m["train_loss"] for m in s["models"]) / len(s["models"])
        dist_ = sum(m["param_distance"] for m in s["models"]) / len(s["models"])
        ens = f"{100 * s['ensemble_val_accuracy']:.2f}" if s["n_models"] > 1 else "-"
        rows.append(f"| {r['name']} | {s['n_models']} x {s['replicas']} | {s['steps']} | {accs} | {ens} | "
                    f"{100 * s['models'][0]['test_accuracy']:.2f} | {loss:.4f} | {dist_:.2f} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['allreduce'])} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['exchange'])} | {_eval_bytes(s)} | "
                    f"{_fmt_bytes(cross_group_bytes_per_step(s, cross_groups(results)))} | {s['wall_seconds']:.0f} | "
                    f"{_checks(r, results)}")
    return "\n".join(rows)


def format_lm_table(results: list[dict]) -> str:
    """Language models: perplexity (exp of NLL per token) instead of accuracy; samples/s are tokens/s."""
    head = ("| arm | models x workers | steps | val ppl per model | ensemble val ppl | test ppl model 0 | "
            "train loss | all-reduce bytes/worker | exchange bytes/worker | eval bytes/worker | tokens/s | "
            "wall (s) | compute/step vs all-reduce | converged (last quarter) |")
    rows = [head, "|" + "---|" * 14]
    for r in results:
        s = r["summary"]
        ppl = " / ".join(f"{m['val_perplexity']:.1f}" for m in s["models"])
        loss = sum(m["train_loss"] for m in s["models"]) / len(s["models"])
        ens = f"{math.exp(min(s['ensemble_val_loss'], 700.0)):.1f}" if s["n_models"] > 1 else "-"
        rows.append(f"| {r['name']} | {s['n_models']} x {s['replicas']} | {s['steps']} | {ppl} | {ens} | "
                    f"{s['models'][0]['test_perplexity']:.1f} | {loss:.4f} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['allreduce'])} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['exchange'])} | {_eval_bytes(s)} | {s['samples_per_s']:.0f} | "
                    f"{s['wall_seconds']:.0f} | {_checks(r, results)}")
    return "\n".join(rows)


def _eval_bytes(summary: dict) -> str:
    """What the arm's evaluations sent between its models, per worker ("-" in summaries from before
    it was counted)."""
    value = summary["bytes_per_worker"].get("eval")
    return "-" if value is None else _fmt_bytes(value)


def _checks(arm: dict, results: list[dict]) -> str:
    """The last two cells: compute per step relative to the reference arm's, and the budget rule."""
    ref = reference_arm(results).get("compute_s_per_step")
    mine = arm.get("compute_s_per_step")
    ratio = f"{mine / ref:.2f}x" if mine is not None and ref else "-"
    c = arm.get("convergence")
    verdict = ArmConvergence(c["metric"], tuple(c["changes"])).cell() if c else "-"
    return f"{ratio} | {verdict} |"


def compare_markdown(results: list[dict], table: str) -> str:
    lines = ["# Matched comparison: all-reduce, codistillation and their peers", "",
             "Same number of workers and of updates in every arm. Train loss and parameter distance "
             "are means over the arm's models; val is the held-out validation split, test the test split. "
             "Cross-group bytes/step: what would cross between the model groups if each had its own machine "
             "(the all-reduce arm spread over as many): all-reduce's ring edges between them every step, "
             "codistillation's exchanges only, DiLoCo's and local SGD's outer all-reduces. Eval bytes/worker: "
             "what the arm's evaluations sent between its models (per scored position each model's "
             "log-probability of the target, top-1 and top-k; codistill/evaluation.py). Compute/step vs "
             "all-reduce: each arm's training clock per step without evaluations and without time blocked "
             "in its exchange (own step, teacher forwards, the all-reduce inside its model group), over "
             "all-reduce's. Converged: the budget rule (validation accuracy rising < 0.2 points, or NLL "
             "falling < 0.02 nats, over the last quarter) on every model of the arm; the worst model's "
             "change in brackets.",
             "", table, "", "Plots: train_loss.png, val_accuracy.png, param_distance.png "
             "(model 0 of each arm, as the paper evaluates its first model).", ""]
    for r in results:
        lines.append(f"- `{r['name']}`: run directory `{r['name']}/` (config.yaml, summary.json, "
                     "model_*/metrics.jsonl, TensorBoard events)")
    return "\n".join(lines) + "\n"


def load_compare(out: str | Path) -> dict:
    return json.loads((Path(out) / "compare.json").read_text())
