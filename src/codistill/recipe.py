"""The training recipe: optimizer with its parameter groups, and the schedules in steps.

Epoch-valued settings (warm-up, milestones) become steps with the run's steps per epoch, i.e. one
pass of one model over its own training data at its effective batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import Config
from .schedules import AlphaSchedule, LRSchedule, StageSchedule, scaled_lr

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, decay_bias_and_norm: bool) -> list[dict]:
    """One group, or two: {"decay": True} for weights, {"decay": False} for biases and norm layers."""
    if decay_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "decay": True}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, NORM_TYPES) or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False}]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.decay_bias_and_norm)
    # lr and weight_decay are placeholders: the schedules set them before every step.
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=0.0)


@dataclass(frozen=True)
class Schedules:
    lr: LRSchedule
    weight_decay: StageSchedule
    alpha: AlphaSchedule
    total_steps: int
    steps_per_epoch: int


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, round(cfg.train.epochs * steps_per_epoch))


def first_trained_teacher(cfg: Config) -> int:
    """The first step whose teachers hold trained weights: the exchange at step T, swapped in D steps
    later when asynchronous (before it, the teachers are the step-0 exchange's initializations)."""
    c = cfg.codistill
    return c.exchange_every + (c.exchange_delay if c.exchange == "collective" else 0)


def build_schedules(cfg: Config, steps_per_epoch: int, model_batch: int) -> Schedules:
    """`model_batch` is the model's effective batch B (per-worker batch x replicas)."""
    s, o, c = cfg.schedule, cfg.optim, cfg.codistill
    total = total_steps(cfg, steps_per_epoch)
    milestones = tuple(round(m * steps_per_epoch) for m in s.milestones)
    peak = scaled_lr(o.lr, model_batch, s.reference_batch, s.scale_lr)
    # Goyal et al. warm up from the unscaled LR to the scaled one; without scaling there is no
    # smaller LR to start from, so the warm-up starts at 0 (as Transformer recipes do).
    start = o.lr if s.scale_lr else 0.0
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    lr = LRSchedule(s.name, base=start if warmup > 0 else peak, peak=peak, warmup=warmup, total=total,
                    milestones=milestones, gamma=s.gamma)
    wd_values = o.weight_decay if isinstance(o.weight_decay, list) else [o.weight_decay]
    wd = StageSchedule(tuple(wd_values), milestones if len(wd_values) > 1 else ())
    alpha = AlphaSchedule(c.alpha_schedule, c.alpha, c.alpha_steps if c.alpha_steps is not None else first_trained_teacher(cfg))
    return Schedules(lr, wd, alpha, total, steps_per_epoch)
