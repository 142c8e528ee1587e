"""`Codistillation` used directly (as in your own loop), its sampler, the metrics window and the
pure run summary."""

from __future__ import annotations

import math

import pytest
import torch

from mp_helpers import digits_config, run_workers

from codistill.topology import model_seed

pytestmark = pytest.mark.timeout(300)

STEPS, T = 7, 3


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def _state(module) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in module.state_dict().values()])


def _own_loop_worker(rank, world, delay, exchange_dtype="fp32"):
    import codistill as cd

    codist = cd.Codistillation(_net, n_models=2, every=T, alpha=0.5, delay=delay, seed=3,
                               exchange_dtype=exchange_dtype)
    optimizer = torch.optim.SGD(codist.model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    own, teacher, steps = [], [], []
    with codist.attach(optimizer):
        for _ in range(STEPS):
            x, y = torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g)
            own.append(_state(codist.module))  # before this step's exchange: what a peer receives
            losses = codist.loss(codist.model(x), y, teacher_inputs=x)
            teacher.append(_state(codist.teachers.modules[1 - rank]))
            steps.append(codist.step)
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
        pending_versions = dict(codist.teachers.versions)
    final_teacher = _state(codist.teachers.modules[1 - rank])
    optimizer.step()  # the hook is gone after the block
    shared = list(codist.sampler(range(100)))
    disjoint = list(codist.sampler(range(100), split="disjoint"))
    return {"own": own, "teacher": teacher, "steps": steps, "after": codist.step, "counter": codist.counter.as_dict(),
            "pending_versions": pending_versions, "versions": dict(codist.teachers.versions),
            "final_teacher": final_teacher, "shared": torch.tensor(shared), "disjoint": torch.tensor(disjoint),
            "seed": codist.seed}


@pytest.fixture(scope="module")
def own_loop(tmp_path_factory):
    """The own-loop run for delay 0 and 2 (fp32 exchange), shared by the tests below."""
    return {delay: run_workers(_own_loop_worker, 2, tmp_path_factory.mktemp(f"own{delay}"), (delay,))
            for delay in (0, 2)}


@pytest.mark.parametrize("delay", [0, 2])
def test_attach_counts_steps_and_exchanges_on_schedule(own_loop, delay):
    r = own_loop[delay]
    for rank, peer in ((0, 1), (1, 0)):
        assert r[rank]["steps"] == list(range(STEPS)) and r[rank]["after"] == STEPS
        assert r[rank]["seed"] == model_seed(3, rank)
        for step in range(STEPS):
            started = step - step % T
            source = started if step - started >= delay or started == 0 else started - T
            assert torch.equal(r[rank]["teacher"][step], r[peer]["own"][source]), (delay, rank, step)
        assert r[rank]["counter"]["exchanges"] == len(range(0, STEPS, T))
        if delay:  # the transfer started at step 6 is swapped in by leaving the block, not before
            assert r[rank]["pending_versions"] == {peer: 3}
        assert r[rank]["versions"] == {peer: 6}
        assert torch.equal(r[rank]["final_teacher"], r[peer]["own"][6])
    # Sampler: the models shuffle all the data their own way (shared) or split it (disjoint).
    assert sorted(r[0]["shared"].tolist()) == list(range(100)) and not torch.equal(r[0]["shared"], r[1]["shared"])
    assert sorted(r[0]["disjoint"].tolist() + r[1]["disjoint"].tolist()) == list(range(100))
    assert len(r[0]["disjoint"]) == 50


@pytest.mark.parametrize("delay", [0, 2])
def test_bf16_exchange_sends_half_the_bytes_and_teachers_hold_the_rounded_weights(tmp_path, own_loop, delay):
    fp32 = own_loop[delay]
    bf16 = run_workers(_own_loop_worker, 2, tmp_path, (delay, "bf16"))
    for rank, peer in ((0, 1), (1, 0)):
        for step in range(STEPS):
            started = step - step % T
            source = started if step - started >= delay or started == 0 else started - T
            sent = bf16[peer]["own"][source]
            assert torch.equal(bf16[rank]["teacher"][step], sent.float().bfloat16().double()), (delay, rank, step)
            if step >= T:  # by then the rounding has changed the training, not only the teachers
                assert not torch.equal(bf16[rank]["own"][step], fp32[rank]["own"][step])
        # The fp32 part of the state crosses at 2 bytes a value; num_batches_tracked stays int64.
        n_float = sum(p.numel() for p in _net().state_dict().values() if p.is_floating_point())
        assert fp32[rank]["counter"]["exchange_sent"] - bf16[rank]["counter"]["exchange_sent"] == \
            2 * n_float * bf16[rank]["counter"]["exchanges"]
        assert bf16[rank]["counter"]["exchange_received"] == bf16[rank]["counter"]["exchange_sent"]


def test_shard_sampler_deals_disjoint_replica_shares_and_reshuffles_each_epoch():
    from codistill.data.sampling import ShardSampler

    shards = [ShardSampler(torch.arange(10, 31), 2, r, seed=5) for r in (0, 1)]
    first = [list(s) for s in shards]
    assert len(first[0]) == len(first[1]) == len(shards[0]) == 10  # 21 examples: the odd one is dropped
    assert not set(first[0]) & set(first[1]) and set(first[0]) | set(first[1]) <= set(range(10, 31))
    second = list(shards[0])
    assert second != first[0]  # the next epoch, reshuffled
    shards[0].set_epoch(0)
    assert list(shards[0]) == first[0]


