"""The budget rule: is a verdict's budget one where all-reduce has converged?

A claim about trained models is judged where the all-reduce arm has stopped improving: over the
last quarter of its training its validation accuracy rises by less than ACC_RISE (0.2 points) or,
for tasks scored by NLL (translation, language modeling), its validation NLL falls by less than
NLL_DROP (0.02 nats) (`codistill.convergence`, which `codistill compare` applies to every arm). Read
from the curves stored in the result rows (model 0, mean over seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..convergence import ACC_RISE, NLL_DROP, has_converged, last_quarter_change  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Convergence:
    variant: str
    steps: int
    metric: str  # "val/accuracy" or "val/loss"
    change: float  # over the last quarter: accuracy gained, or NLL lost (both positive when improving)
    seeds: int

    @property
    def converged(self) -> bool:
        return has_converged(self.change, self.metric)

    def sentence(self) -> str:
        what = (f"validation accuracy rose {100 * self.change:+.2f} points" if self.metric == "val/accuracy"
                else f"validation NLL fell {self.change:+.3f} nats")
        rule = f"< {100 * ACC_RISE:.1f} points" if self.metric == "val/accuracy" else f"< {NLL_DROP} nats"
        return (f"over the last quarter of `{self.variant}` ({self.steps} updates, {self.seeds} seed(s)) "
                f"{what}: {'converged' if self.converged else 'NOT converged'} by the rule ({rule})")


def convergence(rows: list[dict], nll: bool = False, variant: str | None = None) -> Convergence | None:
    """The all-reduce arm `variant` (default: the one at the longest budget with curves), or None
    when no such row has a curve; `nll`: judge the validation NLL (translation, language modeling)
    instead of the accuracy."""
    candidates = [r for r in rows if r.get("arm") == "allreduce" and r.get("curve")
                  and (variant is None or r["variant"] == variant)]
    if not candidates:
        return None
    steps = max(r["steps"] for r in candidates)
    longest = [r for r in candidates if r["steps"] == steps]
    variant = sorted({r["variant"] for r in longest})[0]
    longest = [r for r in longest if r["variant"] == variant]
    metric = "val/loss" if nll and any(r["curve"].get("val/loss") for r in longest) else "val/accuracy"
    changes = [c for r in longest
               if (c := last_quarter_change(r["curve"].get(metric) or [], steps, metric)) is not None]
    if not changes:
        return None
    return Convergence(variant, steps, metric, sum(changes) / len(changes), len(changes))


def budget_line(rows: list[dict], nll: bool = False, variant: str | None = None) -> str:
    """The report's statement of the rule for one experiment's rows (judged on `variant`)."""
    c = convergence(rows, nll, variant)
    if c is None:
        return ("**Budget rule.** Not shown: no all-reduce row here stores its validation curve (rows made "
                "before curves were kept for every experiment); rerun it to judge convergence.")
    return f"**Budget rule.** {c.sentence()[0].upper()}{c.sentence()[1:]}."
