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
from dataclasses import fields

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


DISTILLATION = ("loss", "temperature", "alpha", "alpha_schedule", "alpha_steps", "teacher_mode",
                "teacher_precision", "exchange_dtype", "exchange_delay", "max_teacher_age", "distill_fraction",
                "teacher_every", "teacher_dtype", "teacher_topk", "teacher_offload", "graph",
                "peers")
"""codistill.* settings that only the distillation term and its teachers read."""


def ignored_settings(cfg: Config, world_size: int, given: Config | None = None) -> dict[str, str]:
    """Settings changed from their defaults that do nothing in this run: {section.key: why}.
    `given`: the config the user wrote, when `cfg` was derived from it (a comparison's arm)."""
    from .tasks import task_class
    from .data import registered

    default, c = Config(), cfg.codistill
    method = "all-reduce (codistill.n_models=1)" if c.n_models == 1 else f"codistill.method={c.method}"
    task = task_class(cfg).__name__
    rules = {  # section -> (keys, ignored?, why)
        "outer": [(("lr", "momentum", "nesterov"), c.n_models == 1 or c.method != "diloco",
                   f"only codistill.method=diloco has an outer optimizer, this run is {method}"),
                  (("every",), c.n_models == 1 or c.method == "distill",
                   f"only codistill.method=diloco or localsgd has outer steps, this run is {method}")],
        "codistill": [(DISTILLATION, c.n_models == 1 or c.method != "distill",
                       f"only codistillation (codistill.method=distill, n_models >= 2) distills; this run is {method}"),
                      (("temperature",), c.loss == "mse", "codistill.loss=mse compares raw logits"),
                      (("alpha_steps",), c.alpha_schedule == "constant", "codistill.alpha_schedule=constant"),
                      (("peers",), c.graph == "all", "codistill.graph=all distils from every other model"),
                      (("exchange_every",), c.n_models == 1, f"this run is {method}, which exchanges nothing"),
                      (("exchange_hierarchical",), c.n_models == 1 or world_size // max(1, c.n_models) == 1,
                       "there is one worker per model: no replicas to broadcast the teachers to"),
                      (("exchange_dir",), c.exchange != "storage", f"codistill.exchange is {c.exchange}, not storage"),
                      (("model_index",), c.exchange not in ("storage", "frozen"),
                       "codistill.exchange is collective: one job trains every model"),
                      (("teacher_run",), c.exchange != "frozen", f"codistill.exchange is {c.exchange}, not frozen"),
                      ],
        "optim": [(("betas",), cfg.optim.name != "adamw", f"optim.name={cfg.optim.name} has no betas"),
                  (("momentum", "nesterov"), cfg.optim.name != "sgd", f"optim.name={cfg.optim.name} has no "
                   "SGD momentum (its betas play that part)")],
        "schedule": [(("gamma",), cfg.schedule.name != "goyal", f"schedule.name={cfg.schedule.name} has no "
                      "milestones"),
                     (("milestones",), cfg.schedule.name != "goyal" and not isinstance(cfg.optim.weight_decay, list),
                      f"schedule.name={cfg.schedule.name} has no milestones and optim.weight_decay has one stage"),
                     (("reference_batch",), not cfg.schedule.scale_lr, "schedule.scale_lr is false")],
        "model": [(("channels_last",), task != "ClassificationTask",
                   f"dataset {cfg.data.name}'s models are not convolutional")],
        "data": [(("split",), c.n_models == 1, "there is one model: nothing to split between models"),
                 (("root",), not registered(cfg.data.name).takes_root,
                  f"dataset {cfg.data.name} is built in and reads no files"),
                 (("num_workers",), task != "ClassificationTask", f"dataset {cfg.data.name} is not read by "
                  "DataLoader workers"),
                 (("val_fraction", "eval_batch_size"), task == "TranslationTask",
                  f"translation ({cfg.data.name}) has its own validation split and batches by tokens")],
        "translation": [(tuple(f.name for f in fields(cfg.translation)), task != "TranslationTask",
                         f"dataset {cfg.data.name} is not a translation corpus")],
        "lm": [(tuple(f.name for f in fields(cfg.lm)), task != "LMTask",
                f"dataset {cfg.data.name} is not a language-modeling corpus")],
    }
    ignored = {}
    for section, section_rules in rules.items():
        for keys, applies, why in section_rules:
            for key in keys:
                value = getattr(getattr(given or cfg, section), key)
                if applies and value != getattr(getattr(default, section), key) and value != []:  # [] clears
                    ignored.setdefault(f"{section}.{key}", why)
    return ignored


def outer_steps_warning(cfg: Config, steps: int | None) -> str | None:
    """DiLoCo / local SGD with H >= S: the groups never meet before the final average."""
    c = cfg.codistill
    H = cfg.outer.every or c.exchange_every
    if c.n_models == 1 or c.method == "distill" or steps is None or H < steps:
        return None
    return (f"outer.every (H={H}) >= the run's {steps} updates: the {c.n_models} groups train alone and are "
            f"averaged once, at the end (codistill.method={c.method}); lower outer.every or train longer")


def warn_before_launch(configs: list[Config], world_size: int, given: Config | None = None) -> str | None:
    """Print the warnings among `configs` (the arms of a comparison, or one run), one
    `codistill: warning:` line each: the first of the untrained-teacher / outer-step warnings, then
    the settings that do nothing in every one of them, one line per reason. Returns the first.
    `given`: the config the user wrote, when `configs` are arms derived from it."""
    lines, ignored = [], None
    for cfg in configs:
        steps = run_steps(cfg, world_size)
        message = (untrained_teacher_warning(cfg, steps) if steps is not None else None) or outer_steps_warning(cfg, steps)
        if message and not lines:
            lines.append(message)
        here = ignored_settings(cfg, world_size, given)
        ignored = here if ignored is None else {k: v for k, v in ignored.items() if k in here}
    by_reason: dict[str, list[str]] = {}
    for key, why in (ignored or {}).items():
        by_reason.setdefault(why, []).append(key)
    if len(configs) > 1:  # a comparison: the reason is that no arm uses them
        arms = ", ".join(dict.fromkeys(c.mode for c in configs))
        by_reason = {f"no arm of this comparison ({arms}) uses {'it' if len(keys) == 1 else 'them'}": keys
                     for keys in ([k for ks in by_reason.values() for k in ks],) if keys}
    for why, keys in by_reason.items():
        lines.append(f"{', '.join(keys)} {'does' if len(keys) == 1 else 'do'} nothing here: {why}")
    for line in lines:
        print(f"codistill: warning: {line}", file=sys.stderr, flush=True)
    return lines[0] if lines else None
