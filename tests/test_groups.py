"""`codistill groups`: independent jobs, one killed with kill -9 mid-run, through a directory and S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from s3_server import s3_server

pytestmark = pytest.mark.timeout(1000)  # four CPU jobs start torch; minutes on a loaded machine
STEPS = 120


def _groups(tmp_path, *sets, faults="", go=None, release=None, timeout=900):
    """Run `codistill groups`; create the hold fault's go file once `go()` returns True, then its
    release file once `release()` does (both polled while the groups train)."""
    cmd = [sys.executable, "-m", "codistill.cli", "groups", "--config", os.path.abspath("configs/digits_tiny.yaml"),
           "--set", f"train.steps={STEPS}", "--set", "codistill.exchange_every=5", "--set", "train.log_every=5",
           "--set", "train.eval_every=1000", "--set", "train.progress=false", *sets, "--nproc", "1",
           "--out", str(tmp_path / "groups"), "--restarts", "1"]
    gates = [(tmp_path / "go", go), (tmp_path / "release", release)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODISTILL_GROUP_FAULTS": faults,
           "CODISTILL_FAULT_GO": str(gates[0][0]), "CODISTILL_FAULT_RELEASE": str(gates[1][0])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    for gate, ready in gates:
        while ready is not None and proc.poll() is None and time.monotonic() < deadline:
            if ready():
                gate.touch()
                break
            time.sleep(0.2)
    out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _reached(metrics, step):
    def check():
        try:
            return any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines())
        except (OSError, ValueError):
            return False
    return check


def _restarted_published(read):
    """Model 1's pointer names step >= 15: only its restarted incarnation publishes past 10."""
    def check():
        try:
            return json.loads(read("model_1/latest.json"))["step"] >= 15
        except (OSError, ValueError, TypeError):
            return False
    return check


def _verify_publications(read, names):
    """Each model's pointer names an object that is there, whole (its SHA-256 matches)."""
    for j in (0, 1):
        pointer = json.loads(read(f"model_{j}/latest.json"))
        assert hashlib.sha256(read(f"model_{j}/{pointer['object']}")).hexdigest() == pointer["sha256"]
        assert pointer["object"] in names(f"model_{j}")


@pytest.mark.parametrize("where", ["directory", "s3"])
def test_a_killed_group_restarts_alone_while_the_other_keeps_training(tmp_path, monkeypatch, where):
    # Group 1's worker is killed (SIGKILL) after step 12. Group 0 is a straggler (0.1 s per step) that
    # waits after step 1 until group 1 has reached step 10 (so it is mid-run when group 1 dies, however
    # the two jobs' start-up times differ) and at step 100 until group 1's restarted incarnation has
    # published (so it still trains when group 1 is back, and must take its new publications).
    faults = "1=kill@0:12,0=hold@0:100"
    go = _reached(tmp_path / "groups" / "group_1" / "model_1" / "metrics.jsonl", 10)
    if where == "s3":
        with s3_server(monkeypatch):
            from s3fs import S3FileSystem

            fs, root = S3FileSystem(skip_instance_cache=True), "codistill-test/runs/groups"

            def read(name):
                fs.invalidate_cache()
                return fs.cat_file(f"{root}/{name}")

            result = _groups(tmp_path, "--set", "codistill.exchange_dir=s3://codistill-test/runs", faults=faults,
                             go=go, release=_restarted_published(read))
            _verify_publications(read, lambda d: [k.rsplit("/", 1)[1] for k in fs.ls(f"{root}/{d}", detail=False)])
    else:
        root = tmp_path / "groups" / "exchange"
        result = _groups(tmp_path, faults=faults, go=go,
                         release=_restarted_published(lambda n: (root / n).read_bytes()))
        _verify_publications(lambda n: (root / n).read_bytes(), lambda d: os.listdir(root / d))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "groups" / "groups.json").read_text())
    g0, g1 = summary["groups"]
    assert g0["status"] == g1["status"] == "finished" and g0["steps"] == g1["steps"] == STEPS
    assert g0["restarts"] == 0 and g1["restarts"] == 1
    assert [a["mode"] for a in g1["attempts"]] == ["fresh", "resume"] and g1["attempts"][0]["exit"] != 0
    assert g1["attempts"][1]["from_step"] == 10  # its last checkpoint (every T = 5 steps) before the kill
    (outage,) = g1["outages"]
    assert outage["others_steps_while_down"]["0"] > 0  # measured: group 0 trained on while group 1 was down
    # Group 0 ends with a teacher that only the restarted incarnation published (the killed one stopped at 10).
    final = json.loads((tmp_path / "groups" / "group_0" / "summary.json").read_text())
    assert final["teacher_steps"]["1"] > 12
    assert "group 1: finished after 2 attempt(s)" in result.stdout and "meanwhile group 0 +" in result.stdout


def test_a_named_exchange_location_an_earlier_launch_used_is_refused(tmp_path):
    """`codistill groups --out runs/g` again (or with --overwrite) would reuse <exchange_dir>/g: the new
    groups would join the earlier launch's run and take its publications as their peers'."""
    (tmp_path / "ex" / "g").mkdir(parents=True)
    (tmp_path / "ex" / "g" / "run.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "codistill.cli", "groups", "--config", "configs/digits_tiny.yaml",
                             "--set", f"codistill.exchange_dir={tmp_path / 'ex'}", "--nproc", "1",
                             "--out", str(tmp_path / "g")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"codistill: error: codistill.exchange_dir: {tmp_path / 'ex' / 'g'} already "
                                    "holds an earlier launch's publications")
    assert sorted(os.listdir(tmp_path)) == ["ex"]  # no groups directory created
