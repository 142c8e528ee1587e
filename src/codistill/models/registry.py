"""Models by name. A builder takes (num_classes, input_shape, **options) and returns an nn.Module
that maps a batch of inputs to logits. Models know nothing of torch.distributed: DDP, teacher copies
and exchanges are applied from outside."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}
KINDS: dict[str, str] = {}
"""What each model reads: `classifier` (fixed-size inputs -> class logits, the default),
`lm` (token ids -> next-token logits) or `seq2seq` (source and target ids). Each task names the
kind it trains, so an image model on text data is one error before anything starts."""


def register_model(name: str, kind: str = "classifier"):
    def decorator(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        KINDS[name] = kind
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


def check_model_kind(names, kind: str, dataset: str) -> None:
    """Every named model reads what the task gives it (KINDS)."""
    from ..errors import ConfigError

    wrong = [name for name in dict.fromkeys(names) if KINDS.get(name, kind) != kind]
    if wrong:
        fitting = sorted(name for name, k in KINDS.items() if k == kind)
        raise ConfigError(f"model.name: {wrong[0]} is {KIND_NAMES[KINDS[wrong[0]]]}, but dataset {dataset!r} "
                          f"needs {KIND_NAMES.get(kind, kind)}: one of {', '.join(fitting)}")


KIND_NAMES = {"classifier": "a classifier (images or fixed-size inputs)", "lm": "a language model",
              "seq2seq": "a sequence-to-sequence (translation) model"}


def check_model_options(names, num_classes: int, input_shape: tuple, sample: tuple | None, options: dict,
                        **extra) -> None:
    """Build each named model once on the meta device (no memory, no compute) and, given a `sample`
    input shape, run it: an option the model does not take or cannot use is one ConfigError."""
    import torch

    from ..errors import ConfigError

    for name in dict.fromkeys(names):
        try:
            with torch.device("meta"):
                model = build_model(name, num_classes, input_shape, **extra, **options)
                out = model(torch.empty(sample)) if sample is not None else None
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here is an option the model cannot use
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"model {name!r} cannot be built with model.options={options}: "
                              f"{type(e).__name__}: {first}") from None
        if out is not None and (out.shape[0] != sample[0] or out.shape[-1] != num_classes):
            raise ConfigError(f"model {name!r} with model.options={options} gives outputs of shape "
                              f"{tuple(out.shape)}, expected ({sample[0]}, ..., {num_classes})")
