"""One PNG per experiment, drawn from its result rows only (F1's curves are stored in its rows)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from .results import METRICS, aggregate  # noqa: E402
from .suite import Experiment  # noqa: E402

CURVE_PANELS = (("train/task_loss", "training loss (task)"), ("val/accuracy", "validation accuracy"),
                ("param_distance", "||theta_t - theta_0||"))


def plot_experiment(experiment: Experiment, rows: list[dict], path: str | Path) -> Path | None:
    """Writes `path` and returns it; None when there are no rows to draw."""
    if not rows:
        return None
    draw = {"curves": _curves, "lines": _lines, "bars": _bars}[experiment.plot]
    fig = draw(experiment, rows)
    fig.suptitle(f"{experiment.name}: {experiment.title}" + (" (smoke test)" if rows[0].get("quick") else ""),
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _order(experiment: Experiment, names) -> list[str]:
    known = [v.name for v in experiment.variants]
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


def _bars_on(ax, experiment: Experiment, rows: list[dict], metric: str) -> None:
    stats = aggregate(rows, metric)
    names = _order(experiment, stats)
    means = [stats[n].mean for n in names]
    errs = [stats[n].std or 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=errs, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(METRICS[metric].header, fontsize=8)
    if means:
        low, high = min(m - e for m, e in zip(means, errs)), max(m + e for m, e in zip(means, errs))
        pad = max(0.05 * (high - low), 0.1)
        ax.set_ylim(low - 4 * pad, high + pad)  # differences matter, not the distance from zero
    ax.grid(alpha=0.3, axis="y")


def _bars(experiment: Experiment, rows: list[dict]):
    """One row of panels per budget (base, trained): their scales differ too much to share an axis."""
    metrics, suffix = experiment.metrics, experiment.trained
    groups = [g for g in ([r for r in rows if not r["variant"].endswith(suffix)],
                          [r for r in rows if r["variant"].endswith(suffix)]) if g] if suffix else [rows]
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(4.2 * len(metrics), 3.8 * len(groups)),
                             squeeze=False)
    for ax_row, group in zip(axes, groups):
        for ax, metric in zip(ax_row, metrics):
            _bars_on(ax, experiment, group, metric)
    return fig


def _lines(experiment: Experiment, rows: list[dict]):
    metric = experiment.metrics[0]
    stats = aggregate(rows, metric)
    panels = list(dict.fromkeys(v.panel for v in experiment.variants if v.x is not None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        series: dict[str, list] = {}
        for v in experiment.variants:
            if v.name not in stats:
                continue
            if v.x is None:  # a reference: one horizontal line
                s = stats[v.name]
                ax.axhline(s.mean, ls="--", color="gray", label=f"{v.name} (reference)")
                if s.std:
                    ax.axhspan(s.mean - s.std, s.mean + s.std, color="gray", alpha=0.15)
            elif v.panel == panel:
                series.setdefault(v.series or v.arm, []).append((v.x, stats[v.name]))
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in points], [p[1].mean for p in points],
                        yerr=[p[1].std or 0.0 for p in points], marker="o", capsize=3, label=name)
        if experiment.xlog:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(panel or experiment.xlabel, fontsize=8)
        ax.set_ylabel(METRICS[metric].header, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def _curves(experiment: Experiment, rows: list[dict]):
    """Model 0's curves at the longest budget run (one line per seed), then accuracy per budget."""
    # A variant whose rows all reuse another of this experiment's runs (F1's trained budget is its
    # long runs) would draw the same points twice.
    rows = [r for r in rows if not (r.get("reused_from") or "").startswith(f"{experiment.name}/")] or rows
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    first_seed = min(r["seed"] for r in rows)
    longest = max(r["steps"] for r in rows)
    colors: dict[str, str] = {}
    for row in rows:
        if row["steps"] != longest or not row.get("curve"):
            continue
        color = colors.setdefault(row["variant"], f"C{len(colors)}")
        for ax, (key, label) in zip(axes, CURVE_PANELS):
            points = row["curve"].get(key) or []
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.8,
                    label=row["variant"] if row["seed"] == first_seed else None)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[:3]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    stats = aggregate(rows, "test_acc0")
    steps = {r["variant"]: r["steps"] for r in rows}
    by_arm: dict[str, list] = {}
    for name in _order(experiment, stats):
        line = name.removesuffix("-long").removesuffix("-short")  # one line per recipe across budgets
        by_arm.setdefault(line, []).append((steps[name], stats[name]))
    ax = axes[3]
    for arm, points in by_arm.items():
        points.sort(key=lambda p: p[0])
        ax.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].std or 0.0 for p in points],
                    marker="o", capsize=3, label=arm)
    ax.set_xlabel(experiment.xlabel, fontsize=8)
    ax.set_ylabel(METRICS["test_acc0"].header, fontsize=8)
    ax.grid(alpha=0.3)
    if by_arm:
        ax.legend(fontsize=7)
    return fig


def plot_budget(experiment: Experiment, rows: list[dict], variants: list[str], path: str | Path,
                nll: bool) -> Path | None:
    """The curves behind the budget rule: validation metric of the all-reduce `variants` with the last
    quarter shaded, and training against validation loss (over-fitting shows as the two parting).
    One line per seed. None when no row of `variants` stores a curve."""
    mine = [r for r in rows if r["variant"] in variants and r.get("curve")]
    if not mine:
        return None
    metric, label = ("val/loss", "validation NLL") if nll else ("val/accuracy", "validation accuracy")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    first_seed = {}
    for row in mine:
        color = f"C{variants.index(row['variant'])}"
        first = first_seed.setdefault(row["variant"], row["seed"]) == row["seed"]
        points = row["curve"].get(metric) or []
        left.plot([p[0] for p in points], [p[1] for p in points], color=color, marker=".",
                  label=row["variant"] if first else None)
        for key, style, what in (("train/task_loss", "-", "training"), ("val/loss", "--", "validation")):
            points = row["curve"].get(key) or []
            right.plot([p[0] for p in points], [p[1] for p in points], style, color=color, alpha=0.8,
                       label=f"{row['variant']} ({what})" if first else None)
    steps = max(r["steps"] for r in mine)
    left.axvspan(0.75 * steps, steps, color="gray", alpha=0.15, label="last quarter (budget rule)")
    left.set_ylabel(label, fontsize=8)
    right.set_ylabel("loss (task)", fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{experiment.name}: all-reduce's convergence at the judged budget", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
