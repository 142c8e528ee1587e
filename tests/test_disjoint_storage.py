"""data.split=disjoint with exchange through storage: each job trains on its model's 1/n of the data.

Regression: a storage job used to build a one-model topology, so every model trained on the whole
training set. Each job's first epoch must equal, batch for batch, what the same model sees in a
collective run (one job holding both models), and the two models' shares must be disjoint.
"""

from __future__ import annotations

import pytest
import torch

from mp_helpers import digits_config, run_workers
from test_translation import _config, write_parallel

pytestmark = pytest.mark.timeout(300)


def _first_epoch(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    tr = Trainer(cfg, DistContext(rank, world, rank, "gloo", torch.device("cpu")), None)
    batches, steps = tr.task.train_batches(tr.topo, tr.seed)
    epoch = [tuple(next(batches)) for _ in range(steps)]  # plain tuples: results travel with weights_only
    return {"model": tr.topo.model_index, "steps": steps, "epoch": epoch}


def _runs(cfg, tmp_path):
    """{model: first epoch} from one collective job, and from one storage job per model."""
    from codistill.config import replace

    collective = {r["model"]: r for r in run_workers(_first_epoch, 2, tmp_path, (cfg,))}
    storage = {}
    for m in (0, 1):
        job = replace(cfg, codistill__exchange="storage", codistill__exchange_dir=str(tmp_path / "shared"),
                      codistill__model_index=m)
        (r,) = run_workers(_first_epoch, 1, tmp_path, (job,))
        storage[m] = r
    return collective, storage


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(x, y))


def test_storage_jobs_train_on_disjoint_shares_like_the_collective_run(tmp_path):
    cfg = digits_config(codistill__n_models=2, data__split="disjoint", train__steps=4)
    collective, storage = _runs(cfg, tmp_path)
    n_train = 1295  # digits: 1797 examples less the test (20%) and validation (10%) splits
    for m in (0, 1):
        assert storage[m]["model"] == m
        assert storage[m]["steps"] == collective[m]["steps"] == (n_train // 2) // 16
        _assert_same_batches(storage[m]["epoch"], collective[m]["epoch"])
    seen = [{row.numpy().tobytes() for x, _ in storage[m]["epoch"] for row in x} for m in (0, 1)]
    # Digits holds a few duplicate images, so a handful of equal rows may appear in both shares.
    assert len(seen[0] & seen[1]) < 0.02 * len(seen[0])


def test_storage_jobs_translate_disjoint_shares_like_the_collective_run(tmp_path):
    root = write_parallel(tmp_path / "parallel")
    cfg = _config(root, **{"codistill.n_models": 2, "data.split": "disjoint", "train.steps": 4})
    collective, storage = _runs(cfg, tmp_path)
    for m in (0, 1):
        assert storage[m]["model"] == m and storage[m]["steps"] == collective[m]["steps"]
        _assert_same_batches(storage[m]["epoch"], collective[m]["epoch"])
    pairs = [{tuple(s.tolist()) for b in storage[m]["epoch"] for s in b[0]} for m in (0, 1)]
    assert not pairs[0] & pairs[1]


def test_a_storage_jobs_topology_names_its_model_among_all():
    from codistill.topology import Grid, Topology, job_grid

    grid, first, total = job_grid(world_size=2, n_models=3, job_model=1)  # job of model 1 of 3, 2 workers
    topo = Topology(grid, 1, None, None, first, total)
    assert (topo.model_index, topo.n_models, topo.job_model, topo.job_models) == (1, 3, 0, 1)
    assert (topo.replicas, topo.replica_index, topo.peers()) == (2, 1, [0, 2])
    whole = Topology(Grid(6, 3), 3, None, None)  # one job holding all 3 models
    assert (whole.model_index, whole.n_models, whole.job_model, whole.peers()) == (1, 3, 1, [0, 2])
