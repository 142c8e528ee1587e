"""HSDP inside a model group (train.shard_size): FSDP2 on a 2-D replicate x shard mesh trains as DDP
and plain FSDP do, each worker holding 1 / shard_size of the model."""

from __future__ import annotations

import pytest
import torch

from mp_helpers import run_workers
from test_fsdp import _digits_sets, _full_state

pytestmark = pytest.mark.timeout(600)


def _train(rank, world, cfgs):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    out = []
    for cfg in cfgs:
        tr = Trainer(cfg, ctx, None)
        summary = tr.fit()
        params = list(tr.codist.module.parameters())
        out.append({"summary": summary, "state": _full_state(tr.codist.module),
                    "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
                    "full": sum(p.numel() for p in params), "mesh": getattr(tr.codist.mesh, "ndim", 0)})
    return out


def test_hsdp_2x2_matches_fsdp_and_ddp_over_4_workers(tmp_path):
    """All-reduce, 1 model x 4 workers: DDP, FSDP over 4, and HSDP 2 x 2 (shard_size=2) end with the
    same losses and weights up to reduction order; HSDP holds half the model per worker (FSDP a
    quarter) and counts its gradient shards' all-reduce across the two replicas."""
    from codistill.config import load_config

    base = [*_digits_sets(), "train.eval_every=12", "codistill.n_models=1"]
    cfgs = [load_config(None, base), load_config(None, [*base, "train.parallel=fsdp"]),
            load_config(None, [*base, "train.parallel=fsdp", "train.shard_size=2"])]
    runs = run_workers(_train, 4, tmp_path, (cfgs,), timeout=500)
    ddp, fsdp, hsdp = runs[0]
    for other in (fsdp, hsdp):
        m, o = ddp["summary"]["models"][0], other["summary"]["models"][0]
        assert o["train_loss"] == pytest.approx(m["train_loss"], rel=1e-4, abs=1e-5)
        assert o["val_loss"] == pytest.approx(m["val_loss"], rel=1e-4, abs=1e-5)
    for r in runs:
        for k, v in r[0]["state"].items():
            torch.testing.assert_close(r[2]["state"][k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)
    assert (fsdp["mesh"], hsdp["mesh"]) == (1, 2)
    # Parameters split by dim-0 chunks: about half (HSDP) and a quarter (FSDP) of the model per worker.
    assert hsdp["local"] == pytest.approx(hsdp["full"] / 2, rel=0.05)
    assert fsdp["local"] == pytest.approx(fsdp["full"] / 4, rel=0.05)
    # In-group bytes: FSDP over 4 of a root-only model = DDP's all-reduce, 2 * 3/4 of it per step;
    # HSDP: gathers + reduce-scatter over 2 (2 * 1/2) plus the half's all-reduce over 2 (2 * 1/2 * 1/2): the same.
    d, f, h = (x["summary"]["bytes_per_worker"]["allreduce"] for x in (ddp, fsdp, hsdp))
    assert f == pytest.approx(d, rel=1e-9) and h == pytest.approx(d, rel=1e-9)
