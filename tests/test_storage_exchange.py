"""Exchange through shared storage: independent jobs, dead peers, corrupt files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from codistill.exchange import Teachers
from codistill.models import build_model
from codistill.storage_exchange import StorageExchanger
from codistill.topology import Grid, Topology

pytestmark = pytest.mark.timeout(300)


def _exchanger(model_index: int, directory, every=5):
    torch.manual_seed(model_index)
    model = build_model("cnn_tiny", 10, (1, 8, 8))
    peer = 1 - model_index
    teachers = Teachers({peer: build_model("cnn_tiny", 10, (1, 8, 8))})
    # One worker of model `model_index` of 2: no collectives needed.
    topo = Topology(Grid(1, 1), 0, None, None, first_model=model_index, total_models=2)
    return model, teachers, StorageExchanger(model, teachers, topo, every, directory)


def test_teachers_load_the_newest_complete_file_and_skip_corrupt_ones(tmp_path, capsys):
    model0, teachers0, ex0 = _exchanger(0, tmp_path)
    model1, _, ex1 = _exchanger(1, tmp_path)
    assert teachers0.available() == {} and teachers0.staleness(0) == -1  # nothing published yet
    ex1.maybe_exchange(0)
    ex0.maybe_exchange(0)
    assert teachers0.versions[1] == 0
    for a, b in zip(teachers0.modules[1].state_dict().values(), model1.state_dict().values()):
        assert torch.equal(a, b)

    # Model 1 moves on and publishes step 5; then its step-5 file gets corrupted on disk.
    with torch.no_grad():
        for p in model1.parameters():
            p.add_(1.0)
    ex1.maybe_exchange(5)
    path = tmp_path / "model_1" / "step_00000005.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    ex0.maybe_exchange(5)
    err = capsys.readouterr().err
    assert "skipping exchange file" in err and "checksum mismatch" in err and str(path) in err
    assert teachers0.versions[1] == 0  # kept the last good teacher, never loaded the corrupt file
    assert teachers0.staleness(5) == 5

    # A partial file (no digest yet) is ignored silently; a complete newer one is taken.
    (tmp_path / "model_1" / "step_00000009.pt").write_bytes(b"partial")
    ex1.maybe_exchange(10)
    ex0.maybe_exchange(10)
    assert teachers0.versions[1] == 10
    for a, b in zip(teachers0.modules[1].state_dict().values(), model1.state_dict().values()):
        assert torch.equal(a, b)


def test_old_files_are_removed(tmp_path):
    _, _, ex = _exchanger(0, tmp_path, every=1)
    for step in range(6):
        ex.maybe_exchange(step)
    files = sorted(p.name for p in (tmp_path / "model_0").glob("step_*.pt"))
    assert files == ["step_00000003.pt", "step_00000004.pt", "step_00000005.pt"]


def test_a_dead_peer_group_only_makes_teachers_staler(tmp_path):
    common = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false",
              "--set", "data.batch_size=16", "--set", "codistill.exchange=storage",
              "--set", f"codistill.exchange_dir={tmp_path / 'shared'}", "--set", "codistill.exchange_every=5",
              "--set", "train.log_every=5", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Two separate jobs (separate process groups). The victim's first worker is killed at step 12.
    victim = subprocess.Popen([sys.executable, "-m", "codistill.cli", "train", *common, "--set", "train.steps=120",
                               "--set", "codistill.model_index=1", "--out", str(tmp_path / "m1")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "CODISTILL_FAULT": "kill@0:12"})
    first = tmp_path / "shared" / "model_1" / "step_00000000.sha256"
    deadline = time.monotonic() + 200
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    survivor = subprocess.Popen([sys.executable, "-m", "codistill.cli", "train", *common, "--set", "train.steps=120",
                                 "--set", "codistill.model_index=0", "--out", str(tmp_path / "m0")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim.communicate(timeout=250)
    assert victim.returncode != 0  # killed mid-run
    _, err = survivor.communicate(timeout=250)
    assert survivor.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "m0" / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["exchange"] == "storage"
    last_teacher = summary["teacher_steps"]["1"]
    assert last_teacher in (0, 5, 10)  # the dead group's last publications
    assert summary["final_staleness"] == 120 - last_teacher
    rows = [json.loads(line) for line in (tmp_path / "m0" / "model_0" / "metrics.jsonl").read_text().splitlines()]
    staleness = [r["staleness"] for r in rows if "staleness" in r]
    assert staleness[-1] == 119 - last_teacher  # logged, growing once the peer is gone


def _exchanger_with_layout(model_index: int, directory, channels_last: bool):
    torch.manual_seed(model_index)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("cnn_tiny", 10, (1, 8, 8)).to(memory_format=fmt)
    teachers = Teachers({1 - model_index: build_model("cnn_tiny", 10, (1, 8, 8)).to(memory_format=fmt)})
    topo = Topology(Grid(1, 1), 0, None, None, first_model=model_index, total_models=2)
    return model, teachers, StorageExchanger(model, teachers, topo, 5, directory)


def test_jobs_with_another_memory_layout_are_refused_not_scrambled(tmp_path):
    from codistill.errors import UserError

    # Same layout (channels_last on both sides): the teacher holds exactly the peer's weights.
    _, teachers0, ex0 = _exchanger_with_layout(0, tmp_path / "same", channels_last=True)
    model1, _, ex1 = _exchanger_with_layout(1, tmp_path / "same", channels_last=True)
    ex1.maybe_exchange(0)
    ex0.maybe_exchange(0)
    for a, b in zip(teachers0.modules[1].state_dict().values(), model1.state_dict().values()):
        assert torch.equal(a, b)
    # A contiguous job reading a channels_last job's file would load permuted conv weights: refused.
    _, _, ex0 = _exchanger_with_layout(0, tmp_path / "mixed", channels_last=False)
    _, _, ex1 = _exchanger_with_layout(1, tmp_path / "mixed", channels_last=True)
    ex1.maybe_exchange(0)
    with pytest.raises(UserError, match="model.channels_last differs"):
        ex0.maybe_exchange(0)
