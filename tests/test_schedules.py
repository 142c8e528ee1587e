"""Schedules at their boundaries, exactly."""

import pytest
import torch

from codistill.config import load_config
from codistill.recipe import build_optimizer, build_schedules, param_groups
from codistill.schedules import AlphaSchedule, LRSchedule, StageSchedule, apply_to_optimizer, scaled_lr


def test_goyal_warmup_then_steps():
    lr = LRSchedule("goyal", base=0.1, peak=0.4, warmup=10, total=100, milestones=(30, 60, 80), gamma=0.1)
    assert lr(0) == 0.1
    assert lr(5) == pytest.approx(0.25)
    assert lr(9) == pytest.approx(0.1 + 0.3 * 9 / 10)
    assert lr(10) == 0.4
    assert lr(29) == 0.4
    assert lr(30) == pytest.approx(0.04)
    assert lr(59) == pytest.approx(0.04)
    assert lr(60) == pytest.approx(0.004)
    assert lr(80) == pytest.approx(0.0004)
    assert lr(99) == pytest.approx(0.0004)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 512) == pytest.approx(0.2)
    assert scaled_lr(0.1, 256) == 0.1
    assert scaled_lr(0.1, 128, scale=False) == 0.1


def test_cosine_after_warmup():
    lr = LRSchedule("cosine", base=0.0, peak=1.0, warmup=10, total=110)
    assert lr(0) == 0.0
    assert lr(10) == 1.0
    assert lr(60) == pytest.approx(0.5)
    assert lr(110) == pytest.approx(0.0)
    assert lr(200) == pytest.approx(0.0)


def test_constant():
    lr = LRSchedule("constant", base=0.3, peak=0.3, warmup=0, total=10)
    assert [lr(s) for s in (0, 5, 9)] == [0.3, 0.3, 0.3]


def test_weight_decay_stages_switch_at_milestones():
    wd = StageSchedule((1e-4, 1e-5, 0.0), (30, 60))
    assert wd(0) == 1e-4 and wd(29) == 1e-4
    assert wd(30) == 1e-5 and wd(59) == 1e-5
    assert wd(60) == 0.0 and wd(10_000) == 0.0
    assert StageSchedule((5e-4,))(123) == 5e-4
    with pytest.raises(ValueError):
        StageSchedule((1e-4, 1e-5), (10, 20))


def test_alpha_schedules():
    assert AlphaSchedule("constant", 0.5)(0) == 0.5
    burn = AlphaSchedule("burnin", 2.0, 100)
    assert burn(0) == 0.0 and burn(99) == 0.0 and burn(100) == 2.0
    ramp = AlphaSchedule("ramp", 2.0, 100)
    assert ramp(0) == 0.0 and ramp(50) == 1.0 and ramp(100) == 2.0 and ramp(1000) == 2.0


def test_no_decay_groups_for_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    groups = param_groups(model, decay_bias_and_norm=False)
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 weights; 2 biases + BN weight and bias
    opt = torch.optim.SGD(groups, lr=1.0)
    apply_to_optimizer(opt, 0, lambda s: 0.5, lambda s: 1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


def test_build_schedules_converts_epochs_to_steps():
    cfg = load_config(None, ["schedule.warmup_epochs=1", "schedule.milestones=[2, 3]",
                             "optim.weight_decay=[1e-4, 1e-5, 0]", "optim.lr=0.1", "train.epochs=4"])
    s = build_schedules(cfg, steps_per_epoch=10, model_batch=512)
    assert s.total_steps == 40
    assert s.lr(0) == 0.1 and s.lr(10) == pytest.approx(0.2) and s.lr(20) == pytest.approx(0.02)
    assert s.weight_decay(19) == 1e-4 and s.weight_decay(20) == 1e-5 and s.weight_decay(30) == 0.0
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_warm_up_without_lr_scaling_starts_from_zero():
    # Unscaled (e.g. batches counted in tokens) there is no smaller LR to start from; a warm-up
    # that started at lr would be silently flat.
    cfg = load_config(None, ["schedule.warmup_epochs=1", "schedule.scale_lr=false", "optim.lr=0.4",
                             "schedule.name=cosine", "train.epochs=3"])
    s = build_schedules(cfg, steps_per_epoch=10, model_batch=2048)
    assert [s.lr(k) for k in (0, 5, 10)] == [0.0, 0.2, 0.4] and s.lr(30) == 0.0
    cfg = load_config(None, ["schedule.warmup_epochs=0", "schedule.scale_lr=false", "optim.lr=0.4"])
    assert build_schedules(cfg, steps_per_epoch=10, model_batch=2048).lr(0) == 0.4


def test_adamw_is_available():
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.9, 0.98]"])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
