"""Issue 25's exchange defects, each with a test that fails on commit e03b815: tied weights cross
once and stay tied in the teachers; DiLoCo / local SGD measure stall like the codistillation
exchange; a diverged model is never published as a teacher."""

from __future__ import annotations

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
