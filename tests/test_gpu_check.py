"""The one-shot GPU validation script (bench/gpu_check.py) runs its logic on CPU with gloo: every
check that CPU can run passes (the host-sync check needs CUDA and says so), and without a GPU the
real run refuses in one line instead of claiming anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def codistill(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# The whole dry run takes 3-7 minutes on 2 cores; the suite runs the checks no other test covers
# (storage, async exchange and all-reduce runs are tested elsewhere, the ResNet script by
# test_bench_quick.py): `codistill bench gpu --cpu` runs them all.
CHECKS = ("codistill_sync_exchange_stall", "checkpoint_kill_resume_bitwise", "no_host_sync_in_step")


@pytest.mark.timeout(900)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "codistill.bench.gpu_check", "--cpu", "--out", str(tmp_path),
                           "--only", *CHECKS], capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["checks"]}
    assert set(rows) == set(CHECKS)
    assert rows["no_host_sync_in_step"]["status"] == "skipped"  # needs CUDA, and says so
    for name in set(CHECKS) - {"no_host_sync_in_step"}:
        assert rows[name]["status"] == "ok", rows[name]
    assert "bitwise equal (2 models," in rows["checkpoint_kill_resume_bitwise"]["detail"]  # really compared
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAILED", "skipped"))]
    assert len(lines) == len(rows)  # one line per check


def test_bench_gpu_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = codistill("bench", "gpu", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device is visible; nothing was checked (--cpu runs the logic on CPU)"]


def test_gpu_check_without_a_gpu_checks_nothing(tmp_path, monkeypatch):
    from codistill.bench import gpu_check

    monkeypatch.setattr(gpu_check, "gpus", lambda: 0)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu_check.json").exists()
