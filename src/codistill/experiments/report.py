"""`docs/results.md` from the result rows: per finding the paper's claim, our setting, the command,
a table (mean ± std over seeds), the plot and the verdict. Every number comes from a row."""

from __future__ import annotations

import os
from pathlib import Path

from ..run_log import atomic_write_text
from . import results as res
from .budget import ACC_RISE, NLL_DROP, budget_line, convergence
from .plots import plot_budget, plot_experiment
from .runner import base_config, load_rows
from .suite import EPOCH_FIELDS, EXPERIMENTS, Experiment, Variant
from .verdicts import ACC_FLOOR, NLL_FLOOR, NOT_RUN, Table, judge, judge_budgets


def rows_for_report(rows: list[dict]) -> tuple[list[dict], float | None]:
    """The rows of one budget: the suite's own (1.0) when present, else the largest run."""
    budgets = sorted({r.get("budget", 1.0) for r in rows})
    if not budgets:
        return [], None
    budget = 1.0 if 1.0 in budgets else budgets[-1]
    return [r for r in rows if r.get("budget", 1.0) == budget], budget


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def describe_variant(v: Variant) -> str:
    parts = []
    scale = dict(v.scale)
    epoch_factors = {scale.pop(k) for k in EPOCH_FIELDS if k in scale}
    if len(epoch_factors) == 1:
        parts.append(f"budget and every epoch-valued setting x {_fmt_value(epoch_factors.pop())}")
    parts += [f"{k}={_fmt_value(x)}" for k, x in v.set.items()]
    parts += [f"{k} x {_fmt_value(x)}" for k, x in scale.items()]
    parts += [f"{k}={_fmt_value(x)} (after deriving the arm)" for k, x in v.after.items()]
    if v.teacher_run:
        parts.append(f"the last model alone on its model group's workers, distilled from the other models of "
                     f"`{v.teacher_run}` (same seed) frozen at their last step (codistill.exchange=frozen)")
    if not v.judged:
        parts.append("reported beside the verdict, not waited for")
    return f"`{v.name}`: arm `{v.arm}`" + (f", {', '.join(parts)}" if parts else "")


def _arm_line(c: dict, name: str) -> str:
    n, r = c["n_models"], c["replicas"]
    return (f"{name} {n} x {r} (batch {c['model_batch']} per model, {c['batch_per_worker']} per worker, "
            f"peak LR {c['peak_lr']:g})")


def _departures(v: Variant) -> int:
    """How many ways `v` departs from the suite's base (0: a base variant)."""
    return (sum(x != 1 for x in v.scale.values()) > 0) + bool(v.set) + bool(v.after) + (v.x not in (None, 1))


def _base_row(experiment: Experiment, rows: list[dict]) -> dict | None:
    """The row of the variant closest to the base (F7's setting is T x 1, not its first variant)."""
    rank = {v.name: (_departures(v), i) for i, v in enumerate(experiment.variants)}
    return min(rows, key=lambda r: rank.get(r["variant"], (99, 0)), default=None)


def describe_setting(experiment: Experiment, rows: list[dict], quick: bool) -> str:
    """Model, data, workers, steps, T and recipe: from the rows when there are any, else from the
    experiment's base config (steps are then fixed at run time by the epochs)."""
    ar = _base_row(experiment, [r for r in rows if r["config"]["n_models"] == 1])
    cd = _base_row(experiment, [r for r in rows if r["config"]["n_models"] > 1])
    if ar is None and cd is None:
        cfg = base_config(experiment, quick)
        world = cfg.dist.nproc
        from ..config import replace

        ar_c = res.config_values(replace(cfg, codistill__n_models=1), world)
        cd_c = res.config_values(cfg, world)
        steps = f"{cfg.train.steps} updates" if cfg.train.steps else \
            f"{cfg.train.epochs:g} all-reduce epochs of updates (the count is fixed at run time)"
    else:
        ar_c = ar["config"] if ar else None
        cd_c = cd["config"] if cd else None
        first = (ar or cd)
        steps = f"{first['steps']} updates"
        if ar:
            steps += f" ({ar['epochs_run']:.2f} all-reduce epochs)"
        steps += " in the base variant"
    c = ar_c or cd_c
    data = f"{c['data']}" + (f" (training fraction {c['fraction']:g})" if c["fraction"] != 1 else "")
    options = f" {_fmt_value(c['model_options'])}" if c["model_options"] else ""
    arms = "; ".join(x for x in (_arm_line(ar_c, "all-reduce") if ar_c else "",
                                 _arm_line(cd_c, "codistillation") if cd_c else "") if x)
    wd = c["weight_decay"]
    lines = [f"model `{_fmt_value(c['model'])}`{options}; data `{data}`; W = {c['world_size']} workers: {arms}",
             f"{steps}; {c['optimizer']} base LR {c['lr']:g}, schedule `{c['schedule']}`"
             + (f" (milestones at {_fmt_value(c['milestones'])} "
                f"{'all-reduce' if c is ar_c else 'codistillation'} epochs)"
                if c["milestones"] and (c["schedule"] == "goyal" or isinstance(wd, list)) else "")
             + f", weight decay {_fmt_value(wd)}, label smoothing {c['label_smoothing']:g}"]
    if cd_c:
        lines.append(f"T = {cd_c['exchange_every']} steps, alpha = {cd_c['alpha']:g}, distillation loss "
                     f"`{cd_c['distill_loss']}`")
    if experiment.family == "translation":
        lines.append("batches count source + target tokens")
    elif experiment.family == "lm":
        lines.append("batches count tokens, in fixed-length blocks of lm.context tokens")
    return "; ".join(lines) + "."


