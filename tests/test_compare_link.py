"""`codistill compare --link`: strict parsing, and a real compare that projects its arms onto links and
says whether each arm converged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def codistill(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("bad", ["fast", "1gb", "0mbit", "1 gbit"])
def test_bad_link_is_one_line_error_before_anything_is_created(tmp_path, bad):
    out = tmp_path / "cmp"
    proc = codistill("compare", "--config", str(ROOT / "configs/digits_tiny.yaml"), "--link", bad,
                     "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"codistill: error: --link: expected a rate such as 1gbit, 100mbit or 2.5gbit "
                     f"(units: bit, kbit, mbit, gbit, tbit), got {bad!r}"]
    assert not out.exists()


def test_compare_with_link_projects_each_arm(tmp_path):
    out = tmp_path / "cmp"
    proc = codistill("compare", "--config", str(ROOT / "configs/digits_tiny.yaml"), "--set", "train.epochs=3",
                     "--set", "schedule.milestones=[2]", "--set", "compare.arms=[allreduce, codistill]",
                     "--set", "train.progress=false", "--set", "train.eval_every=5",
                     "--nproc", "2", "--link", "10mbit", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["link"]["bits_per_s"] == 1e7
    proj = {p["name"]: p for p in report["link"]["arms"]}
    summaries = {a["name"]: a["summary"] for a in report["arms"]}
    ar, cd = proj["allreduce"], proj["codistill"]
    # all-reduce's ring crosses the two groups every step; codistillation's exchange every T = 10 steps
    G = summaries["allreduce"]["bytes_per_worker"]["allreduce"] / summaries["allreduce"]["steps"]
    assert ar["cross_group_bytes_per_step"] == pytest.approx(2 * G)
    S = summaries["codistill"]["bytes_per_worker"]["exchange"] / summaries["codistill"]["exchanges"]
    assert cd["cross_group_bytes_per_step"] == pytest.approx(2 * S * summaries["codistill"]["exchanges"]
                                                             / summaries["codistill"]["steps"])
    # the link's cost comes on top of each arm's compute (its local clock without exchange waits)
    assert ar["s_per_step"] > ar["compute_s_per_step"] > 0 and cd["s_per_step"] > cd["compute_s_per_step"] > 0
    assert cd["compute_s_per_step"] <= cd["local_s_per_step"]
    assert 0 < ar["steps_to_target"] <= summaries["allreduce"]["steps"]  # it reaches its own final accuracy
    md = (out / "compare.md").read_text()
    assert "| cross-group bytes/step |" in md and "Projected on a 10 Mbit/s link between model groups" in md
    assert "| projected s/step |" in proc.stdout

    # What the table says about itself (the same run: one cheap end-to-end compare covers it all).
    assert ("codistill: warning: the comparison runs 120 updates, fewer than 200 for this recipe "
            "(100 per learning-rate stage x 2 stages)") in proc.stderr  # before launch
    assert "| wall (s) | compute/step vs all-reduce | converged (last quarter) |" in proc.stdout
    cells, any_not = {}, False
    for arm in report["arms"]:
        changes = []
        for m in arm["summary"]["models"]:  # the budget rule, computed here from the logs
            rows = [json.loads(line) for line in (out / arm["name"] / f"model_{m['index']}" / "metrics.jsonl")
                    .read_text().splitlines()]
            curve = [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r]
            start = [a for step, a in curve if step <= 0.75 * 120][-1]
            changes.append(curve[-1][1] - start)
        worst = max(changes)
        cells[arm["name"]] = f"{'yes' if worst < 0.002 else 'no'} ({100 * worst:+.2f} pts)"
        any_not |= worst >= 0.002
        assert arm["convergence"]["changes"] == pytest.approx(changes)
    row = {name: next(line for line in proc.stdout.splitlines()
                      if line.startswith(f"| {name} | {summaries[name]['n_models']} x "))
           for name in cells}
    assert row["allreduce"].endswith(f"| 1.00x | {cells['allreduce']} |")
    ratio = report["arms"][1]["compute_s_per_step"] / report["arms"][0]["compute_s_per_step"]
    assert row["codistill"].endswith(f"| {ratio:.2f}x | {cells['codistill']} |")
    assert ("**Budget:**" in proc.stdout) == any_not
    # The cost model at 1 Gbit/s, 100 and 10 Mbit/s under the table, beside --link's own rate.
    assert [p["bits_per_s"] for p in report["projections"]] == [1e9, 1e8, 1e7]
    assert "| arm | compute s/step (measured) | step at target | 1 Gbit/s | 100 Mbit/s | 10 Mbit/s |" in proc.stdout
    slow = {p["name"]: p for p in report["projections"][2]["arms"]}
    assert slow["allreduce"]["s_per_step"] > slow["allreduce"]["compute_s_per_step"] > 0
    assert all(f"| {name} | {slow[name]['compute_s_per_step']:.3f} |" in proc.stdout for name in slow)
