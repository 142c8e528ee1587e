"""Issue 25's exchange defects, each with a test that fails on commit e03b815: tied weights cross
once and stay tied in the teachers; DiLoCo / local SGD measure stall like the codistillation
exchange; a diverged model is never published as a teacher."""

from __future__ import annotations

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
