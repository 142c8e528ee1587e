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
    metrics = [{k: v for k, v in r.items() if k != "bytes_sent"} for r in results]  # bytes: each worker's own
    assert all(m == metrics[0] for m in metrics)  # identical on every rank
    _close(results[0], reference())
    assert math.isfinite(results[0]["ensemble"]["loss"])


# -- what crosses between the models: the metrics' needs, not the (N, C) probabilities ---------

N_MODELS, POSITIONS, CLASSES = 2, 300, 40


def _random_case():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N_MODELS, POSITIONS, CLASSES, generator=g) * 2.5
    targets = torch.randint(0, CLASSES, (POSITIONS,), generator=g)
    targets[::7] = IGNORE_INDEX
    return logits, targets


def full_distribution_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """The metrics as e03b815 computed them, from the mean of the models' whole distributions."""
    keep = targets != IGNORE_INDEX
    y, logp = targets[keep], F.log_softmax(logits[:, keep], -1)
    probs = logp.exp().mean(0)
    preds = logp.argmax(-1)
    return {"models": [{"loss": F.nll_loss(lp, y).item(), "accuracy": (p == y).double().mean().item()}
                       for lp, p in zip(logp, preds)],
            "ensemble": {"loss": F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
                         "accuracy": (probs.argmax(-1) == y).double().mean().item()},
            "disagreement": (preds != preds[:1]).any(0).double().mean().item(), "count": len(y),
            "ensemble_pred": probs.argmax(-1)}


def _topk_worker(rank, world, topk):
    from codistill.topology import build_topology

    logits, targets = _random_case()
    score = GridScore(build_topology(n_models=N_MODELS), "cpu", topk)
    for part in (slice(0, 100), slice(100, POSITIONS)):
        score.add(logits[rank, part], targets[part])
    return score.result()


@pytest.mark.parametrize("topk", [4, CLASSES // 2])
def test_grid_score_sends_the_metrics_needs_and_matches_the_full_distribution(tmp_path, topk):
    got = run_workers(_topk_worker, N_MODELS, tmp_path, args=(topk,))[0]
    want = full_distribution_metrics(*_random_case())
    scored = want["count"]
    # Exact with any k: each model's NLL and accuracy, the disagreement, the ensemble's NLL.
    assert got["count"] == scored and got["disagreement"] == pytest.approx(want["disagreement"], abs=1e-12)
    for g, w in zip(got["models"], want["models"]):
        assert g["accuracy"] == pytest.approx(w["accuracy"], abs=1e-12) and g["loss"] == pytest.approx(w["loss"], rel=1e-6)
    assert got["ensemble"]["loss"] == pytest.approx(want["ensemble"]["loss"], rel=1e-6)
    dense = CLASSES <= 2 * topk  # the whole distribution, no larger than a top-k: sent as it is
    width = 2 + (CLASSES if dense else 2 * topk)
    assert got["bytes_sent"] == (N_MODELS - 1) * scored * width * 4  # e03b815 all-reduced N x 40 fp32 + more
    if dense:
        assert got["ensemble"]["argmax_exact"] == 1.0
        assert got["ensemble"]["accuracy"] == pytest.approx(want["ensemble"]["accuracy"], abs=1e-12)
    else:  # most positions certified here, and wherever not, the accuracy can be off by those only
        assert 0.5 < got["ensemble"]["argmax_exact"] < 1.0
        slack = 1.0 - got["ensemble"]["argmax_exact"]
        assert abs(got["ensemble"]["accuracy"] - want["ensemble"]["accuracy"]) <= slack + 1e-12


def test_topk_ensemble_top1_is_the_full_one_wherever_it_is_certified():
    from codistill.evaluation import topk_ensemble_argmax

    logits, _ = _random_case()
    probs = F.softmax(logits, -1)
    full = probs.mean(0).argmax(-1)
    for k in (1, 3, 8, CLASSES):
        top = probs.topk(k, dim=-1)
        pred, certified = topk_ensemble_argmax(top.values, top.indices)
        assert torch.equal(pred[certified], full[certified]), k
        assert certified.any()
    assert certified.all()  # every class listed: the full mean itself


def test_topk_ensemble_top1_says_when_it_cannot_know():
    from codistill.evaluation import topk_ensemble_argmax

    # Each model's top-1 is a class the other rates 0; the class both rate 0.45 is the ensemble's.
    probs = torch.tensor([[[0.50, 0.45, 0.05, 0.0]], [[0.0, 0.45, 0.50, 0.05]]])
    top = probs.topk(1, dim=-1)
    pred, certified = topk_ensemble_argmax(top.values, top.indices)
    assert probs.mean(0).argmax(-1).item() == 1 and pred.item() == 0 and not certified.item()
    top = probs.topk(2, dim=-1)  # class 1 listed by both: found, but class 0 might still reach 0.95
    pred, certified = topk_ensemble_argmax(top.values, top.indices)
    assert pred.item() == 1 and not certified.item()
    top = probs.topk(3, dim=-1)  # every rival now bounded below class 1's 0.9: certified
    pred, certified = topk_ensemble_argmax(top.values, top.indices)
    assert pred.item() == 1 and certified.item()


@pytest.mark.timeout(400)
def test_evaluation_bytes_are_reported_beside_training_bytes_and_the_budget_caps_validation(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from codistill.config import load_config
    from codistill.tasks import ClassificationTask

    sets = ["data.name=digits", "model.name=cnn_tiny", "train.progress=false", "data.batch_size=16",
            "train.steps=4", "train.eval_every=2", "train.log_every=2", "eval.max_samples=50"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "codistill.cli", "train", *[a for s in sets for a in ("--set", s)],
                           "--nproc", "2", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_test = len(ClassificationTask(load_config(None, sets), torch.device("cpu")).splits.test_indices)
    row = 4 * (2 + 10)  # per scored position: log p(target), top-1, and the 10 digits' probabilities (fp32)
    summary = json.loads((out / "summary.json").read_text())
    # Two validations of the 50-sample budget and one whole test split, each row sent to the 1 other model.
    assert summary["bytes_per_worker"]["eval"] == 2 * 50 * row + n_test * row
    assert summary["bytes_per_worker"]["exchange"] > 0
    evals = [json.loads(line) for line in (out / "model_0" / "metrics.jsonl").read_text().splitlines()
             if "val/accuracy" in line]
    assert [e["bytes/eval"] for e in evals] == [50 * row, 2 * 50 * row]
    assert all(e["val/ensemble_argmax_exact"] == 1.0 for e in evals)  # 10 classes: the whole distribution


def test_eval_subset_is_a_fixed_seeded_subset_in_order():
    from codistill.evaluation import eval_subset

    indices = torch.arange(100, 200)
    picked = eval_subset(indices, 30)
    assert len(picked) == 30 and torch.equal(picked, eval_subset(indices, 30))  # the same every evaluation
    assert bool((picked[1:] > picked[:-1]).all()) and set(picked.tolist()) <= set(indices.tolist())
    assert not torch.equal(picked, indices[:30])  # spread over the split, not its head (classes may be sorted)
    assert eval_subset(list(range(100, 200)), 30) == picked.tolist()  # lists (translation) alike
    assert eval_subset(indices, 0) is indices and eval_subset(indices, 500) is indices  # no budget, or a larger one
