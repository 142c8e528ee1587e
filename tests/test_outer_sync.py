"""DiLoCo / local SGD outer steps (codistill.outer_sync): the math against a hand computation,
in one process and over gloo on the 2 x 2 grid, and the config / compare plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mp_helpers import run_workers

pytestmark = pytest.mark.timeout(300)


def _net() -> nn.Module:
    """Two parameters and one BatchNorm, in float64 so the hand computation is exact to 1e-15."""
    return nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1, affine=False)).double()


def _set(net: nn.Module, w: float, running_mean: float = 0.0) -> None:
    with torch.no_grad():
        net[0].weight.fill_(w)
        net[1].running_mean.fill_(running_mean)


def _nesterov_by_hand(theta0: float, locals_: list[list[float]], lr=0.7, mu=0.9) -> list[float]:
    """Algorithm 1 of DiLoCo with torch's Nesterov SGD, one outer step per list of local models."""
    theta, buf, out = theta0, None, []
    for models in locals_:
        delta = sum(theta - m for m in models) / len(models)
        buf = delta if buf is None else mu * buf + delta
        theta = theta - lr * (delta + mu * buf)
        out.append(theta)
    return out


def _single_worker(rank, world):
    from codistill.outer_sync import OuterSync
    from codistill.topology import build_topology

    topo = build_topology(1)
    net = _net()
    _set(net, 1.0)
    sync = OuterSync(net, topo, every=2, lr=0.7, momentum=0.9, nesterov=True)
    sync.maybe_exchange(0)
    got = []
    _set(net, 0.25)  # H = 2 local steps move the weight to 0.25
    assert not sync.maybe_exchange(1)
    assert sync.maybe_exchange(2)
    got.append(net[0].weight.item())
    _set(net, got[0] - 0.5)
    sync.finish()
    got.append(net[0].weight.item())
    sync.finish()  # idempotent: no local step since the last outer step
    got.append(net[0].weight.item())
    return torch.tensor(got, dtype=torch.float64)


def test_outer_step_matches_algorithm_1_in_one_process(tmp_path):
    (got,) = run_workers(_single_worker, 1, tmp_path)
    first, second = _nesterov_by_hand(1.0, [[0.25]])[0], None
    second = _nesterov_by_hand(1.0, [[0.25], [first - 0.5]])[1]
    assert got.tolist() == pytest.approx([first, second, second], abs=1e-15)
    # First step by hand: delta 0.75, g = 0.75 + 0.9 * 0.75, theta = 1 - 0.7 * 1.425 = 0.0025.
    assert first == pytest.approx(0.0025, abs=1e-15)


def _grid_worker(rank, world, lr, momentum, nesterov, hierarchical=False):
    from codistill.accounting import CommCounter
    from codistill.outer_sync import OuterSync
    from codistill.topology import build_topology

    topo = build_topology(2)  # 2 models x 2 replicas
    model, replica = topo.model_index, topo.replica_index
    net = _net()
    _set(net, 10.0 + model)  # different inits: step 0 must give everyone model 0's
    counter = CommCounter()
    sync = OuterSync(net, topo, every=3, lr=lr, momentum=momentum, nesterov=nesterov, counter=counter,
                     hierarchical=hierarchical)
    sync.maybe_exchange(0)
    start = net[0].weight.item()
    # Local training: model m ends at 10 - (m + 1); replica 1's BatchNorm statistics drifted
    # (DDP keeps parameters identical in a group, not buffers): replica 0's must win.
    _set(net, 10.0 - (model + 1), running_mean=4.0 * model if replica == 0 else 99.0)
    sync.maybe_exchange(1), sync.maybe_exchange(2)
    sync.maybe_exchange(3)
    return torch.tensor([start, net[0].weight.item(), net[1].running_mean.item(), counter.exchange_sent],
                        dtype=torch.float64)


@pytest.mark.parametrize("method, hierarchical", [("diloco", False), ("localsgd", False), ("diloco", True)])
def test_outer_step_over_the_grid_columns_gloo(tmp_path, method, hierarchical):
    # hierarchical: only replica 0's column all-reduces, then broadcasts in its group: same values.
    from codistill.outer_sync import AVERAGING

    settings = (0.7, 0.9, True) if method == "diloco" else AVERAGING
    results = run_workers(_grid_worker, 4, tmp_path, (*settings, hierarchical))
    expected = _nesterov_by_hand(10.0, [[9.0, 8.0]], *settings[:2])[0]
    if method == "localsgd":
        assert expected == 8.5  # plain averaging of the two models
    nbytes = 3 * 8  # the state: weight, running_mean, running_var, float64
    for r in results:
        start, weight, running_mean, sent = r.tolist()
        assert start == 10.0  # everyone started from model 0's initialization
        assert weight == pytest.approx(expected, abs=1e-14)
        assert running_mean == 2.0  # mean of replica 0's statistics of the two models (0 and 4)
        # Step 0 (model 0 sends its state to the other model), then one all-reduce among 2: 1x state.
        initial = nbytes if r is results[0] or r is results[1] else 0
        if hierarchical and (r is results[1] or r is results[3]):
            assert sent == 0  # replica 1 of each group: nothing crosses between the groups
        else:
            assert sent == initial + nbytes


def test_config_validates_outer_settings_and_methods():
    from codistill.config import load_config
    from codistill.errors import ConfigError

    for bad, message in (("outer.lr=.nan", "outer.lr"), ("outer.lr=0", "outer.lr"),
                         ("outer.momentum=1", "outer.momentum"), ("outer.every=0", "outer.every"),
                         ("codistill.method=adam", "codistill.method")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["codistill.method=diloco", bad])
    with pytest.raises(ConfigError, match="one architecture"):
        load_config(None, ["codistill.method=localsgd", "model.name=[cnn, mlp]"])
    assert load_config(None, ["codistill.method=diloco"]).mode == "diloco"
    assert math.isfinite(load_config(None, []).outer.lr)


def test_compare_derives_diloco_and_localsgd_from_the_codistill_arm():
    from mp_helpers import digits_config

    from codistill.arms import arm_configs
    from codistill.config import replace

    cfg = replace(digits_config(), compare__arms=["allreduce", "codistill", "diloco", "localsgd"],
                  codistill__exchange_every=7)
    arms = dict(arm_configs(cfg, 4))
    assert list(arms) == ["allreduce", "codistill", "diloco", "localsgd"]
    assert [arms[a].codistill.method for a in ("codistill", "diloco", "localsgd")] == ["distill", "diloco", "localsgd"]
    for a in ("diloco", "localsgd"):  # same grid, steps and schedules as codistillation
        assert arms[a].train == arms["codistill"].train and arms[a].schedule == arms["codistill"].schedule
        assert arms[a].codistill.n_models == 2 and arms[a].codistill.exchange_every == 7
