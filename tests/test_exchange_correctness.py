"""Issue 25's exchange defects, each with a test that fails on commit e03b815: tied weights cross
once and stay tied in the teachers; DiLoCo / local SGD measure stall like the codistillation
exchange; a diverged model is never published as a teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from mp_helpers import run_workers

pytestmark = pytest.mark.timeout(120)

VOCAB, WIDTH = 50, 8


class TiedLM(nn.Module):
    """An output layer sharing the embedding's weight module-to-module, as Hugging Face ties them:
    the one Parameter appears in the state dict as `embed.weight` and `out.weight`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.norm(self.embed(tokens)))


def _distinct_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in list(module.parameters()) + list(module.buffers()))


def test_flat_state_lays_out_a_tied_weight_once_and_binds_it_as_one_parameter():
    from codistill.flat import FlatState

    model, teacher = TiedLM(), TiedLM()
    assert len(model.state_dict()) == 4  # embed.weight, norm.weight, norm.bias, out.weight
    flat = FlatState(model)
    assert flat.nbytes == _distinct_bytes(model) == (2 * VOCAB * WIDTH - VOCAB * WIDTH + 2 * WIDTH) * 4
    FlatState(teacher).bind(teacher)
    assert teacher.out.weight is teacher.embed.weight
    # Writing the flat buffers moves both names: the tie is a tie, not two equal copies.
    flat2 = FlatState(teacher)
    flat2.bind(teacher)
    flat2.buffers[torch.float32].fill_(0.5)
    assert torch.equal(teacher.out.weight, torch.full((VOCAB, WIDTH), 0.5))


def _tied_exchange_worker(rank, world):
    import codistill as cd

    codist = cd.Codistillation(lambda: TiedLM(), n_models=2, every=3, alpha=1.0)
    codist.maybe_exchange()  # step 0: each model's initial weights to the other's teacher
    teacher = codist.teachers.modules[1 - rank]
    tied = teacher.out.weight is teacher.embed.weight
    sent_embed = codist.module.embed.weight.detach().clone()
    received_embed = teacher.embed.weight.detach().clone()
    return {"tied": tied, "sent": codist.counter.exchange_sent, "received": codist.counter.exchange_received,
            "own": sent_embed, "teacher": received_embed, "bytes": _distinct_bytes(codist.module)}


def test_tied_weights_cross_once_and_stay_tied_in_the_teacher(tmp_path):
    results = run_workers(_tied_exchange_worker, 2, tmp_path)
    for rank, r in enumerate(results):
        assert r["tied"], "the teacher's output layer no longer shares the embedding's weight"
        assert r["sent"] == r["received"] == r["bytes"]  # each storage once, n - 1 = 1 peer
        assert torch.equal(r["teacher"], results[1 - rank]["own"])  # the peer's weights arrived
    assert not torch.equal(results[0]["own"], results[1]["own"])  # two models, two initializations


# -- stall: DiLoCo / local SGD timed as the codistillation exchange is ------------------------

COLLECTIVE_S, QUEUED_COMPUTE_S, T = 0.15, 0.4, 4


class _Done:
    def wait(self):  # as NCCL's Work.wait(): the host does not wait for the transfer
        pass


class SlowDevice:
    """A fake accelerator queue on the CPU: a collective returns to the host at once, as NCCL's do,
    and its COLLECTIVE_S of transfer run when the device is synchronized, after the compute queued
    before it."""

    def __init__(self):
        self.queued, self.collectives, self.syncs = 0.0, 0, 0

    def synchronize(self, device=None):
        self.syncs += 1
        time.sleep(self.queued)
        self.queued = 0.0

    def collective(self, tensor, *args, async_op=False, **kwargs):
        self.collectives += 1
        self.queued += COLLECTIVE_S
        return _Done() if async_op else None


def _exchange(method: str):
    from codistill.exchange import Exchanger, Teachers
    from codistill.outer_sync import AVERAGING, OuterSync
    from codistill.topology import Grid, Topology

    topo = Topology(Grid(2, 2), rank=0, model_group=None, exchange_group=None)  # model 0 of 2, no peers needed
    torch.manual_seed(0)
    if method == "distill":
        return Exchanger(TiedLM(), Teachers({1: TiedLM()}), topo, every=T)
    sync = OuterSync(TiedLM(), topo, T, *(AVERAGING if method == "localsgd" else (0.7, 0.9, True)))
    sync.started = True
    return sync


@pytest.mark.parametrize("method", ["distill", "diloco", "localsgd"])
def test_stall_counts_the_transfer_and_not_the_compute_queued_before_it(monkeypatch, method):
    device = SlowDevice()
    monkeypatch.setattr("codistill.stall_clock.synchronize", device.synchronize)
    monkeypatch.setattr(torch.distributed, "broadcast", device.collective)
    monkeypatch.setattr(torch.distributed, "all_reduce", device.collective)
    exchange = _exchange(method)
    for step in range(1, T):  # steps without an exchange: no collective, no host sync
        assert exchange.maybe_exchange(step) is False
    assert device.syncs == 0 and device.collectives == 0
    device.queued = QUEUED_COMPUTE_S  # the last step's compute, still queued when the exchange begins
    assert exchange.maybe_exchange(T) is True
    transfer = device.collectives * COLLECTIVE_S
    assert device.collectives >= 1 and device.syncs == 2
    # The whole transfer is stall (on e03b815 DiLoCo and local SGD read ~0 s here: the launch only),
    # and none of the queued compute is (the clock starts after the first synchronization).
    assert transfer <= exchange.blocked_seconds < transfer + QUEUED_COMPUTE_S / 2


# -- a diverged model is never published ------------------------------------------------------

def _train(out, *sets, fault: str):
    args = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false",
            "--set", "data.batch_size=16", *[a for s in sets for a in ("--set", s)], "--nproc", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CODISTILL_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "codistill.cli", "train", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.timeout(400)
def test_a_model_that_diverges_between_log_steps_is_not_published(tmp_path):
    # Model 1's loss turns NaN at step 5 (its weights after step 6); logs come at step 10 only, the
    # exchange at step 8. On e03b815 model 1 was sent to model 0 at step 8 and the run stopped at
    # the log of step 10, where model 0's own loss was NaN too.
    proc = _train(tmp_path / "run", "train.steps=16", "train.log_every=10", "train.checkpoint_every=5",
                  "codistill.exchange_every=4", fault="nan@1:5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("codistill: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model 1 diverged" in lines[0] and "step 8" in lines[0], lines[0]
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 5


def _diverged_outer_step_worker(rank, world):
    from codistill.errors import UserError
    from codistill.outer_sync import OuterSync
    from codistill.topology import build_topology

    torch.manual_seed(rank)
    model = TiedLM()
    sync = OuterSync(model, build_topology(2), T, 0.7, 0.9, True)  # DiLoCo
    sync.start_together()
    with torch.no_grad():
        model.norm.weight.add_(1.0)  # a local step...
        if rank == 1:
            model.norm.bias[0] = float("inf")  # ...that diverged on model 1
    before = model.norm.weight.detach().clone()
    try:
        sync.maybe_exchange(T)
    except UserError as e:
        return {"error": str(e), "untouched": torch.equal(model.norm.weight, before)}
    return {"error": None}


def test_an_outer_step_is_not_taken_with_a_diverged_group(tmp_path):
    """DiLoCo / local SGD publish too: a diverged group would poison every group's average."""
    for r in run_workers(_diverged_outer_step_worker, 2, tmp_path):
        assert r["error"] is not None and "model 1 diverged" in r["error"] and f"step {T}" in r["error"]
        assert r["untouched"]  # stopped before the average was applied
