"""The converged-target table (bench/converged.py): steps to a target read from the suite's rows,
time from the cost model, arms that never reach the target reported as such."""

import json

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
