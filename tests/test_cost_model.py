"""The cost model's formulas, with exact values, and the rate parser."""

from __future__ import annotations

import pytest

from codistill import cost_model as cm
from codistill.errors import UserError

NO_HEADERS = dict(wire_overhead=1.0)


def test_parse_link_rate():
    assert cm.parse_link_rate("1gbit") == 1e9
    assert cm.parse_link_rate("100mbit") == 1e8
    assert cm.parse_link_rate("2.5Gbit/s") == 2.5e9
    assert cm.parse_link_rate(" 25MBIT ") == 25e6
    assert cm.parse_link_rate("800kbit") == 8e5


@pytest.mark.parametrize("bad", ["", "1", "gbit", "1 gbit", "1gb", "1GB/s", "-1gbit", "0mbit", "1e9bit", "fast",
                                 "1.gbit", "1gbit/h"])
def test_parse_link_rate_rejects(bad):
    with pytest.raises(UserError, match="--link: expected a rate such as 1gbit"):
        cm.parse_link_rate(bad)


def test_format_rate():
    assert cm.format_rate(1e9) == "1 Gbit/s"
    assert cm.format_rate(25e6) == "25 Mbit/s"
    assert cm.format_rate(2.5e9) == "2.5 Gbit/s"


def test_link_seconds():
    link = cm.Link(8e6, latency_s=0.01, **NO_HEADERS)  # 1 MB/s
    assert link.seconds(2_000_000) == pytest.approx(2.01)
    assert link.seconds(1_000_000, messages=6) == pytest.approx(1.06)
    assert link.seconds(0, messages=6) == 0.0
    assert cm.Link(8e6).seconds(1448) == pytest.approx(1514 / 1e6)  # headers on the wire


def test_link_bytes():
    G = 1_686_952  # the cnn's gradient bytes (docs/performance.md, bytes benchmark)
    assert cm.ring_allreduce_link_bytes(G, 4) == 2 * 3 / 4 * G == 2_530_428
    assert cm.ring_allreduce_link_bytes(G, 1) == 0.0
    assert cm.exchange_link_bytes(1_000, n_models=2, replicas=2) == 2_000
    assert cm.exchange_link_bytes(1_000, n_models=4, replicas=1) == 3_000
    assert cm.outer_allreduce_link_bytes(1_000, groups=2, replicas=2) == 2_000  # same shape as the exchange
    assert cm.outer_allreduce_link_bytes(1_000, groups=4, replicas=1) == 1_500
    assert cm.outer_allreduce_link_bytes(1_000, groups=1, replicas=3) == 0.0


def test_step_seconds():
    link = cm.Link(8e6, latency_s=0.001, **NO_HEADERS)  # 1 MB/s, 1 ms per message
    # all-reduce, W = 4: 1.5 MB per direction + 6 hops of latency, on top of 0.1 s of compute
    assert cm.allreduce_step_s(0.1, 1_000_000, 4, link) == pytest.approx(0.1 + 1.5 + 0.006)
    assert cm.allreduce_step_s(0.1, 1_000_000, 4, link, overlap=0.5) == pytest.approx(0.1 + 0.753)
    # codistill, n = 2 models of 2 replicas, T = 50: 2 MB per exchange, 1/50 of it per step
    assert cm.codistill_step_s(0.1, 0.03, 2, 2, 1_000_000, 50, link) == pytest.approx(0.13 + 2.001 / 50)
    assert cm.codistill_step_s(0.1, 0.03, 2, 2, 1_000_000, 50, link, overlap=1.0) == pytest.approx(0.13)
    assert cm.codistill_step_s(0.1, 0.03, 4, 1, 1_000_000, 10, link) == pytest.approx(0.19 + 3.001 / 10)
    # outer sync (DiLoCo / local SGD), 2 groups of 2, H = 50: the exchange's bytes, no teachers
    assert cm.outer_sync_step_s(0.1, 2, 2, 1_000_000, 50, link) == pytest.approx(0.1 + 2.002 / 50)
    assert cm.time_to_target_s(120, 0.25) == 30.0
    assert cm.time_to_target_s(None, 0.25) is None


def test_cross_group_bytes_from_summary():
    ar = {"n_models": 1, "world_size": 4, "steps": 10, "bytes_per_worker": {"allreduce": 25_304_280, "exchange": 0}}
    cd = {"n_models": 2, "world_size": 4, "steps": 100,
          "bytes_per_worker": {"allreduce": 1e8, "exchange": 2 * 1_687_736}}
    assert cm.cross_group_bytes_per_step(ar, groups=2) == 2 * 2_530_428
    assert cm.cross_group_bytes_per_step(ar, groups=1) == 0.0
    assert cm.cross_group_bytes_per_step(cd, groups=2) == 4 * 2 * 1_687_736 / 100
