"""Small models that train in minutes on a CPU."""

from __future__ import annotations

import math

import torch.nn as nn

from .registry import register_model


@register_model("cnn")
def cnn(num_classes: int, input_shape: tuple[int, ...], width: int = 32, hidden: int = 128,
        dropout: float = 0.0) -> nn.Module:
    """Two conv-BN-ReLU-pool blocks and a two-layer head (BatchNorm makes buffers worth exchanging).

    (N, C, H, W) -> (N, num_classes). For 28x28 inputs: 28 -> 14 -> 7.
    """
    c, h, w = input_shape
    h2, w2 = math.ceil(h / 4), math.ceil(w / 4)  # two 2x2 pools, ceil_mode keeps odd sizes
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(2 * width * h2 * w2, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


@register_model("cnn_tiny")
def cnn_tiny(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """The CNN at test size."""
    return cnn(num_classes, input_shape, **{"width": 8, "hidden": 32, **options})


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 256, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """Flatten, then `depth` hidden Linear-ReLU layers."""
    size = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(size, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        size = hidden
    layers.append(nn.Linear(size, num_classes))
    return nn.Sequential(*layers)


@register_model("mlp_tiny")
def mlp_tiny(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """The MLP at test size."""
    return mlp(num_classes, input_shape, **{"hidden": 32, "depth": 1, **options})