def results_table(experiment: Experiment, rows: list[dict], selected: str | None) -> str:
    columns = [res.METRICS[c] for c in experiment.columns]
    head = "| variant | seeds | steps | " + " | ".join(m.header for m in columns) + " |"
    lines = [head, "|" + "---|" * (3 + len(columns))]
    names = [v.name for v in experiment.variants]
    for name in names + sorted({r["variant"] for r in rows} - set(names)):
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            lines.append(f"| `{name}` | 0 | – | " + " | ".join("–" for _ in columns) + " |")
            continue
        cells = []
        for key, m in zip(experiment.columns, columns):
            s = res.aggregate(mine, key).get(name)
            cells.append(s.fmt(m.digits) if s else "–")
        steps = sorted({r["steps"] for r in mine})
        label = f"`{name}`" + (" (selected on val)" if name == selected else "")
        lines.append(f"| {label} | {len(mine)} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_for(experiment: Experiment, quick: bool, out: str, budget: float | None = None) -> str:
    cmd = f"codistill reproduce {experiment.name}"
    cmd += " --quick" if quick else " --seeds 3"
    if budget not in (None, 1.0):
        cmd += f" --budget {budget:g}"
    return cmd + (f" --out {out}" if out != "results" else "")


def read_notes(out: Path) -> dict[str, str]:
    """Hand-written discussion from `<out>/notes.md`: the text under each `## NAME` heading (an
    experiment's name, or `Summary`). The verdicts stay computed; the notes explain them."""
    path = out / "notes.md"
    if not path.is_file():
        return {}
    notes: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            notes[current] = []
        elif current is not None:
            notes[current].append(line)
    return {name: "\n".join(lines).strip() for name, lines in notes.items() if "\n".join(lines).strip()}


def compute_line(rows: list[dict]) -> str:
    """What the experiment cost to run, from its rows' `total_seconds` (reused rows cost nothing)."""
    own = [r for r in rows if not r.get("reused_from") and r.get("total_seconds")]
    if not own:
        return "Compute: every row reuses another experiment's run."
    parts = []
    for which, mine in (("trained budget", [r for r in own if r["variant"].endswith("-trained")]),
                        ("other budgets", [r for r in own if not r["variant"].endswith("-trained")])):
        if mine:
            minutes = sum(r["total_seconds"] for r in mine) / 60
            seeds = len({r["seed"] for r in mine})
            parts.append(f"{which} {minutes / seeds:.0f} min per seed ({len(mine)} runs)")
    if len(parts) == 1 and not any(r["variant"].endswith("-trained") for r in own):
        parts = [parts[0].removeprefix("other budgets ")]
    return ("Compute, measured (`total_seconds`, reused rows not counted; on whatever machine made them): "
            + ", ".join(parts) + ".")


def judged_budget(experiment: Experiment, rows: list[dict]) -> tuple[str, list[str]]:
    """(suffix, all-reduce variants) of the budget the report judges and shows the rule for: the
    trained budget once any all-reduce row has it, else the base budget ([] for an experiment with
    one budget: the rule then takes the longest all-reduce run)."""
    if not experiment.trained:
        return "", []
    ran = {r["variant"] for r in rows if r.get("arm") == "allreduce"}
    for suffix in (experiment.trained, ""):
        names = [v.name for v in experiment.variants if v.arm == "allreduce" and v.name in ran
                 and v.name.endswith(experiment.trained) == bool(suffix)]
        if names:
            return suffix, names
    return "", []


def standing(budgets: dict[str, tuple[str, str]], trained: bool) -> str:
    """Where a claim stands across budgets, in a few words (the summary table)."""
    base, at_trained = (budgets[k][0].split(" (")[0] for k in ("base", "trained"))
    if not trained:
        return f"{base} (one budget)"
    if at_trained == NOT_RUN:
        return f"{base} at the base budget; the trained budget has not fully run"
    if at_trained in ("reproduced", "confirmed"):
        return "holds at the trained budget"
    if at_trained == "partly":
        return "partly holds at the trained budget"
    if base in ("reproduced", "confirmed"):
        return "holds only at the short budget"
    return "does not hold at this scale"


def section(experiment: Experiment, all_rows: list[dict], out: Path, doc_dir: Path, quick: bool,
            out_arg: str, note: str | None = None) -> tuple[str, str, str]:
    """(markdown section, verdict, summary-table row); draws the experiment's plots from the same rows."""
    rows, budget = rows_for_report(all_rows)
    verdict, reason = judge(experiment, rows)
    budgets = judge_budgets(experiment, rows)
    nll = experiment.family in ("translation", "lm")
    suffix, rule_variants = judged_budget(experiment, rows)
    rule = convergence(rows, nll, rule_variants[0] if rule_variants else None)
    converged = "not shown" if rule is None else (
        f"{'yes' if rule.converged else 'no'} ({rule.steps} updates: "
        + (f"val accuracy {100 * rule.change:+.2f} points" if rule.metric == "val/accuracy"
           else f"val NLL {-rule.change:+.3f} nats") + " over the last quarter)")
    summary_row = (f"| [{experiment.name}: {experiment.title}](#{_anchor(experiment)}) | {verdict} | "
                   f"{standing(budgets, bool(experiment.trained))} | {converged} |")
    if rows and budget != 1.0 and verdict != NOT_RUN:
        verdict += f" (reduced budget x{budget:g})"
    table = Table(experiment, rows)
    selected = table.selected() if rows and experiment.select else None
    rel = lambda p: os.path.relpath(p, doc_dir)  # noqa: E731
    plot = plot_experiment(experiment, rows, out / f"{experiment.name}.png") if rows else None
    curves = plot_budget(experiment, rows, rule_variants or ([rule.variant] if rule else []),
                         out / f"{experiment.name}-budget.png", nll) if rows else None
    variants = "\n".join(f"- {describe_variant(v)}" for v in experiment.variants)
    lines = [f"## {experiment.name}: {experiment.title}", "",
             f"**The paper's claim.** {experiment.claim}", "",
             f"**Our setting.** {describe_setting(experiment, rows, quick)}", "",
             f"Variants (seed k trains with train.seed = 100k; {seed_derivation(rows)}):",
             "", variants, "",
             "**Command.**", "", "```bash", command_for(experiment, quick, out_arg), "```", ""]
    if rows:
        seeds = sorted({r["seed"] for r in rows})
        link = rel(res.results_file(out, experiment.name))
        provenance = f"Rows: [`{link}`]({link}), {len(rows)} rows, seeds {', '.join(map(str, seeds))}."
        commands = sorted({r["command"] for r in rows if r.get("command")})
        provenance += " Made by " + ", ".join(f"`{c}`" for c in commands) + "."
        provenance += " " + compute_line(rows)
        if budget != 1.0:
            provenance += (f" **Reduced budget:** every epoch-valued setting x {budget:g} "
                           f"(`--budget {budget:g}`); these rows are not the suite's measurement.")
        lines += [provenance, "", "Mean ± standard deviation over seeds (one seed: the value alone).", "",
                  results_table(experiment, rows, selected), "",
                  budget_line(rows, nll, rule_variants[0] if rule_variants else None), ""]
        if curves is not None:
            lines += [f"![{experiment.name}: all-reduce's curves at the judged budget]({rel(curves)})", ""]
        if plot is not None:
            lines += [f"![{experiment.name}]({rel(plot)})", ""]
    else:
        lines += ["No rows yet.", ""]
    lines += [f"**Verdict: {verdict}.** {reason}", ""]
    if note:
        lines += [f"**Discussion.** {note}", ""]
    return "\n".join(lines), verdict, summary_row


INTRO = """# Reproduction of Sodhani et al., "A Closer Look at Codistillation for Distributed Training"

Generated by `codistill reproduce --report{out_flag}` from the result rows in `{out}/` (one JSON line per
finished run: its config, the summary numbers and its run directory). Do not edit by hand: rerun the
generator. {quick_note}

- Run everything: `codistill reproduce all{seeds}{out_flag}` (resumes: finished rows are skipped; a
  run identical to one already recorded, such as the all-reduce baseline shared by F1, F2, F3, F6, F7
  and Beyond, reuses its row). Each experiment alone: the command in its section.
- Every comparison is at the same number of workers and of updates (`codistill.arms.arm_configs`):
  all-reduce trains one model on all W workers, codistillation n = 2 models on W/2 workers each, with
  every epoch-valued setting rescaled so both hit the same steps (the paper halves its milestones).
- Regularization settings are chosen on the validation split (10% of the training set, held out);
  test numbers are final. Model 0 is the model the paper reports ("model 1").
- Identical runs are trained once (matched by a hash of the resolved config). Each section says
  what its rows cost to make.{cost}
- Seeds: seed k trains with train.seed = 100k. From commit {seeds_since} on, model i of a run is seeded
  by numpy's SeedSequence from (train.seed, i) (`codistill/seeds.py`); rows made before it (no
  `model_seeds` in their `config`) seeded model i with train.seed + i, which never collided inside
  the suite (train.seeds 100 apart) but would across a user's train.seed 0 and 1. Those rows are kept:
  a finished (finding, variant, seed) is not rerun, and the config hash includes the derivation, so
  no new run reuses an old row or resumes an old checkpoint. Each section counts its older rows.
- Two means are called different when they are further apart than the larger of
  {acc_floor} accuracy points ({nll_floor} nats for NLL) and the combined standard deviation over seeds;
  otherwise similar. A verdict from one seed is marked provisional, one from fewer than 3 says so.
- Budget rule (issue 18; `experiments/budget.py`): a claim about trained models holds only at a budget
  where all-reduce has converged, i.e. over the last quarter of its training its validation accuracy
  rises by less than {acc_rise} points (its NLL falls by less than {nll_drop} nats for translation
  and language modeling). Each section states the rule's result for its longest all-reduce run.

Where an experiment has a trained budget (image: four times the base budget; translation: 2,000
updates on a quarter of the corpus), its verdict is judged there once every variant there ran, with
the base budget's beside it in its section; the last column applies the budget rule where it is judged.

| finding | verdict | across budgets | all-reduce converged where judged (rule) |
|---|---|---|---|
{summary}
"""


def write_report(out: str | Path, doc: str | Path, quick: bool = False, out_arg: str = "results") -> Path:
    out, doc = Path(out), Path(doc)
    doc_dir = doc.parent.resolve()
    sections, summary = [], []
    notes = {} if quick else read_notes(out)
    for e in EXPERIMENTS.values():
        rows = load_rows(out, e)
        text, _, row = section(e, rows, out.resolve(), doc_dir, quick, out_arg, notes.get(e.name))
        sections.append(text)
        summary.append(row)
    quick_note = ("**These rows come from `--quick` (the smoke test: tiny models, a few steps, one seed); "
                  "they check the machinery and measure nothing.**" if quick else "")
    trained = [r for e in EXPERIMENTS.values() for r in load_rows(out, e)
               if not r.get("reused_from") and r.get("total_seconds")]
    cost = ""
    if trained:
        longest = max(r["steps"] for r in trained)
        times = [r["total_seconds"] for r in trained if r["steps"] == longest]
        cost = (f" Measured here: the {len(times)} run(s) of {longest} updates took {min(times):.0f}-"
                f"{max(times):.0f} s each from start to finish (`total_seconds` in the rows; measured on "
                "whatever machine made them, possibly shared).")
    out_flag = (" --quick" if quick else "") + (f" --out {out_arg}" if out_arg != "results" else "")
    intro = INTRO.format(out=out_arg, out_flag=out_flag, quick_note=quick_note, cost=cost,
                         seeds="" if quick else " --seeds 3", acc_floor=ACC_FLOOR, nll_floor=NLL_FLOOR,
                         acc_rise=f"{100 * ACC_RISE:.1f}", nll_drop=NLL_DROP,
                         summary="\n".join(summary), seeds_since=SEEDS_SINCE)
    if notes.get("Summary"):
        intro += f"\n## Summary\n\n{notes['Summary']}\n"
    atomic_write_text(doc, intro + "\n" + "\n".join(sections))
    return doc


SEEDS_SINCE = "02e7e5b"
"""The commit from which model seeds derive by SeedSequence (codistill/seeds.py); rows made before
it seeded model i with train.seed + i."""


def seed_derivation(rows: list[dict]) -> str:
    """Which seeds the rows' models had: the derivation changed at commit SEEDS_SINCE."""
    old = sum(1 for r in rows if "model_seeds" not in r.get("config", {}))
    new = f"model i's seed derives from (train.seed, i) by SeedSequence from commit {SEEDS_SINCE} on"
    if not old:
        return new
    return f"{new}; {old} of the {len(rows)} rows here predate it and seeded model i with train.seed + i"


def _anchor(e: Experiment) -> str:
    text = f"{e.name}: {e.title}".lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")


__all__ = ["write_report", "NOT_RUN"]
