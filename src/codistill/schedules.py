"""Schedules as pure functions of the optimizer step.

One mechanism (`apply_to_optimizer`) drives LR and weight decay; alpha uses the same style. All
lengths here are in steps: the trainer converts the config's epochs with its steps per epoch.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """`name`: goyal | cosine | constant. Values are in steps.

    goyal:  linear warm-up from `base` to `peak` over `warmup` steps, then peak * gamma^k after the
            k-th milestone (Goyal et al. 2017).
    cosine: the same warm-up, then peak * (1 + cos(pi * progress)) / 2 down to 0 at `total`.
    constant: `peak` throughout (after the same warm-up).
    """

    name: str
    base: float
    peak: float
    warmup: int
    total: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base + (self.peak - self.base) * step / self.warmup
        if self.name == "goyal":
            return self.peak * self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.name == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "constant":
            return self.peak
        raise ValueError(f"unknown LR schedule {self.name!r}")


def scaled_lr(base: float, batch: int, reference_batch: int = 256, scale: bool = True) -> float:
    """Linear scaling rule: base * B / reference_batch."""
    return base * batch / reference_batch if scale else base


@dataclass(frozen=True)
class StageSchedule:
    """A value per LR stage: values[k] applies from milestone k-1 (inclusive) to milestone k.

    With one value it is constant. This is the paper's decaying weight decay (1e-4, 1e-5, 0).
    """

    values: tuple[float, ...]
    milestones: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.values) not in (1, len(self.milestones) + 1):
            raise ValueError(f"{len(self.values)} values for {len(self.milestones) + 1} stages")

    def __call__(self, step: int) -> float:
        if len(self.values) == 1:
            return self.values[0]
        return self.values[bisect.bisect_right(self.milestones, step)]


@dataclass(frozen=True)
class AlphaSchedule:
    """constant: alpha; burnin: 0 for steps < K, then alpha (Anil et al.); ramp: alpha * min(1, step/K)."""

    name: str
    alpha: float
    steps: int = 0

    def __call__(self, step: int) -> float:
        if self.name == "constant" or self.steps == 0:
            return self.alpha
        if self.name == "burnin":
            return 0.0 if step < self.steps else self.alpha
        if self.name == "ramp":
            return self.alpha * min(1.0, step / self.steps)
        raise ValueError(f"unknown alpha schedule {self.name!r}")


def apply_to_optimizer(optimizer, step: int, lr, weight_decay) -> None:
    """Set lr on every param group and weight decay on groups that decay (group['decay'] True)."""
    lr_value, wd_value = lr(step), weight_decay(step)
    for group in optimizer.param_groups:
        group["lr"] = lr_value
        group["weight_decay"] = wd_value if group.get("decay", True) else 0.0
