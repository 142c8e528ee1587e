"""Resume, killed workers, non-finite losses, hung peers, corrupt checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(400)

BASE = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false",
        "--set", "data.batch_size=16", "--set", "train.log_every=2", "--set", "train.checkpoint_every=5"]


def run(*args, env=None, timeout=300):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def final_states(run_dir: Path) -> dict:
    from codistill.checkpoint import latest_model_states

    return latest_model_states(run_dir)


def assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key, tensor in a[name]["model"].items():
            assert torch.equal(tensor, b[name]["model"][key]), (name, key)
        assert a[name]["exchanger"]["versions"] == b[name]["exchanger"]["versions"]


def tensorboard_steps(model_dir, tag: str) -> list[int]:
    """Steps of `tag` as TensorBoard shows them (it drops events a restarted writer purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(model_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_resume_after_a_crash_is_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    # Asynchronous exchange (T=4, swapped 2 steps later): the checkpoint at step 10 holds a transfer
    # started at step 8 and not yet swapped in, the hardest state to resume.
    cfg = [*BASE, "--set", "train.steps=20", "--set", "codistill.exchange_every=4",
           "--set", "codistill.exchange_delay=2", "--set", "model.options={dropout: 0.2}", "--nproc", "4"]
    whole = run("train", *cfg, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    crashed = run("train", *cfg, "--out", str(tmp_path / "crashed"), env={"CODISTILL_FAULT": "kill@1:12"})
    assert crashed.returncode == 2, crashed.stderr[-2000:]
    assert "worker 1 died" in crashed.stderr
    assert json.loads((tmp_path / "crashed" / "checkpoints" / "latest.json").read_text())["step"] == 10
    assert not (tmp_path / "crashed" / "summary.json").exists()

    resumed = run("train", "--resume", str(tmp_path / "crashed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_states(final_states(tmp_path / "whole"), final_states(tmp_path / "crashed"))
    # The metrics log continues without duplicated steps.
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "crashed" / "model_0" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(2, 21, 2))
    assert tensorboard_steps(tmp_path / "crashed" / "model_0", "train/loss") == steps
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["steps"] == 20


def test_diloco_resume_after_a_crash_is_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    # H = 4: the checkpoint at step 10 holds local models 2 steps past the outer step at 8, and the
    # outer Nesterov momentum; the run ends with a final outer step (one model in both groups).
    cfg = [*BASE, "--set", "train.steps=18", "--set", "codistill.exchange_every=4",
           "--set", "codistill.method=diloco", "--nproc", "4"]
    whole = run("train", *cfg, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    crashed = run("train", *cfg, "--out", str(tmp_path / "crashed"), env={"CODISTILL_FAULT": "kill@1:12"})
    assert crashed.returncode == 2, crashed.stderr[-2000:]
    resumed = run("train", "--resume", str(tmp_path / "crashed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_states(tmp_path / "whole"), final_states(tmp_path / "crashed")
    assert a.keys() == b.keys() == {"model_0.pt", "model_1.pt"}
    for name in a:
        for key, tensor in a[name]["model"].items():
            assert torch.equal(tensor, b[name]["model"][key]), (name, key)
            assert torch.equal(tensor, a["model_0.pt"]["model"][key])  # the groups end with one model
        assert all(torch.equal(x, y) for x, y in zip(a[name]["exchanger"]["global"], b[name]["exchanger"]["global"]))
        moments = [s["outer"]["state"][i]["momentum_buffer"] for s in (a[name]["exchanger"], b[name]["exchanger"])
                   for i in (0,)]
        assert torch.equal(*moments) and moments[0].abs().sum() > 0


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--max-restarts", "2", "-m", "codistill.cli", "train", *BASE, "--set", "train.steps=60",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 200
    while not latest.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.is_file(), "no checkpoint appeared"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 4, workers
    os.kill(int(workers[1]), signal.SIGKILL)  # kill -9 one worker mid-run
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["world_size"] == 4
    steps = [json.loads(line)["step"] for line in (out / "model_0" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(2, 61, 2))  # one continuous history despite the restart


def test_non_finite_loss_stops_with_step_model_rank_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run("train", *BASE, "--set", "train.steps=20", "--nproc", "2", "--out", str(out),
               env={"CODISTILL_FAULT": "nan@0:7"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("codistill: error:")]
    assert line and "non-finite loss" in line[0] and "step 8" in line[0] and "model 0" in line[0] and "rank 0" in line[0]
    assert "Traceback" not in proc.stderr
    manifest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert manifest["step"] == 5
    state = final_states(out)["model_0.pt"]
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_non_finite_loss_can_be_skipped_and_counted(tmp_path):
    out = tmp_path / "skip"
    proc = run("train", *BASE, "--set", "train.steps=12", "--set", "train.nonfinite=skip", "--nproc", "4",
               "--out", str(out), env={"CODISTILL_FAULT": "nan@1:7"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "model_0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1 if "skipped_steps" in rows[-1] else \
        [r for r in rows if "skipped_steps" in r][-1]["skipped_steps"] == 1
    rows1 = [json.loads(line) for line in (out / "model_1" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows1 if "skipped_steps" in r][-1]["skipped_steps"] == 0
    assert all(r["train/loss"] == r["train/loss"] for r in rows if "train/loss" in r)  # no NaN logged


def test_hung_peer_gives_a_timeout_error_not_a_hang(tmp_path):
    start = time.monotonic()
    proc = run("train", *BASE, "--set", "train.steps=30", "--set", "dist.timeout_s=5", "--nproc", "2",
               "--out", str(tmp_path / "hang"), env={"CODISTILL_FAULT": "hang@1:3"}, timeout=200)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dist.timeout_s=5" in proc.stderr and "peer hung or died" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 170  # a 5 s timeout, not the 200 s kill (slack for busy CI machines)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run("train", *BASE, "--set", "train.steps=6", "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("codistill: error:") and fragment in lines[0], proc.stderr


def test_corrupt_checkpoint_is_refused(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    manifest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    path = run_dir / "checkpoints" / manifest["dir"] / "model_0.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(run("train", "--resume", str(run_dir)), "corrupt (SHA-256 mismatch)")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/codistill_pwned",))


def test_malicious_checkpoint_is_never_unpickled(finished_run, tmp_path):
    import hashlib
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    manifest_path = run_dir / "checkpoints" / "latest.json"
    manifest = json.loads(manifest_path.read_text())
    path = run_dir / "checkpoints" / manifest["dir"] / "model_0.pt"
    torch.save({"model": _Evil()}, path, pickle_module=pickle)
    manifest["sha256"]["model_0.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()  # a consistent forgery
    manifest_path.write_text(json.dumps(manifest))
    Path("/tmp/codistill_pwned").unlink(missing_ok=True)
    _one_line_error(run("train", "--resume", str(run_dir)), "cannot load checkpoint file")
    assert not Path("/tmp/codistill_pwned").exists()


def test_resume_without_checkpoint_or_with_extra_args(tmp_path, finished_run):
    _one_line_error(run("train", "--resume", str(tmp_path)), "no config.yaml")
    _one_line_error(run("train", "--resume", str(finished_run), "--set", "optim.lr=1"), "drop --set")
