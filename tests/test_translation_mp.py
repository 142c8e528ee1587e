"""Translation through the real trainer on 4 gloo processes (2 models x 2 replicas).

The grid evaluation (shards per replica, probabilities summed over the column, stats over the
row, translations gathered for BLEU) must give what one process computes with the same weights.
"""

from __future__ import annotations

import pytest
import torch

from mp_helpers import run_workers
from test_translation import _config, write_parallel

pytestmark = pytest.mark.timeout(240)

STEPS = 4


def _worker(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    summary = tr.fit()
    val = tr.task.evaluate(tr.model, "val", tr.topo)
    return {"model": tr.topo.model_index, "summary": summary, "val": val,
            "state": {k: v.detach().clone() for k, v in tr.model.state_dict().items()}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = write_parallel(tmp_path_factory.mktemp("parallel"))
    cfg = _config(root, **{"codistill.n_models": 2, "codistill.exchange_every": 2, "train.steps": STEPS,
                           "optim.name": "adamw", "optim.lr": 0.003, "schedule.name": "constant",
                           "schedule.warmup_epochs": 0, "schedule.scale_lr": False, "train.eval_every": 0})
    return cfg, run_workers(_worker, 4, tmp_path_factory.mktemp("mp"), (cfg,))


def test_every_rank_reports_the_same_metrics(run):
    _, results = run
    first = results[0]
    for r in results[1:]:
        assert r["val"] == first["val"]
        assert r["summary"]["models"] == first["summary"]["models"]
    assert first["summary"]["steps"] == STEPS and first["summary"]["replicas"] == 2
    for m in first["summary"]["models"]:
        assert {"val_loss", "val_perplexity", "test_bleu", "test_accuracy"} <= set(m)
    val = first["val"]
    # Jensen: the ensemble's NLL is at most the mean of the models'.
    assert val["ensemble"]["loss"] <= sum(m["loss"] for m in val["models"]) / 2 + 1e-9


def test_grid_evaluation_matches_one_process(run):
    from codistill.tasks import make_task
    from codistill.topology import Grid, Topology

    cfg, results = run
    one = Topology(Grid(1, 1), 0, None, None)
    task = make_task(cfg, torch.device("cpu"))
    for m in range(2):
        worker = next(r for r in results if r["model"] == m)
        model = task.build_model("transformer_tiny")
        model.load_state_dict(worker["state"])
        alone = task.evaluate(model, "test", one)["models"][0]
        grid = worker["summary"]["models"][m]
        assert grid["test_loss"] == pytest.approx(alone["loss"], rel=1e-5)
        assert grid["test_accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)
        assert grid["test_bleu"] == pytest.approx(alone["bleu"], abs=1e-6)
