"""`compare` and `reproduce --quick` as torchrun runs them: every process runs the command, one
process group per arm, only rank 0 writes directories and reports (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, cwd, timeout=420):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "codistill.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_compare_under_torchrun_runs_every_arm_on_torchruns_world(tmp_path):
    out = tmp_path / "cmp"
    proc = torchrun("compare", "--config", str(ROOT / "configs/digits_tiny.yaml"), "--set", "train.steps=5",
                    "--set", "train.progress=false", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = {a["name"]: a["summary"] for a in json.loads((out / "compare.json").read_text())["arms"]}
    assert list(arms) == ["allreduce", "codistill", "diloco", "localsgd"]  # the default arms
    assert {s["world_size"] for s in arms.values()} == {2}  # torchrun's world, not dist.nproc = 4
    assert arms["codistill"]["replicas"] == 1 and arms["allreduce"]["replicas"] == 2
    assert proc.stdout.count("== arm allreduce: 1 model(s) x 2 worker(s)") == 1  # said once, by rank 0
    assert proc.stdout.count("| localsgd |") == 2  # in the table and in the projections, once


def test_reproduce_quick_under_torchrun_writes_each_row_once(tmp_path):
    out = tmp_path / "results"
    proc = torchrun("reproduce", "F1", "--quick", "--out", str(out), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "F1.jsonl").read_text().splitlines()]
    keys = [(r["variant"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) > 0  # one row per run, not one per process
    assert {r["config"]["world_size"] for r in rows} == {2}  # torchrun's world
    assert (out / "results.md").is_file()
