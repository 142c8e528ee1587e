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


def _step(exchanger, step):
    """One exchange step with its background round completed and swapped in (deterministic tests)."""
    exchanger.maybe_exchange(step)
    exchanger.finish()


def _same(module, model):
    return all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), model.state_dict().values()))


def _train(model, by):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_teachers_load_the_newest_publication_and_skip_corrupt_ones(tmp_path, capsys):
    model0, teachers0, ex0 = _exchanger(0, tmp_path)
    model1, _, ex1 = _exchanger(1, tmp_path)
    assert teachers0.available() == {} and teachers0.staleness(0) == -1  # nothing published yet
    _step(ex1, 0)
    _step(ex0, 0)
    assert teachers0.versions[1] == 0 and _same(teachers0.modules[1], model1)

    # Model 1 moves on and publishes step 5; then its step-5 object gets corrupted (or truncated) in storage.
    _train(model1, 1.0)
    _step(ex1, 5)
    pointer = json.loads((tmp_path / "model_1" / "latest.json").read_text())
    path = tmp_path / "model_1" / pointer["object"]
    assert pointer["step"] == 5 and pointer["incarnation"] in path.name and pointer["run"] in path.name
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    _step(ex0, 5)
    err = capsys.readouterr().err
    assert "skipping exchange object" in err and "checksum mismatch" in err and pointer["object"] in err
    assert teachers0.versions[1] == 0 and not _same(teachers0.modules[1], model1)  # never loaded the corrupt one
    assert teachers0.staleness(5) == 5

    # A truncated object is caught the same way; an object with no pointer naming it is never read;
    # the next complete publication is taken.
    _train(model1, 1.0)
    _step(ex1, 10)
    pointer = json.loads((tmp_path / "model_1" / "latest.json").read_text())
    path = tmp_path / "model_1" / pointer["object"]
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "model_1" / "stray.step_00000099.pt").write_bytes(b"partial")
    _step(ex0, 10)
    assert "checksum mismatch" in capsys.readouterr().err and teachers0.versions[1] == 0
    _step(ex1, 15)
    _step(ex0, 15)
    assert teachers0.versions[1] == 15 and _same(teachers0.modules[1], model1)


def test_unchanged_teachers_are_not_downloaded_again(tmp_path):
    _, teachers0, ex0 = _exchanger(0, tmp_path)
    _, _, ex1 = _exchanger(1, tmp_path)
    _step(ex1, 0)
    for step in (0, 5, 10):  # model 1 stopped publishing: one download, not one per period
        _step(ex0, step)
    assert ex0.counter.exchange_received == teachers0.flats[1].nbytes
    assert teachers0.versions[1] == 0


def test_each_incarnation_removes_only_its_own_old_publications(tmp_path):
    _, _, first = _exchanger(0, tmp_path, every=1)
    for step in range(4):
        _step(first, step)
    _, _, second = _exchanger(0, tmp_path, every=1)  # restarted from an earlier checkpoint
    for step in range(2, 8):
        _step(second, step)
    names = sorted(p.name for p in (tmp_path / "model_0").glob("*.pt"))
    mine = [n for n in names if second.incarnation in n]
    theirs = [n for n in names if first.incarnation in n]
    assert [n[-11:-3] for n in mine] == ["00000005", "00000006", "00000007"]  # the newest KEEP = 3
    assert [n[-11:-3] for n in theirs] == ["00000001", "00000002", "00000003"]  # untouched by the new one
    assert json.loads((tmp_path / "model_0" / "latest.json").read_text())["object"] == mine[-1]


