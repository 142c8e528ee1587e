"""The cost model's formulas, with exact values, and the rate parser."""

from __future__ import annotations

import pytest

from codistill import cost_model as cm
from codistill.errors import UserError

NO_HEADERS = dict(wire_overhead=1.0)
NO_LAT = cm.Link(8e6, **NO_HEADERS)  # 1 MB/s, no latency


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
    # over 100 steps at H = 50: the start's broadcast (2.001 s) and outer steps at 50 and at the end
    assert cm.outer_sync_run_s_per_step(0.1, 2, 2, 1_000_000, 50, 100, link) == \
        pytest.approx(0.1 + (2.001 + 2 * 2.002) / 100)
    assert cm.outer_sync_run_s_per_step(0.1, 2, 2, 1_000_000, 50, 101, link) == \
        pytest.approx(0.1 + (2.001 + 3 * 2.002) / 101)
    assert cm.async_overlap(2.0, delay_steps=10, step_s=0.1) == 0.5
    assert cm.async_overlap(0.5, delay_steps=10, step_s=0.1) == 1.0
    assert cm.async_overlap(0.0, delay_steps=0, step_s=0.1) == 1.0
    # a run of 100 steps at T = 50: 2 exchanges of 2 s; step 0's is synchronous, the other half hidden
    assert cm.codistill_run_s_per_step(0.1, 0.0, 2, 2, 1_000_000, 50, 100, NO_LAT) == pytest.approx(0.1 + 4.0 / 100)
    assert cm.codistill_run_s_per_step(0.1, 0.0, 2, 2, 1_000_000, 50, 100, NO_LAT, delay=10) == \
        pytest.approx(0.1 + 3.0 / 100)
    assert cm.time_to_target_s(120, 0.25) == 30.0
    assert cm.time_to_target_s(None, 0.25) is None


def test_cross_group_bytes_from_summary():
    ar = {"n_models": 1, "world_size": 4, "steps": 10, "bytes_per_worker": {"allreduce": 25_304_280, "exchange": 0}}
    cd = {"n_models": 2, "world_size": 4, "steps": 100,
          "bytes_per_worker": {"allreduce": 1e8, "exchange": 2 * 1_687_736}}
    assert cm.cross_group_bytes_per_step(ar, groups=2) == 2 * 2_530_428
    assert cm.cross_group_bytes_per_step(ar, groups=1) == 0.0
    assert cm.cross_group_bytes_per_step(cd, groups=2) == 4 * 2 * 1_687_736 / 100


def _summary(n_models, steps, allreduce, exchange, exchanges=0, replicas=2, every=None, acc=0.9):
    return {"n_models": n_models, "world_size": 4, "replicas": replicas, "steps": steps, "exchanges": exchanges,
            "exchange": "collective", "exchange_every": every, "wall_seconds": 12.0,
            "bytes_per_worker": {"allreduce": allreduce, "exchange": exchange},
            "models": [{"val_accuracy": acc, "test_accuracy": acc, "train_loss": 0.5, "param_distance": 1.0}],
            "ensemble_val_accuracy": acc}


AR = _summary(1, 100, allreduce=100 * 1.5e6, exchange=0, replicas=4, acc=0.9)  # G = 1 MB, W = 4
CD = _summary(2, 100, allreduce=100 * 1e6, exchange=2 * 1e6, exchanges=2, every=50, acc=0.88)  # S = 1 MB
EVALS_AR = [{"step": 50, "accuracy": 0.85, "time_without_eval": 5.0}, {"step": 100, "accuracy": 0.9,
                                                                          "time_without_eval": 10.0}]
EVALS_CD = [{"step": 50, "accuracy": 0.91, "time_without_eval": 6.0}, {"step": 100, "accuracy": 0.88,
                                                                          "time_without_eval": 12.0}]


def test_project_compare_arms():
    link = cm.Link(8e6, **NO_HEADERS)  # 1 MB/s, no latency
    ar = cm.project_arm("allreduce", AR, EVALS_AR, 0.9, link, groups=2)
    assert ar["local_s_per_step"] == 0.1 and ar["steps_to_target"] == 100
    assert ar["s_per_step"] == pytest.approx(0.1 + 1.5)  # 2 (W-1)/W G = 1.5 MB per step at 1 MB/s
    assert ar["time_to_target_s"] == pytest.approx(160.0)
    assert ar["cross_group_bytes_per_step"] == 2 * 1.5e6
    cd = cm.project_arm("codistill", CD, EVALS_CD, 0.9, link, groups=2)
    assert cd["steps_to_target"] == 50  # the first evaluation at or above the target
    assert cd["s_per_step"] == pytest.approx(0.12 + 2.0 / 50)  # r (n-1) S = 2 MB every 50 steps
    assert cd["time_to_target_s"] == pytest.approx(50 * 0.16)
    assert cd["cross_group_bytes_per_step"] == 4 * 2e6 / 100
    hidden = cm.project_arm("codistill", CD, EVALS_CD, 0.9, link, groups=2, delay=10)  # 1.2 s of 2 s hidden
    assert hidden["s_per_step"] == pytest.approx(0.12 + 0.8 / 50)
    other = cm.project_arm("diloco", _summary(1, 100, 0, 0), EVALS_AR, 0.99, link, groups=2)
    assert other["s_per_step"] is None and other["time_to_target_s"] is None and other["steps_to_target"] is None


def test_compare_tables_report_cross_group_bytes_and_projection():
    from codistill.compare import format_table, projection_table

    results = [{"name": "allreduce", "summary": AR}, {"name": "codistill", "summary": CD}]
    table = format_table(results).splitlines()
    assert table[0].endswith("| exchange bytes/worker | eval bytes/worker | cross-group bytes/step | wall (s) | "
                             "compute/step vs all-reduce | converged (last quarter) |")
    assert table[2].startswith("| allreduce | 1 x 4 |") and table[2].endswith("| 3.0 MB | 12 | - | - |")
    assert table[3].startswith("| codistill | 2 x 2 |") and table[3].endswith("| 80.0 KB | 12 | - | - |")
    link = cm.Link(8e6, **NO_HEADERS)
    projected = [cm.project_arm("allreduce", AR, EVALS_AR, 0.9, link, 2),
                 cm.project_arm("codistill", CD, EVALS_CD, 0.9, link, 2)]
    text = projection_table(projected, 8e6, results[0])
    assert "Projected on a 8 Mbit/s link" in text
    assert "target: 89.50% validation accuracy (the allreduce arm's final 90.00%, model 0, less 0.5 points)" in text
    assert "| allreduce | 0.100 | 1.600 | 100 | 160.0 |" in text
    assert "| codistill | 0.120 | 0.160 | 50 | 8.0 |" in text
