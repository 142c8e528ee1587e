"""The converged-target table (bench/converged.py): steps to a target read from the suite's rows,
time from the cost model, arms that never reach the target reported as such."""

import json
import statistics

import pytest

from codistill import cost_model as cm
from codistill.bench import converged


def _row(variant, seed, final, curve, *, steps=1260, wall=126.0, allreduce_bytes=0.0):
    return {"experiment": "F1", "variant": variant, "seed": seed, "steps": steps, "wall_seconds": wall,
            "val_accuracy": [final], "bytes_allreduce": allreduce_bytes, "curve": {"val/accuracy": curve}}


def test_reach_reads_the_first_evaluation_at_the_target_and_the_best():
    row = _row("allreduce-long", 0, 0.91, [[126, 0.85], [252, 0.905], [378, 0.91], [504, 0.908]])
    assert converged.reach(row, 0.905) == {"step": 252, "best": 0.91, "best_step": 378, "curve": True}
    assert converged.reach(row, 0.92)["step"] is None
    nll = {**row, "val_loss": [2.9], "curve": {"val/loss": [[150, 4.0], [300, 2.95], [450, 2.9]]}}
    assert converged.reach(nll, 2.95, "translation") == {"step": 300, "best": 2.9, "best_step": 450, "curve": True}
    old = {**row, "curve": {}}  # a row kept before curves: only its final value
    assert converged.reach(old, 0.905)["step"] == "by the end" and converged.reach(old, 0.95)["step"] is None


