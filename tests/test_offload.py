"""Teachers offloaded to a CPU store between forwards (codistill.teacher_offload) and DiLoCo's outer
state on the CPU (outer.state_device): the same training, exactly, with the state held elsewhere."""

from __future__ import annotations

import weakref

import pytest
import torch

from mp_helpers import run_workers
from test_fsdp import _digits_sets, _full_state

pytestmark = pytest.mark.timeout(600)


def _watch_teachers(codist) -> dict:
    """Hooks that see, during each teacher forward, whether its tensors are outside the store and
    keep a weak reference to the device copy they are in; and the dtype of every teacher's output."""
    seen = {"outside_store": [], "copies": [], "outputs": set()}
    store = codist.teacher_store
    for j, m in codist.teachers.modules.items():
        m.register_forward_hook(lambda mod, args, out: seen["outputs"].add(str(out.dtype)))
        if store is None or j not in store.teachers.flats or hasattr(m, "reshard"):
            continue

        def during(mod, args, j=j):
            ptrs = {b.untyped_storage().data_ptr() for b in store.teachers.flats[j].buffers.values()}
            seen["outside_store"].append(all(t.untyped_storage().data_ptr() not in ptrs
                                             for t in mod.state_dict().values()))
            seen["copies"].append(weakref.ref(store.on_device[j][torch.float32]))

        m.register_forward_pre_hook(during)  # after the store's own pre-hook: the copy is in place
    return seen


def _train(rank, world, cfgs):
    from torch.distributed.tensor import DTensor

    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    out = []
    for cfg in cfgs:
        tr = Trainer(cfg, ctx, None)
        seen = _watch_teachers(tr.codist)
        summary = tr.fit()
        row = {"losses": [(m["train_loss"], m["val_loss"]) for m in summary["models"]],
               "state": _full_state(tr.codist.module)}
        store = tr.codist.teacher_store
        if store is not None:  # between forwards: every teacher tensor in the CPU store
            row["forwards"] = len(seen["copies"])
            row["teacher_outputs"] = sorted(seen["outputs"])
            row["outside_during"] = all(seen["outside_store"])
            row["copies_freed"] = all(ref() is None for ref in seen["copies"]) and not store.on_device
            in_store = []
            for j, m in tr.codist.teachers.modules.items():
                if hasattr(m, "reshard"):  # sharded: resharded, its shards on the CPU (FSDP's offload)
                    in_store += [isinstance(p, DTensor) and p.to_local().device.type == "cpu"
                                 for p in m.parameters()]
                else:
                    ptrs = {b.untyped_storage().data_ptr() for b in store.teachers.flats[j].buffers.values()}
                    in_store += [t.untyped_storage().data_ptr() in ptrs for t in m.state_dict().values()]
            row["in_store_after"] = bool(in_store) and all(in_store)
        sync = tr.codist.exchanger
        if hasattr(sync, "global_params"):
            row["outer_devices"] = sorted({g.device.type for g in sync.global_params})
            row["outer_is_model"] = any(g.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                                        for g, p in zip(sync.global_params, sync.params))
        out.append(row)
    return out


PAIRS = {
    "ddp": ["codistill.n_models=2"],
    "ddp_async_bf16": ["codistill.n_models=2", "codistill.exchange_delay=2", "codistill.exchange_dtype=bf16"],
    "fsdp": ["codistill.n_models=2", "train.parallel=fsdp"],
}


def test_offloaded_teachers_train_exactly_as_resident_ones_and_live_in_the_store(tmp_path):
    """2 models x 2 workers: with teacher_offload the same losses and weights, bit for bit; during
    each teacher forward its tensors are a copy outside the store, freed after; between forwards
    they are the store's (sharded: FSDP's CPU-offloaded shards, resharded after the forward)."""
    from codistill.config import load_config

    cfgs = []
    for arm, sets in PAIRS.items():
        base = [*_digits_sets(), "train.eval_every=12", *sets]
        offloaded = [*base, "codistill.teacher_offload=true"]
        cfgs += [load_config(None, base), load_config(None, offloaded)]
    runs = run_workers(_train, 4, tmp_path, (cfgs,), timeout=500)
    for p, arm in enumerate(PAIRS):
        for r in runs:
            plain, off = r[2 * p], r[2 * p + 1]
            assert off["losses"] == plain["losses"], arm
            assert all(torch.equal(off["state"][k], v) for k, v in plain["state"].items()), arm
            assert off["in_store_after"], arm
            if not arm.startswith("fsdp"):
                assert off["forwards"] == 12 and off["outside_during"] and off["copies_freed"], arm


def test_diloco_outer_state_on_the_cpu_trains_exactly_as_on_the_device(tmp_path):
    """DiLoCo 2 x 2, DDP and FSDP: outer.state_device=cpu keeps the global copy and momentum in their
    own CPU tensors (never the model's), with the same losses and weights bit for bit."""
    from codistill.config import load_config

    cfgs = []
    for parallel in ("ddp", "fsdp"):
        base = [*_digits_sets(), "train.eval_every=12", "codistill.n_models=2", "codistill.method=diloco", f"train.parallel={parallel}"]
        cfgs += [load_config(None, base), load_config(None, [*base, "outer.state_device=cpu"])]
    runs = run_workers(_train, 4, tmp_path, (cfgs,), timeout=500)
    for r in runs:
        for a in (0, 2):
            device, cpu = r[a], r[a + 1]
            assert cpu["losses"] == device["losses"]
            assert all(torch.equal(cpu["state"][k], v) for k, v in device["state"].items())
            assert cpu["outer_devices"] == ["cpu"] and not cpu["outer_is_model"]