def test_a_group_restarted_from_an_earlier_checkpoint_is_picked_up_within_one_period(tmp_path):
    """Issue 25 defect 3 (fails on e03b815: the peer kept the dead incarnation's step-20 weights)."""
    _, teachers0, ex0 = _exchanger(0, tmp_path)
    model1, _, ex1 = _exchanger(1, tmp_path)
    for step in range(0, 25, 5):  # model 1 publishes steps 0 .. 20, then is killed
        if step == 5:
            checkpoint = ({k: v.clone() for k, v in model1.state_dict().items()}, ex1.state_dict())
        ex1.maybe_exchange(step)
        ex1.wait()
        ex0.maybe_exchange(step)
        ex0.finish()
        _train(model1, 0.1)
    assert teachers0.versions[1] == 20
    # A new process resumes model 1 from its step-5 checkpoint and trains on: other weights than the dead run's.
    model1b, _, ex1b = _exchanger(1, tmp_path)
    model1b.load_state_dict(checkpoint[0])
    ex1b.load_state_dict(checkpoint[1])
    _train(model1b, -0.3)
    ex1b.maybe_exchange(5)
    ex1b.wait()
    ex0.maybe_exchange(25)  # model 0's next exchange, one period later
    ex0.finish()
    assert _same(teachers0.modules[1], model1b)  # the restarted group's weights, not the dead incarnation's
    assert teachers0.versions[1] == 5
    for step in (10, 15):  # and its later publications too: none of them deleted by itself
        _train(model1b, 0.05)
        ex1b.maybe_exchange(step)
        ex1b.wait()
        ex0.maybe_exchange(25 + step)
        ex0.finish()
        assert _same(teachers0.modules[1], model1b) and teachers0.versions[1] == step


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
    first = tmp_path / "shared" / "model_1" / "latest.json"
    deadline = time.monotonic() + 200
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # 40 steps: the victim is dead by its step 12, long before the survivor's start-up is over.
    survivor = subprocess.Popen([sys.executable, "-m", "codistill.cli", "train", *common, "--set", "train.steps=40",
                                 "--set", "codistill.model_index=0", "--out", str(tmp_path / "m0")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim.communicate(timeout=250)
    assert victim.returncode != 0  # killed mid-run
    _, err = survivor.communicate(timeout=250)
    assert survivor.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "m0" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["exchange"] == "storage"
    last_teacher = summary["teacher_steps"]["1"]
    assert last_teacher in (0, 5, 10)  # the dead group's last publications
    # The teachers' age at the last step that used them (step 39), in the summary as in the log.
    assert summary["final_staleness"] == 39 - last_teacher
    rows = [json.loads(line) for line in (tmp_path / "m0" / "model_0" / "metrics.jsonl").read_text().splitlines()]
    staleness = [r["staleness"] for r in rows if "staleness" in r]
    assert staleness[-1] == 39 - last_teacher  # logged, growing once the peer is gone


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
    _step(ex1, 0)
    _step(ex0, 0)
    assert _same(teachers0.modules[1], model1)
    # A contiguous job reading a channels_last job's file would load permuted conv weights: refused.
    _, _, ex0 = _exchanger_with_layout(0, tmp_path / "mixed", channels_last=False)
    _, _, ex1 = _exchanger_with_layout(1, tmp_path / "mixed", channels_last=True)
    _step(ex1, 0)
    with pytest.raises(UserError, match="model.channels_last differs"):
        _step(ex0, 0)


def _exchanger_of(model_index: int, directory, n_models=2, every=5):
    torch.manual_seed(model_index)
    model = build_model("cnn_tiny", 10, (1, 8, 8))
    teachers = Teachers({j: build_model("cnn_tiny", 10, (1, 8, 8)) for j in range(n_models) if j != model_index})
    topo = Topology(Grid(1, 1), 0, None, None, first_model=model_index, total_models=n_models)
    return model, teachers, StorageExchanger(model, teachers, topo, every, directory)


def test_what_would_run_blind_is_said_at_start_and_in_the_metrics(tmp_path, capsys):
    """Issue 31 item 6: a mistyped (empty) location, a silent peer, two jobs on one model_index,
    a job with another n_models."""
    from codistill.errors import UserError

    _, _, first = _exchanger_of(0, tmp_path / "typo")
    assert "was empty" in capsys.readouterr().err  # the first job of a run, or a mistyped exchange_dir
    for step in (0, 5, 10):
        _step(first, step)
    assert "no publication from model 1" in capsys.readouterr().err
    assert first.metrics(10)["teacher_age_steps/1"] == -1 and first.metrics(10)["teacher_age_s/1"] == -1

    _, _, second = _exchanger_of(0, tmp_path / "typo")  # another job claiming model 0 while the first runs
    assert "already has publications" in capsys.readouterr().err
    _step(second, 15)
    _step(first, 15)
    assert first.metrics(15)["storage/conflicts"] == 1 and "two jobs claim codistill.model_index=0" in capsys.readouterr().err

    with pytest.raises(UserError, match="n_models=2; this job has codistill.n_models=3"):
        _exchanger_of(2, tmp_path / "typo", n_models=3)


def _skew_pointer(directory, seconds):
    """Model 0's pointer as written by a machine whose clock is `seconds` off ours."""
    path = directory / "model_0" / "latest.json"
    pointer = json.loads(path.read_text())
    path.write_text(json.dumps({**pointer, "time": pointer["time"] + seconds}))


def test_two_jobs_on_one_model_are_told_apart_by_what_they_wrote_not_by_clocks(tmp_path, capsys):
    """A restarted group whose dead incarnation's clock ran an hour ahead is no conflict; a second
    job publishing after we joined, with its clock an hour behind, is one before our first publication."""
    _, _, dead = _exchanger_of(0, tmp_path)
    _step(dead, 5)
    _skew_pointer(tmp_path, +3600)
    _, _, restarted = _exchanger_of(0, tmp_path)
    _step(restarted, 5)
    assert restarted.metrics(5)["storage/conflicts"] == 0

    _, _, first = _exchanger_of(0, tmp_path / "two")
    _, _, second = _exchanger_of(0, tmp_path / "two")  # both joined before either published
    _step(second, 5)
    _skew_pointer(tmp_path / "two", -3600)
    capsys.readouterr()
    _step(first, 5)
    assert first.metrics(5)["storage/conflicts"] == 1 and "two jobs claim codistill.model_index=0" in capsys.readouterr().err


def test_teacher_age_is_in_the_metrics_and_an_old_teacher_can_be_dropped(tmp_path):
    _, teachers0, ex0 = _exchanger(0, tmp_path)
    _, _, ex1 = _exchanger(1, tmp_path)
    _step(ex1, 0)
    _step(ex0, 0)
    metrics = ex0.metrics(12)
    assert metrics["teacher_age_steps/1"] == 12 and 0 <= metrics["teacher_age_s/1"] < 60
    assert list(teachers0.available(step=12)) == [1]  # max_age 0: never dropped
    teachers0.max_age = 10  # codistill.max_teacher_age=10
    assert list(teachers0.available(step=10)) == [1] and teachers0.available(step=11) == {}
    x = torch.randn(4, 1, 8, 8)
    assert teachers0.logits(x, step=11) == [] and len(teachers0.logits(x, step=10)) == 1


def _replicas_receive_only_changed_teachers(rank, world, directory):
    import torch.distributed as dist

    from codistill.topology import build_topology

    counts = {"teacher_broadcasts": 0}
    if rank == 0:  # model 1's job, publishing once (a one-worker job of its own)
        _, _, publisher = _exchanger(1, directory)
        _step(publisher, 0)
    dist.barrier()
    topo = build_topology(2, 0)  # this job: model 0 on 2 replicas
    torch.manual_seed(0)
    model = build_model("cnn_tiny", 10, (1, 8, 8))
    teachers = Teachers({1: build_model("cnn_tiny", 10, (1, 8, 8))})
    ex = StorageExchanger(model, teachers, topo, 5, directory)
    ptrs = {b.data_ptr() for b in teachers.flats[1].buffers.values()}
    broadcast = dist.broadcast

    def counting(tensor, *args, **kwargs):
        counts["teacher_broadcasts"] += tensor.data_ptr() in ptrs
        return broadcast(tensor, *args, **kwargs)

    dist.broadcast = counting
    try:
        for step in (0, 5, 10, 15):  # one new publication, then three periods without one
            _step(ex, step)
    finally:
        dist.broadcast = broadcast
    return {"count": torch.tensor(counts["teacher_broadcasts"]), "version": torch.tensor(teachers.versions[1]),
            "teacher": torch.cat([b.float() for b in teachers.flats[1].buffers.values()])}


def test_replicas_receive_only_the_teachers_that_changed(tmp_path):
    """Issue 25 item 9: storage mode re-broadcast unchanged teachers to the replicas every T steps."""
    from mp_helpers import run_workers

    results = run_workers(_replicas_receive_only_changed_teachers, 2, tmp_path, args=(str(tmp_path / "ex"),))
    n_buffers = len(Teachers({1: build_model("cnn_tiny", 10, (1, 8, 8))}).flats[1].buffers)
    for r in results:
        assert int(r["version"]) == 0
        assert int(r["count"]) == n_buffers  # once, when it arrived; not at steps 5, 10, 15
    assert torch.equal(results[0]["teacher"], results[1]["teacher"])
