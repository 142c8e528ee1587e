"""The matched comparison: same workers W, same updates S, one trainer.

Arms (Sodhani et al., Sec. 3-4):
- allreduce: one model on all W workers for S steps (the config's epochs fix S);
- codistill: n models of W/n workers each, the same S steps; every epoch-valued setting (warm-up,
  milestones) is rescaled so the schedules hit the same steps, as the paper halves its milestones;
- codistill_regularized: as codistill, with weight decay decaying at the LR milestones
  (wd, wd/10, 0 by default) and optionally shifted milestones, accounting for codistillation's
  own regularization;
- diloco / localsgd: the codistill arm's grid and schedules, with an outer step (DiLoCo's outer
  Nesterov SGD / plain averaging) every H = T steps instead of distillation (`codistill.outer_sync`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import tasks
from .config import Config, check_world_size, replace
from .errors import ConfigError
from .distributed import is_leader, torchrun_world_size, under_torchrun
from .launch import train
from .recipe import total_steps
from .run_log import atomic_write_text, prepare_run_dir, write_json


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Steps for one model to pass over its training data (matches ShardBatchSampler)."""
    check_world_size(cfg, world_size)
    return tasks.steps_per_epoch(cfg, world_size)


def regularized_weight_decay(cfg: Config) -> list[float]:
    if cfg.compare.regularized_weight_decay is not None:
        return list(cfg.compare.regularized_weight_decay)
    wd = cfg.optim.weight_decay
    base = wd[0] if isinstance(wd, list) else wd
    stages = len(cfg.compare.regularized_milestones or cfg.schedule.milestones) + 1
    if stages == 1:
        raise ConfigError("codistill_regularized decays weight decay at the LR milestones, but "
                          "schedule.milestones is empty; set it or compare.regularized_weight_decay")
    return ([base, base / 10] + [0.0] * stages)[:stages]


def arm_configs(cfg: Config, world_size: int) -> list[tuple[str, Config]]:
    """The configs of the requested arms, matched in workers and updates."""
    n = cfg.codistill.n_models if cfg.codistill.n_models > 1 else 2
    first_name = cfg.model_names()[0]
    allreduce = replace(cfg, codistill__n_models=1, model__name=first_name)
    spe_ar = steps_per_epoch(allreduce, world_size)
    steps = total_steps(allreduce, spe_ar)
    allreduce = replace(allreduce, train__steps=steps)

    codistill = replace(cfg, codistill__n_models=n, codistill__method="distill")
    if isinstance(cfg.model.name, list) and len(cfg.model.name) != n:
        raise ConfigError(f"model.name lists {len(cfg.model.name)} models for {n} codistilled models")
    spe_cd = steps_per_epoch(codistill, world_size)
    scale = spe_ar / spe_cd  # all-reduce epochs -> codistill epochs at equal steps

    def rescaled(milestones):
        return [m * scale for m in milestones]

    s = cfg.schedule
    codistill = replace(codistill, train__steps=steps, train__epochs=steps / spe_cd,
                        schedule__warmup_epochs=s.warmup_epochs * scale,
                        schedule__milestones=rescaled(s.milestones))
    arms = {"allreduce": allreduce, "codistill": codistill}
    if "codistill_regularized" in cfg.compare.arms:
        milestones = cfg.compare.regularized_milestones or s.milestones
        arms["codistill_regularized"] = replace(codistill, schedule__milestones=rescaled(milestones),
                                                optim__weight_decay=regularized_weight_decay(cfg))
    for method in ("diloco", "localsgd"):
        if method in cfg.compare.arms:
            arms[method] = replace(codistill, codistill__method=method)
    return [(name, arms[name]) for name in cfg.compare.arms]


def run_compare(cfg: Config, out: str | Path, overwrite: bool = False, nproc: int | None = None,
                link_bps: float | None = None) -> dict:
    # Under torchrun every process runs this: the world is torchrun's, and only rank 0 touches
    # the directory and writes reports (each arm's own directory is prepared inside `train`).
    leader = is_leader()
    world = torchrun_world_size() if under_torchrun() else (nproc if nproc is not None else cfg.dist.nproc)
    arms = arm_configs(cfg, world)  # validate every arm before training any
    if leader:
        from .prelaunch import warn_before_launch

        warn_before_launch([c for _, c in arms], world)
    out = prepare_run_dir(out, overwrite) if leader else Path(out)
    results = []
    for name, arm_cfg in arms:
        if leader:
            print(f"== arm {name}: {arm_cfg.codistill.n_models} model(s) x "
                  f"{world // arm_cfg.codistill.n_models} worker(s), {arm_cfg.train.steps} steps", flush=True)
        summary = train(arm_cfg, out / name, overwrite=overwrite, nproc=world)
        results.append({"name": name, "summary": summary})
    report = {"arms": results}
    if not leader:
        return report
    table = format_table(results)
    if link_bps is not None:  # what the arms would cost with a slow link between model groups
        report["link"] = {"bits_per_s": link_bps, "arms": link_projection(results, dict(arms), out, link_bps)}
        table += "\n\n" + projection_table(report["link"]["arms"], link_bps, reference_arm(results))
    write_json(out / "compare.json", report)
    atomic_write_text(out / "compare.md", compare_markdown(results, table))
    from .plots import plot_compare  # training never imports matplotlib

    plot_compare(out, [name for name, _ in arms])
    print(table, flush=True)
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.json'} and plots in {out}", flush=True)
    return report


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
    from .bench.slow_network import training_clock
    from .cost_model import Link, project_arm

    target = reference_arm(results)["summary"]["models"][0]["val_accuracy"]
    return [project_arm(r["name"], r["summary"], training_clock(out / r["name"]), target, Link(link_bps),
                        cross_groups(results), delay=configs[r["name"]].codistill.exchange_delay)
            for r in results]


