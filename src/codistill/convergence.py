"""The budget rule: has a run's validation metric stopped improving, and is a run long enough to hope so?

A run has converged when, over the last quarter of its training, its validation accuracy rises by
less than ACC_RISE (0.2 points) or, for tasks scored by NLL (translation, language modeling), its
validation NLL falls by less than NLL_DROP (0.02 nats). The reproduction suite judges its all-reduce
arms by it (`experiments/budget.py`); `codistill compare` judges every model of every arm.

Before launch, `compare` warns when the run is shorter than MIN_UPDATES_PER_STAGE updates per
learning-rate stage of the recipe (see the constant for why that number).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config

ACC_RISE = 0.002  # 0.2 points of accuracy
NLL_DROP = 0.02  # nats
LAST = 0.25  # the last quarter of training

TARGET_MARGIN = 0.005
"""A converged target: the reference arm's final validation accuracy less 0.5 points (the suite's
floor for calling two accuracies different), so that an arm within noise of it counts (compare's
projections, bench/converged.py)."""
MIN_UPDATES_PER_STAGE = 100
"""Updates per learning-rate stage below which `compare` warns before launch. Chosen from the suite's
F1 budget curve on the default recipe (docs/results.md, F1; three stages: warm-up and peak, x0.1,
x0.01): at 105 updates (35 per stage) all-reduce's large batch ends about 10 points below where it
ends at 315 and codistillation leads it by 4.3 points, an artefact of the budget; at 315 updates (105
per stage) all-reduce has converged by the rule (+0.16 points over the last quarter) and the gap is
within the seed spread. Counted per stage because a step schedule converges in its last, low-LR
stages, each of which needs updates of its own; a constant or cosine schedule is one stage. This is
a floor measured on one recipe, not a guarantee: the convergence column checks the outcome, and the
count is needed before it because a step schedule whose LR decayed early looks flat by the rule."""


def last_quarter_change(points: list[list[float]], steps: int, metric: str) -> float | None:
    """Improvement of `metric` from the last point at or before 3/4 of `steps` to the final point
    (accuracy gained, or NLL lost: positive when improving); None without such a point."""
    if len(points) < 2:
        return None
    cut = (1 - LAST) * steps
    before = [p for p in points if p[0] <= cut]
    if not before:
        return None
    start, end = before[-1][1], points[-1][1]
    return end - start if metric == "val/accuracy" else start - end


def has_converged(change: float, metric: str) -> bool:
    return change < (ACC_RISE if metric == "val/accuracy" else NLL_DROP)


@dataclass(frozen=True)
class ArmConvergence:
    """The rule applied to every model of one arm: converged only when every model has."""

    metric: str  # "val/accuracy" or "val/loss"
    changes: tuple[float | None, ...]  # per model, over the last quarter (positive: still improving)

    @property
    def worst(self) -> float | None:
        """The largest improvement over the last quarter; None when a model could not be judged."""
        return None if any(c is None for c in self.changes) else max(self.changes)

    @property
    def converged(self) -> bool | None:
        return None if self.worst is None else has_converged(self.worst, self.metric)

    def cell(self) -> str:
        """The table's cell: yes / no / unknown, with the worst model's change."""
        if self.worst is None:
            return "unknown"
        change = (f"{100 * self.worst:+.2f} pts" if self.metric == "val/accuracy"
                  else f"NLL {-self.worst:+.3f}")
        return f"{'yes' if self.converged else 'no'} ({change})"


def judge_arm(curves: list[list[list[float]]], steps: int, metric: str) -> ArmConvergence:
    """`curves`: one validation curve per model, [[step, value], ...]."""
    return ArmConvergence(metric, tuple(last_quarter_change(c, steps, metric) for c in curves))


def not_converged_line(verdicts: dict[str, ArmConvergence]) -> str | None:
    """The line under `compare`'s table when an arm had not stopped improving (or could not be judged)."""
    still = [name for name, v in verdicts.items() if v.converged is False]
    unknown = [name for name, v in verdicts.items() if v.converged is None]
    if not still and not unknown:
        return None
    rule = (f"validation accuracy still rising by {100 * ACC_RISE:.1f} points or more over the last quarter"
            if all(v.metric == "val/accuracy" for v in verdicts.values())
            else f"validation accuracy rising >= {100 * ACC_RISE:.1f} points or NLL falling >= {NLL_DROP} nats "
                 "over the last quarter")
    parts = []
    if still:
        parts.append(f"{', '.join(still)} had not converged ({rule})")
    if unknown:
        parts.append(f"{', '.join(unknown)} could not be judged (no evaluation at or before 3/4 of the run)")
    return (f"**Budget:** {'; '.join(parts)}. Differences between the arms measure this budget, not the "
            "methods: train longer (train.epochs or train.steps) until every arm converges.")


def learning_rate_stages(cfg: Config) -> int:
    """Stages of the LR schedule: the step schedule's milestones split it; cosine and constant are one."""
    return len(cfg.schedule.milestones) + 1 if cfg.schedule.name == "goyal" else 1


def short_run_warning(cfg: Config, steps: int) -> str | None:
    """One line (without the `codistill: warning:` prefix) when `steps` updates are too few for the
    recipe of `cfg` to converge, else None."""
    stages = learning_rate_stages(cfg)
    minimum = MIN_UPDATES_PER_STAGE * stages
    if steps >= minimum:
        return None
    per = f"{MIN_UPDATES_PER_STAGE} per learning-rate stage x {stages} stages" if stages > 1 else \
        f"{MIN_UPDATES_PER_STAGE} for a one-stage {cfg.schedule.name} schedule"
    return (f"the comparison runs {steps} updates, fewer than {minimum} for this recipe ({per}): the "
            f"arms are likely still improving (all-reduce's large batch most), so the table would compare "
            f"budgets, not methods; train longer (train.epochs or train.steps)")