@pytest.mark.timeout(60)
def test_table_projects_all_reduce_and_reports_the_arm_that_never_reaches(tmp_path):
    grad = 208_648.0  # the width-8 CNN's gradient bytes; W = 4: 1.5 G per worker per step
    ar = [_row("allreduce-long", s, 0.91, [[126, 0.80], [252, 0.906], [1260, 0.91]], wall=126.0,
               allreduce_bytes=1.5 * grad * 1260) for s in range(3)]
    cd = [{**_row("codistill-trained", s, 0.90, [[126, 0.80], [1260, 0.90]], wall=189.0)} for s in range(3)]
    (tmp_path / "F1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ar + cd))
    result = converged.build(tmp_path, None)
    image = result.data["image"]
    assert image["target"] == pytest.approx(0.905)
    allreduce, codistill = image["arms"]
    assert [h["step"] for h in allreduce["reach"]] == [252, 252, 252]
    link = cm.Link(10e6)
    expected = cm.allreduce_step_s(0.1, grad, 4, link) * 252  # clock 126 s / 1,260 updates
    assert allreduce["per_rate"]["10"]["time_to_target_s"] == pytest.approx(expected)
    assert codistill["compute_ratio"] == pytest.approx(1.5) and codistill["per_rate"]["10"]["time_to_target_s"] is None
    assert "| never | 90.00% at 1260 |" in result.table
    assert image["common_target"] == pytest.approx(0.90)  # the level every run reaches


def _cell(arm, rate, s_per_step, kind, *, mbit=1000.0, n=2, world=4):
    return {"profile": "image", "rate_mbit": rate, "arm": arm, "quick": False, "measured_mbit": mbit,
            "s_per_step": s_per_step, "period_s_per_step": [s_per_step], "steps": 100, "load_before": 1.0,
            "load_after": 2.0, "model_bytes": {"grad": 208_648.0, "state": 210_000.0},
            "facts": {"kind": kind, "world": world, "n": n, "period": 25, "delay": 0, "steps": 1260}}


def test_period_clock_starts_after_the_warm_up(tmp_path):
    rows = [{"step": s, "train/loss": 1.0, "time": t} for s, t in [(25, 9.0), (50, 11.5), (75, 14.5), (100, 16.5)]]
    (tmp_path / "model_0").mkdir()
    (tmp_path / "model_0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                                       + json.dumps({"step": 100, "val/accuracy": 0.8, "time": 30.0}))
    assert converged.period_seconds_per_step(tmp_path, 25) == pytest.approx([0.1, 0.12, 0.08])


@pytest.mark.timeout(60)
def test_link_table_times_measured_updates_by_measured_step_and_scores_both_projections(tmp_path):
    grad = 208_648.0
    ar = [_row("allreduce-long", s, 0.91, [[126, 0.80], [252, 0.906], [1260, 0.91]], wall=126.0,
               allreduce_bytes=1.5 * grad * 1260) for s in range(3)]
    cd = [_row("codistill-trained", s, 0.90, [[126, 0.80], [1260, 0.90]], wall=189.0) for s in range(3)]
    (tmp_path / "F1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ar + cd))
    label = converged.ARMS[1][0]
    cells = [_cell("all-reduce", None, 0.11, "allreduce", n=1), _cell("all-reduce", 10, 0.40, "allreduce", n=1),
             _cell(label, None, 0.15, "codistill"), _cell(label, 10, 0.16, "codistill")]
    result = converged.build(tmp_path, None, cells)
    link = result.data["image"]["link"]
    allreduce, codistill = link["cells"]
    m = {**cells[0]["facts"], **cells[0]["model_bytes"]}
    # compute = the unshaped cell less its link time at the veth's measured rate; then the nominal 10 Mbit/s
    compute = 0.11 - cm.allreduce_step_s(0.0, grad, 4, cm.Link(1e9))
    projected = cm.allreduce_step_s(compute, grad, 4, cm.Link(10e6))
    assert allreduce["projected_s_per_step"]["calibration"] == pytest.approx(projected)
    rows_projection = result.data["image"]["arms"][0]["per_rate"]["10"]["s_per_step"]
    assert allreduce["projected_s_per_step"]["rows"] == pytest.approx(rows_projection)
    reach = allreduce["time_to_target_s"]["90.50%"]  # the converged target: 91% less 0.5 points
    assert m["kind"] == "allreduce" and reach["updates"] == 252
    assert reach["measured"] == pytest.approx(252 * 0.40) and reach["calibration"] == pytest.approx(252 * projected)
    assert allreduce["error"]["calibration"] == pytest.approx(abs(projected - 0.40) / 0.40)
    assert codistill["time_to_target_s"]["90.50%"] == {"updates": None, "measured": None, "calibration": None,
                                                       "rows": None}
    assert codistill["time_to_target_s"]["90.0%"]["measured"] == pytest.approx(1260 * 0.16)  # the level all reach
    med = link["median_error"]["rows"]
    assert med["cells"] == 2 and med["cells_reaching_90.50%"] == 1 and med["cells_reaching_90.0%"] == 2
    assert med["s_per_step"] == pytest.approx(statistics.median([allreduce["error"]["rows"], codistill["error"]["rows"]]))
    assert med["time_to_90.50%"] == pytest.approx(allreduce["error"]["rows"])
    assert f"| all-reduce | 10 Mbit/s | 0.400 (0.40) | {projected:.3f} " in result.table


def test_measured_cells_resume_without_touching_the_link(tmp_path, monkeypatch):
    from codistill.bench import netns

    class NoLink:
        def __init__(self, *a, **k):
            raise AssertionError("the link was set up")

    monkeypatch.setattr(netns, "TwoMachines", NoLink)
    st = converged.link_settings(True)
    arms = list(converged.link_arms(st))
    cells = [_cell(a, r, 0.1, "allreduce") | {"quick": True} for r in [None, *st["rates"]] for a in arms]
    (tmp_path / "converged").mkdir()
    path = tmp_path / "converged" / "cells.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in cells))
    assert converged.measure_link(tmp_path, quick=True) == cells
    path.write_text("".join(json.dumps(c) + "\n" for c in cells[:-1]))  # one cell missing: it is measured
    with pytest.raises(AssertionError, match="set up"):
        converged.measure_link(tmp_path, quick=True)