def test_metrics_window_weights_by_targets_and_round_trips():
    from codistill.faults import NonFiniteLossError
    from codistill.metrics import MetricsWindow

    w = MetricsWindow(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    stats = MetricsWindow.batch_stats
    w.add(stats({"task": torch.tensor(1.0), "distill": torch.tensor(0.5), "total": torch.tensor(1.5)}, logits,
                torch.tensor([0, 0, -100])), torch.tensor(3.0))  # 2 real targets, 1 correct; grad norm 3
    w.add(stats({"task": torch.tensor(4.0), "distill": torch.tensor(0.0), "total": torch.tensor(4.0)}, logits[:1],
                torch.tensor([0])), torch.tensor(1.0))  # 1 target, correct; grad norm 1
    w.add(stats({"task": torch.tensor(0.0), "distill": torch.tensor(0.0), "total": torch.tensor(0.0)}, logits[:0],
                torch.tensor([], dtype=torch.long)))  # a step without an update: no grad norm, no targets
    assert w.means() == [2.0, 1 / 3, (3.0 + 4.0) / 3, 2 / 3]
    assert w.grad_norm() == (2.0, 3.0)  # mean and max over the two updates
    copy = MetricsWindow(torch.device("cpu"))
    copy.load_state_dict(w.state_dict())
    assert copy.means() == w.means() and copy.steps == 3 and copy.grad_norm() == w.grad_norm()
    w.reset()
    assert w.steps == 0 and w.means() == [0.0, 0.0, 0.0, 0.0] and w.grad_norm() == (None, None)
    with pytest.raises(NonFiniteLossError, match="before step 3"):
        w.check_finite([math.nan, 0.0, math.nan, 0.5], "step 3")


def test_summarize_is_pure():
    from codistill.trainer import summarize

    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=5)

    def rank(i, blocked):
        counter = {"allreduce_sent": 100.0 * (i + 1), "exchange_sent": 10.0, "exchange_received": 10.0,
                   "buffer_sync_sent": 0.0 if i % 2 else 4.0, "eval_sent": 6.0 * i, "allreduce_calls": 3, "exchanges": 2}
        return {"index": i // 2, "name": "cnn_tiny", "train_loss": 0.5 + i, "train_accuracy": 0.25,
                "param_distance": 1.5, "counter": counter, "blocked": blocked,
                "peak_memory_mib": 100.0 + 10 * i, "peak_memory_kind": "process_rss"}

    ranks = [rank(i, b) for i, b in enumerate((1.0, 2.0, 0.5, 0.0))]
    ev = {"models": [{"loss": 0.1, "accuracy": 0.9}, {"loss": 0.2, "accuracy": 0.8}],
          "ensemble": {"loss": 0.05, "accuracy": 0.95}, "disagreement": 0.125}
    s = summarize(cfg, ranks, [ranks[0], ranks[2]], ev, ev, steps=10, steps_per_epoch=4, model_batch=32,
                  replicas=2, teacher_steps={1: 10}, final_staleness=0, wall_seconds=4.0)
    assert s["world_size"] == 4 and s["job_models"] == 2 and s["epochs"] == 2.5 and s["exchange_every"] == 5
    assert [m["index"] for m in s["models"]] == [0, 1]
    assert s["models"][1]["val_accuracy"] == 0.8 and s["models"][1]["train_loss"] == 2.5
    assert s["bytes_per_worker"] == {"allreduce": 250.0, "exchange": 10.0, "exchange_received": 10.0,
                                     "buffer_sync": 2.0, "eval": 9.0}
    assert s["exchange_blocked_fraction"] == 0.5 and s["samples_per_s"] == 10 * 32 * 2 / 4.0
    assert s["ensemble_test_accuracy"] == 0.95 and s["teacher_steps"] == {1: 10}
    assert s["peak_memory_mib"] == 130.0 and s["peak_memory_kind"] == "process_rss"  # the worst worker


def test_trained_teachers_only_skips_the_initial_weights_handed_out_at_step_0():
    from codistill.exchange import Teachers

    teachers = Teachers({1: _net(), 2: _net()})
    x = torch.randn(4, 4)
    assert teachers.available() == {} and teachers.logits(x) == []
    teachers.mark_received(0)  # the exchange at step 0: initial weights
    assert len(teachers.logits(x)) == 2 and teachers.logits(x, trained_only=True) == []
    teachers.mark_received(25, models=[2])  # model 2's trained weights arrived, model 1's not yet
    assert list(teachers.available(trained_only=True)) == [2] and len(teachers.logits(x, trained_only=True)) == 1


def test_bf16_exchange_between_different_architectures(tmp_path):
    # Each model's state crosses at its own size (a CNN and an MLP): one wire buffer per model.
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "codistill.cli", "train", "--set", "data.name=digits",
                           "--set", "model.name=[cnn_tiny, mlp]", "--set", "codistill.exchange_dtype=bf16",
                           "--set", "codistill.exchange_every=2", "--set", "train.steps=6",
                           "--set", "train.progress=false", "--nproc", "2", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["exchanges"] == 3 and summary["bytes_per_worker"]["exchange"] > 0