def reference_arm(results: list[dict]) -> dict:
    """The arm whose final accuracy is the target: all-reduce when compared, else the first."""
    return next((r for r in results if r["name"] == "allreduce"), results[0])


def projection_table(projected: list[dict], link_bps: float, reference: dict) -> str:
    from .cost_model import format_rate

    target = 100 * reference["summary"]["models"][0]["val_accuracy"]
    rows = [f"Projected on a {format_rate(link_bps)} link between model groups (cost model, one model group "
            f"per machine; target: {target:.2f}% val accuracy, the {reference['name']} arm's final, model 0):",
            "", "| arm | local s/step (measured) | projected s/step | step at target | projected time to target (s) |",
            "|" + "---|" * 5]
    for p in projected:
        rows.append(f"| {p['name']} | {_fmt(p['local_s_per_step'], '.3f')} | {_fmt(p['s_per_step'], '.3f')} | "
                    f"{_fmt(p['steps_to_target'], 'd', 'not reached')} | "
                    f"{_fmt(p['time_to_target_s'], '.1f', 'not reached' if p['s_per_step'] else '-')} |")
    return "\n".join(rows)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_table(results: list[dict]) -> str:
    if all("val_perplexity" in m and "test_bleu" not in m for r in results for m in r["summary"]["models"]):
        return format_lm_table(results)
    from .cost_model import cross_group_bytes_per_step

    head = ("| arm | models x workers | steps | val acc per model (%) | ensemble val acc (%) | "
            "test acc model 0 (%) | train loss | param distance | all-reduce bytes/worker | "
            "exchange bytes/worker | cross-group bytes/step | wall (s) |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        s = r["summary"]
        accs = " / ".join(f"{100 * m['val_accuracy']:.2f}" for m in s["models"])
        loss = sum(m["train_loss"] for m in s["models"]) / len(s["models"])
        dist_ = sum(m["param_distance"] for m in s["models"]) / len(s["models"])
        ens = f"{100 * s['ensemble_val_accuracy']:.2f}" if s["n_models"] > 1 else "-"
        rows.append(f"| {r['name']} | {s['n_models']} x {s['replicas']} | {s['steps']} | {accs} | {ens} | "
                    f"{100 * s['models'][0]['test_accuracy']:.2f} | {loss:.4f} | {dist_:.2f} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['allreduce'])} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['exchange'])} | "
                    f"{_fmt_bytes(cross_group_bytes_per_step(s, cross_groups(results)))} | {s['wall_seconds']:.0f} |")
    return "\n".join(rows)


def format_lm_table(results: list[dict]) -> str:
    """Language models: perplexity (exp of NLL per token) instead of accuracy; samples/s are tokens/s."""
    head = ("| arm | models x workers | steps | val ppl per model | ensemble val ppl | test ppl model 0 | "
            "train loss | all-reduce bytes/worker | exchange bytes/worker | tokens/s | wall (s) |")
    rows = [head, "|" + "---|" * 11]
    for r in results:
        s = r["summary"]
        ppl = " / ".join(f"{m['val_perplexity']:.1f}" for m in s["models"])
        loss = sum(m["train_loss"] for m in s["models"]) / len(s["models"])
        ens = f"{math.exp(min(s['ensemble_val_loss'], 700.0)):.1f}" if s["n_models"] > 1 else "-"
        rows.append(f"| {r['name']} | {s['n_models']} x {s['replicas']} | {s['steps']} | {ppl} | {ens} | "
                    f"{s['models'][0]['test_perplexity']:.1f} | {loss:.4f} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['allreduce'])} | "
                    f"{_fmt_bytes(s['bytes_per_worker']['exchange'])} | {s['samples_per_s']:.0f} | "
                    f"{s['wall_seconds']:.0f} |")
    return "\n".join(rows)


def compare_markdown(results: list[dict], table: str) -> str:
    lines = ["# Matched comparison: all-reduce vs codistillation", "",
             "Same number of workers and of updates in every arm. Train loss and parameter distance "
             "are means over the arm's models; val is the held-out validation split, test the test split. "
             "Cross-group bytes/step: what would cross between the model groups if each had its own machine "
             "(the all-reduce arm spread over as many): all-reduce's ring edges between them every step, "
             "codistillation's exchanges only.",
             "", table, "", "Plots: train_loss.png, val_accuracy.png, param_distance.png "
             "(model 0 of each arm, as the paper evaluates its first model).", ""]
    for r in results:
        lines.append(f"- `{r['name']}`: run directory `{r['name']}/` (config.yaml, summary.json, "
                     "model_*/metrics.jsonl, TensorBoard events)")
    return "\n".join(lines) + "\n"


def load_compare(out: str | Path) -> dict:
    return json.loads((Path(out) / "compare.json").read_text())
