"""ImageNet ResNets from torchvision (He et al., 2016; ResNeXt: Xie et al., 2017), randomly
initialized (no pretrained weights: nothing is downloaded).

Options go to torchvision's constructor, e.g. {zero_init_residual: true} starts every residual block
as the identity (Goyal et al., 2017, §5.1). Inputs with other than 3 channels get a fresh first conv.
"""

from __future__ import annotations

import torch.nn as nn

from .registry import register_model


def _adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the 7x7 stem conv when the input is not RGB (e.g. 1-channel Fashion-MNIST)."""
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """ResNet-18 (11.7M parameters at 1000 classes)."""
    from torchvision.models import resnet18 as build

    return _adapt_stem(build(weights=None, num_classes=num_classes, **options), input_shape[0])


@register_model("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """ResNet-50 (25.6M parameters at 1000 classes), the paper's ImageNet model."""
    from torchvision.models import resnet50 as build

    return _adapt_stem(build(weights=None, num_classes=num_classes, **options), input_shape[0])


@register_model("resnext101_32x8d")
def resnext101_32x8d(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """ResNeXt-101 32x8d (88.8M parameters at 1000 classes)."""
    from torchvision.models import resnext101_32x8d as build

    return _adapt_stem(build(weights=None, num_classes=num_classes, **options), input_shape[0])


@register_model("resnet_tv_tiny")
def resnet_tv_tiny(num_classes: int, input_shape: tuple[int, ...], **options) -> nn.Module:
    """torchvision's ResNet with one basic block per stage (ResNet-10, 4.9M parameters): the
    family's test preset, same stem, stages and head as the big ones."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return _adapt_stem(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, **options), input_shape[0])
