"""Warnings printed before a run starts: settings that run fine but cannot mean much.

Untrained teachers. The exchange at step 0 hands every model the other models' *random
initializations*; with a constant alpha each student distills toward them until the exchange at
step T. When T >= S (the run's updates), the teachers never hold trained weights at all. We call a
codistillation run (or comparison) too short to mean anything when S < MIN_PERIODS x T: then the
random-teacher phase is more than 1 / MIN_PERIODS = 25% of the run and students see trained
teachers in fewer than 3 exchanges. (The paper's T = 2500 is 1% of its run.)
"""

from __future__ import annotations

import sys

from .config import Config
from .recipe import first_trained_teacher

MIN_PERIODS = 4
"""S >= MIN_PERIODS x T for a meaningful codistillation run: random teachers for at most 1/4 of it."""


def untrained_teacher_warning(cfg: Config, steps: int) -> str | None:
    """One line naming the problem and the fix, or None when the run is long enough."""
    c = cfg.codistill
    if c.n_models == 1 or c.method != "distill" or c.alpha == 0:
        return None
    T = c.exchange_every
    K = c.alpha_steps if c.alpha_steps is not None else first_trained_teacher(cfg)  # burn-in steps
    burnin = c.alpha_schedule == "burnin" and K >= T
    fix = ("lower codistill.exchange_every or train longer" if burnin else
           f"lower codistill.exchange_every, train longer, or distill only from trained teachers with "
           f"codistill.alpha_schedule=burnin codistill.alpha_steps={T}")
    if burnin:  # the default: no distillation toward random teachers, but little of it at all
        if K >= steps:
            return (f"the burn-in of codistill.alpha_schedule=burnin ({K} steps: until the exchange at step "
                    f"T={T} has arrived) covers the run's {steps} updates: no step distills, so this trains "
                    f"independent models; {fix}")
        if steps < MIN_PERIODS * T:
            return (f"{steps} updates are fewer than {MIN_PERIODS} exchange periods (T={T}): the burn-in "
                    f"leaves {steps - K} distilling steps and {(steps - 1) // T} exchange(s) of trained weights, "
                    f"too few for a meaningful comparison; {fix}")
        return None
    if T >= steps:
        return (f"codistill.exchange_every={T} >= the run's {steps} updates: the teachers never hold "
                f"trained weights, so codistillation distills toward random initializations (or, with a "
                f"burn-in of >= T steps, never distills); {fix}")
    if steps < MIN_PERIODS * T:
        return (f"{steps} updates are fewer than {MIN_PERIODS} exchange periods (T={T}): the teachers are "
                f"random initializations for the first {T} steps ({100 * T / steps:.0f}% of the run) and "
                f"trained in only {(steps - 1) // T} exchange(s), too few for a meaningful comparison; {fix}")
    return None


def run_steps(cfg: Config, world_size: int) -> int | None:
    """The run's updates S (loads the data for epoch-valued runs); None where that needs a tokenizer."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    from .recipe import total_steps
    from .tasks import ClassificationTask, steps_per_epoch, task_class

    if task_class(cfg) is not ClassificationTask:
        return None
    return total_steps(cfg, steps_per_epoch(cfg, world_size))


def warn_before_launch(configs: list[Config], world_size: int) -> str | None:
    """Print (once) the first warning among `configs` as one `codistill: warning:` line."""
    for cfg in configs:
        steps = run_steps(cfg, world_size)
        message = untrained_teacher_warning(cfg, steps) if steps is not None else None
        if message:
            print(f"codistill: warning: {message}", file=sys.stderr, flush=True)
            return message
    return None
