"""The matched arms of a comparison: same workers W, same updates S, one trainer.

Arms (Sodhani et al., Sec. 3-4):
- allreduce: one model on all W workers for S steps (the config's epochs fix S);
- codistill: n models of W/n workers each, the same S steps; every epoch-valued setting (warm-up,
  milestones) is rescaled so the schedules hit the same steps, as the paper halves its milestones;
- codistill_regularized: as codistill, with weight decay decaying at the LR milestones
  (wd, wd/10, 0 by default) and optionally shifted milestones, accounting for codistillation's
  own regularization;
- diloco / localsgd: the codistill arm's grid and schedules, with an outer step (DiLoCo's outer
  Nesterov SGD / plain averaging) every H = T steps instead of distillation (`codistill.outer_sync`).

Used by `codistill compare`, the reproduction suite and the benchmarks, so it sits below all three.
"""

from __future__ import annotations

from . import tasks
from .config import Config, check_world_size, replace
from .errors import ConfigError
from .recipe import total_steps

OUTER_SYNC_ARMS = ("diloco", "localsgd")


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
    """The configs of the requested arms (`compare.arms`), matched in workers and updates."""
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
    for method in OUTER_SYNC_ARMS:
        if method in cfg.compare.arms:
            arms[method] = replace(codistill, codistill__method=method)
    return [(name, arms[name]) for name in cfg.compare.arms]


def without_outer_sync_for_mixed_models(cfg: Config) -> tuple[Config, str | None]:
    """DiLoCo and local SGD average parameters, so they need one architecture: with different models
    (`model.name` a list of several) they are left out of `compare.arms`, named in the message."""
    dropped = [a for a in cfg.compare.arms if a in OUTER_SYNC_ARMS]
    if len(set(cfg.model_names())) == 1 or not dropped:
        return cfg, None
    kept = [a for a in cfg.compare.arms if a not in OUTER_SYNC_ARMS]
    if not kept:
        raise ConfigError(f"compare.arms lists only {', '.join(dropped)}, which average parameters and so need "
                          f"one architecture; got model.name {cfg.model.name}")
    return replace(cfg, compare__arms=kept), (
        f"leaving out {', '.join(dropped)}: they average parameters, so every model needs one architecture "
        f"(model.name lists {', '.join(cfg.model_names())})")
