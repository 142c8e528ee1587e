"""The evaluation core every task uses: exact metrics of hand-made logits, on one process and on a
2 x 2 grid (the column shares probabilities, the row sums the counts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from codistill.evaluation import GridScore, evaluate
from codistill.losses import IGNORE_INDEX
from codistill.topology import Grid, Topology
from mp_helpers import run_workers

pytestmark = pytest.mark.timeout(120)

# LOGITS[model][replica]: 3 positions x 3 classes each; TARGETS[replica] (the column's shard).
LOGITS = torch.tensor([
    [[[3.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 5.0]], [[0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [6.0, 0.0, 0.0]]],
    [[[2.0, 0.0, 0.0], [0.0, 0.5, 1.0], [4.0, 0.0, 0.0]], [[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]],
])
TARGETS = torch.tensor([[0, 2, 2], [1, IGNORE_INDEX, 0]])


def reference() -> dict:
    """The metrics computed directly over every scored position."""
    keep = TARGETS != IGNORE_INDEX
    y = TARGETS[keep]
    logits = LOGITS[:, keep]  # (models, positions, classes)
    probs = F.softmax(logits, -1).mean(0)
    preds = logits.argmax(-1)
    return {"models": [{"loss": F.cross_entropy(lg, y).item(), "accuracy": (p == y).double().mean().item()}
                       for lg, p in zip(logits, preds)],
            "ensemble": {"loss": F.nll_loss(probs.log(), y).item(),
                         "accuracy": (probs.argmax(-1) == y).double().mean().item()},
            "disagreement": (preds[0] != preds[1]).double().mean().item(), "count": len(y)}


def test_the_reference_itself():
    """The hand-made case separates the metrics: what each one counts is visible here."""
    ref = reference()
    assert ref["count"] == 5
    assert [m["accuracy"] for m in ref["models"]] == pytest.approx([4 / 5, 2 / 5])
    # The ensemble is right where one of two disagreeing models is: better than either.
    assert ref["ensemble"]["accuracy"] == 1.0 and ref["disagreement"] == pytest.approx(4 / 5)


def _close(got: dict, want: dict) -> None:
    assert got["count"] == want["count"]
    assert got["disagreement"] == pytest.approx(want["disagreement"], abs=1e-12)
    for g, w in zip(got["models"] + [got["ensemble"]], want["models"] + [want["ensemble"]]):
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-12)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6)


def test_one_model_on_one_process_skips_ignored_positions():
    score = GridScore(Topology(Grid(1, 1), 0, None, None), "cpu")
    for replica in range(2):
        score.add(LOGITS[0, replica], TARGETS[replica])
    got = score.result()
    keep = TARGETS != IGNORE_INDEX
    assert got["models"][0]["loss"] == pytest.approx(F.cross_entropy(LOGITS[0, keep], TARGETS[keep]).item())
    assert got["models"][0]["accuracy"] == 4 / 5 and got["count"] == 5  # exact: counts over the total
    assert got["ensemble"]["loss"] == pytest.approx(got["models"][0]["loss"]) and got["disagreement"] == 0.0


def test_evaluate_restores_training_mode_and_uses_the_tasks_forward():
    model = torch.nn.Dropout(0.5).train()
    batches = [(LOGITS[0, r], TARGETS[r]) for r in range(2)]
    got = evaluate(model, batches, lambda m, b: (m(b[0]), b[1]), Topology(Grid(1, 1), 0, None, None), "cpu")
    assert model.training  # and dropout was off: the result is exact
    assert got["models"][0]["accuracy"] == 4 / 5


def _grid_worker(rank, world):
    from codistill.topology import build_topology

    topo = build_topology(n_models=2)
    m, r = topo.model_index, topo.replica_index
    score = GridScore(topo, "cpu")
    for part in (slice(0, 1), slice(1, 3)):  # two batches: the sums accumulate
        score.add(LOGITS[m, r, part], TARGETS[r, part])
    return score.result()


def test_two_models_by_two_replicas_equal_the_reference(tmp_path):
    results = run_workers(_grid_worker, 4, tmp_path)
    assert all(r == results[0] for r in results)  # identical on every rank
    _close(results[0], reference())
    assert math.isfinite(results[0]["ensemble"]["loss"])
