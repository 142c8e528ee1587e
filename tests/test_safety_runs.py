"""Real runs for issue 15: a `#` in --out neither hangs nor leaves a stray file, a worker's own error
is what the user sees, a finished run is not resumed, and run files are 0644 with PNG curves."""

from __future__ import annotations

import os
import subprocess
import sys

DIGITS = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false",
          "--set", "train.steps=6", "--set", "train.log_every=2", "--set", "dist.timeout_s=60",
          "--set", "codistill.exchange_every=1"]  # S >= 4 T: no pre-launch warning beside the error


def codistill(*args, env=None, cwd=None, timeout=280):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        full.pop(var, None)
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full)


def test_hash_in_out_path_neither_hangs_nor_strays_and_finished_run_is_not_resumed(tmp_path):
    # The old file:// rendezvous cut "a#b/.rendezvous" at '#': with "a" an existing file it hung.
    (tmp_path / "a").write_text("not yours")
    proc = codistill("train", *DIGITS, "--nproc", "2", "--out", "a#b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "a").read_text() == "not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a#b"]
    run = tmp_path / "a#b"
    assert "model 0 (cnn_tiny)" in proc.stdout and "model 1 (cnn_tiny)" in proc.stdout
    for name in ("train_loss.png", "val_accuracy.png", "param_distance.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("summary.json", "config.yaml", "checkpoints/latest.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name

    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = codistill("train", "--resume", str(run))
    assert again.returncode == 2 and "already complete (6 steps)" in again.stderr, again.stderr
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_failing_rank_own_error_is_reported(tmp_path):
    proc = codistill("train", *DIGITS, "--nproc", "2", "--out", str(tmp_path / "run"),
                     env={"CODISTILL_FAULT": "raise@1:3"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "rank 1 failed: RuntimeError: injected fault at step 3 on rank 1" in lines[0]
    log = (tmp_path / "run" / "error.log").read_text()
    assert "Traceback" in log and "inject_fault" in log


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
