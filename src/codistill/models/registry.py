"""Models by name. A builder takes (num_classes, input_shape, **options) and returns an nn.Module
that maps a batch of inputs to logits. Models know nothing of torch.distributed: DDP, teacher copies
and exchanges are applied from outside."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def decorator(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        return fn

    return decorator


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    from ..errors import ConfigError

    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape), **options)
    except TypeError as e:
        raise ConfigError(f"model.options for {name!r}: {e}") from None
