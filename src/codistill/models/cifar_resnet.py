"""ResNets for 32x32 images (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2).

A 3x3 conv stem with 16 channels, then three stages of n basic blocks with 16, 32 and 64 channels
(the last two start with stride 2), global average pooling and a linear classifier: 6n + 2 layers.
Shortcuts that change shape are option A (stride-2 subsampling, zero-padded extra channels: no
parameters, as in the paper's CIFAR experiments) or option B (1x1 conv + BatchNorm projection).

Any input size and channel count works (Fashion-MNIST: (1, 28, 28) -> 28, 14, 7 pixels per stage).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .registry import register_model


class ShortcutA(nn.Module):
    """Identity with subsampling and zero channels: (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # pads dim 1 (channels) only


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), two 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """(N, C, H, W) -> (N, num_classes) logits."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 shortcut: str = "A", zero_init_residual: bool = False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.options.depth: a CIFAR ResNet has 6n + 2 layers (8, 20, 32, 56, ...), "
                              f"got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"model.options.shortcut: `A` (zero-padding) or `B` (projection), got {shortcut!r}")
        if width <= 0:
            raise ConfigError(f"model.options.width: must be > 0, got {width}")
        n = (depth - 2) // 6
        channels = [max(1, round(16 * width * m)) for m in (1, 2, 4)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        blocks, c_in = [], channels[0]
        for stage, c_out in enumerate(channels):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1, shortcut))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as the identity (Goyal et al., 2017)
            for b in blocks:
                nn.init.zeros_(b.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet_cifar")
def resnet_cifar(num_classes: int, input_shape: tuple[int, ...], depth: int = 20, width: float = 1.0,
                 shortcut: str = "A", zero_init_residual: bool = False) -> nn.Module:
    """CIFAR ResNet of any depth 6n + 2; `width` multiplies the 16/32/64 channels."""
    return CifarResNet(depth, num_classes, input_shape[0], width, shortcut, zero_init_residual)


@register_model("resnet8")
def resnet8(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """One block per stage (75k parameters at 10 classes)."""
    return resnet_cifar(num_classes, input_shape, **{"depth": 8, **options})


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """Three blocks per stage (0.27M parameters; 8.75% CIFAR-10 test error in the paper)."""
    return resnet_cifar(num_classes, input_shape, **{"depth": 20, **options})


@register_model("resnet32")
def resnet32(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """Five blocks per stage (0.46M parameters)."""
    return resnet_cifar(num_classes, input_shape, **{"depth": 32, **options})


@register_model("resnet56")
def resnet56(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """Nine blocks per stage (0.85M parameters)."""
    return resnet_cifar(num_classes, input_shape, **{"depth": 56, **options})


@register_model("resnet_cifar_tiny")
def resnet_cifar_tiny(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """ResNet-8 at half width (8/16/32 channels): the family's test preset."""
    return resnet_cifar(num_classes, input_shape, **{"depth": 8, "width": 0.5, **options})
