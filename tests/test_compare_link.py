"""`codistill compare --link`: strict parsing, and a real compare that projects its arms onto a link."""

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
    assert ar["s_per_step"] > ar["local_s_per_step"] > 0 and cd["s_per_step"] > cd["local_s_per_step"] > 0
    assert 0 < ar["steps_to_target"] <= summaries["allreduce"]["steps"]  # it reaches its own final accuracy
    md = (out / "compare.md").read_text()
    assert "| cross-group bytes/step |" in md and "Projected on a 10 Mbit/s link between model groups" in md
    assert "| projected s/step |" in proc.stdout
