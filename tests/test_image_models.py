"""Image model presets: registry, shapes, gradients, parameter counts; two architectures codistilled."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from codistill.errors import ConfigError
from codistill.models import MODELS, build_model
from codistill.models.cifar_resnet import ShortcutA

pytestmark = pytest.mark.timeout(60)


GREY, RGB = (1, 28, 28), (3, 32, 32)  # Fashion-MNIST, CIFAR; smaller images keep the deep ones fast
SMALL = [("resnet8", GREY), ("resnet8", RGB), ("resnet20", RGB), ("resnet32", (3, 16, 16)),
         ("resnet56", (3, 12, 12)), ("resnet_cifar", (1, 12, 12)), ("resnet_cifar_tiny", GREY),
         ("resnet_cifar_tiny", RGB), ("resnet_tv_tiny", GREY), ("resnet_tv_tiny", RGB), ("resnet18", (3, 16, 16))]
BIG = {"resnet50": 25_557_032, "resnext101_32x8d": 88_791_336}  # torchvision's counts at 1000 classes


def _forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    out = model(x)
    assert out.shape == (len(x), num_classes)
    torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % num_classes).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:3]}"


@pytest.mark.parametrize("name,shape", SMALL)
def test_small_presets_forward_and_backward(name, shape):
    torch.manual_seed(0)
    assert name in MODELS
    model = build_model(name, 7, shape)
    _forward_backward(model, torch.randn(2, *shape), 7)


@pytest.mark.parametrize("name,count", BIG.items())
def test_big_presets_construct_with_the_published_size(name, count):
    with torch.device("meta"):  # no memory, no init cost: only the architecture is checked
        model = build_model(name, 1000, (3, 224, 224))
        grey = build_model(name, 10, (1, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == count
    assert grey.conv1.in_channels == 1 and grey.fc.out_features == 10


def test_resnet50_forward_on_a_small_image():
    torch.manual_seed(0)
    model = build_model("resnet50", 5, (3, 64, 64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_cifar_resnet_depths_and_sizes():
    def count(name, **options):
        return sum(p.numel() for p in build_model(name, 10, (3, 32, 32), **options).parameters())

    assert round(count("resnet20") / 1e6, 2) == 0.27  # He et al. 2016, Table 6
    assert round(count("resnet56") / 1e6, 2) == 0.85
    assert count("resnet_cifar", depth=20) == count("resnet20")
    blocks = build_model("resnet32", 10, (3, 32, 32)).blocks
    assert len(blocks) == 15 and [b.conv1.out_channels for b in blocks[::5]] == [16, 32, 64]
    wide = build_model("resnet20", 10, (3, 32, 32), width=2)
    assert [b.conv1.out_channels for b in wide.blocks[::3]] == [32, 64, 128]
    assert count("resnet20", shortcut="B") > count("resnet20")  # 1x1 projections add parameters


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 4, 7, 7)
    out = ShortcutA(4, 8, stride=2)(x)
    assert out.shape == (2, 8, 4, 4)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert (out[:, :2] == 0).all() and (out[:, 6:] == 0).all()


def test_zero_init_residual_starts_blocks_at_identity():
    for name in ("resnet20", "resnet_tv_tiny"):
        model = build_model(name, 10, (3, 32, 32), zero_init_residual=True)
        last_bns = [m.bn2 for m in model.modules() if hasattr(m, "bn2")]
        assert last_bns and all((bn.weight == 0).all() for bn in last_bns)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="depth"):
        build_model("resnet_cifar", 10, (3, 32, 32), depth=21)
    with pytest.raises(ConfigError, match="shortcut"):
        build_model("resnet20", 10, (3, 32, 32), shortcut="C")
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet18", 10, (3, 32, 32), no_such_option=1)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet19", 10, (3, 32, 32))


def test_model_files_never_import_torch_distributed():
    import codistill.models as models

    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("distributed" in n for n in names), f"{path.name} imports {names}"


def test_two_architectures_codistill_through_flat_states():
    """Model 0 is a tiny CIFAR ResNet, model 1 the small CNN, on one input: each worker holds the
    other architecture as a teacher, and an exchange (a FlatState of the sender's layout) makes the
    teacher compute exactly what the sender computes."""
    from codistill.exchange import Teachers
    from codistill.flat import FlatState

    shape, classes = (1, 28, 28), 10
    torch.manual_seed(0)
    students = [build_model("resnet_cifar_tiny", classes, shape), build_model("cnn", classes, shape)]
    flats = [FlatState(m) for m in students]
    assert flats[0].nbytes != flats[1].nbytes and flats[0].names != flats[1].names
    x = torch.randn(4, *shape)
    for s in students:  # a train step moves BatchNorm running statistics too
        s(x).sum().backward()
        with torch.no_grad():
            for p in s.parameters():
                p.sub_(0.1 * p.grad)

    for me, other in ((0, 1), (1, 0)):
        teacher_arch = build_model(["resnet_cifar_tiny", "cnn"][other], classes, shape)
        teachers = Teachers({other: copy.deepcopy(teacher_arch)})
        flats[other].pack(students[other])  # what the exchange broadcasts from the other model
        teachers.flats[other].copy_(flats[other])
        teachers.versions[other] = 0  # what the exchanger records: weights current as of step 0
        (logits,) = teachers.logits(x)
        with torch.no_grad():
            expected = copy.deepcopy(students[other]).eval()(x)
        assert logits.shape == (4, classes)
        torch.testing.assert_close(logits, expected)
