"""Checkpoints of sharded runs (`train.parallel=fsdp`) through torch.distributed.checkpoint (DCP).

Layout, next to checkpoint.py's (same manifest, same atomic publication, same verification):

    checkpoints/step_000100/model_0/.metadata, __0_0.distcp, ...   DCP of model 0's group: the model,
                                         the optimizer, the teachers, theta_0 (parameter distance) and
                                         DiLoCo's global copy + momentum, all as DTensors
    checkpoints/step_000100/rank_3.pt    that rank's RNG, counters, step, teachers' age, a transfer
                                         in flight (its shard)

Each model group saves its own DCP (the groups' models share names, so one world-wide save would
mix them). Every file, DCP's included, is listed with its SHA-256 in `latest.json`, written only
once all are complete; loading checks them before DCP reads anything.

Because DCP stores global tensors and their layout, a run resumes at another number k of workers
per model (trained 2 x 2, resumed 2 x 1): exact when the model batch is the same (data.batch_size x k
unchanged: the samplers then deal the same examples to each step, sampling.py), an error otherwise.
Worker r of the new run takes the per-rank file of old worker r mod k_old of its model (its RNG and
counters).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .sharding import as_dtensor, local


def _dcp_state(trainer) -> dict:
    """What DCP saves and loads in place: this worker's shards, as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    codist, params = trainer.codist, list(trainer.model.parameters())
    state = {"model": get_model_state_dict(trainer.model),
             "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer),
             # theta_0 lives on the CPU; on the model's device for the moment of the save
             "initial": {str(i): as_dtensor(t.to(local(p).device), p) for i, (t, p) in
                         enumerate(zip(trainer.initial, params))}}
    if len(codist.teachers):
        state["teachers"] = {str(j): m.state_dict() for j, m in codist.teachers.modules.items()}
    if hasattr(codist.exchanger, "sharded_state"):
        state["outer"] = codist.exchanger.sharded_state()
    return state


def save(trainer) -> None:
    """This step's checkpoint: the group's DCP, this rank's file, then the manifest (collective)."""
    import torch.distributed.checkpoint as dcp

    topo = trainer.topo
    directory = ckpt.step_dir(trainer.run_dir, trainer.step)
    name = f"model_{trainer.model_index}"
    dcp.save(_dcp_state(trainer), checkpoint_id=directory / name, process_group=topo.model_group)
    hashes = {}
    if topo.is_model_leader:  # DCP's files are complete once the group's coordinator returns
        hashes = {f"{name}/{f.name}": ckpt.sha256_file(f) for f in sorted((directory / name).iterdir())}
    rank_state = {**trainer.rank_state(), "codist": trainer.codist.state_dict(),
                  "model_batch": trainer.model_batch, "replicas": topo.replicas}
    hashes[f"rank_{topo.rank}.pt"] = ckpt.save_file(rank_state, directory / f"rank_{topo.rank}.pt")
    everyone = [None] * topo.grid.world_size
    dist.all_gather_object(everyone, hashes)
    if topo.rank == 0:
        ckpt.commit(trainer.run_dir, trainer.step, {k: v for h in everyone for k, v in h.items()},
                    topo.grid.world_size)
    dist.barrier()


def load(trainer) -> dict:
    """Load the newest checkpoint into the trainer's model, optimizer and component; returns this
    rank's file (RNG, counters) for the trainer to restore."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    run_dir, topo = Path(trainer.run_dir), trainer.topo
    manifest = ckpt.read_latest(run_dir)
    if manifest is None:
        raise CheckpointError(f"nothing to resume: {run_dir} has no checkpoint")
    old_world, n = manifest["world_size"], topo.grid.n_models
    if old_world % n:
        raise CheckpointError(f"checkpoint was written by {old_world} workers, not a multiple of {n} models")
    old_k = old_world // n
    mine = ckpt.load_entry(run_dir, manifest, f"rank_{topo.job_model * old_k + topo.replica_index % old_k}.pt")
    if old_k != topo.replicas:
        if mine.get("model_batch") != trainer.model_batch:
            raise CheckpointError(
                f"checkpoint trained {old_k} worker(s) per model on model batches of {mine.get('model_batch')}; "
                f"resuming at {topo.replicas} needs the same model batch: data.batch_size="
                f"{mine.get('model_batch', 0) // topo.replicas}")
        if mine["codist"]["exchanger"].get("staging") is not None:
            raise CheckpointError("checkpoint holds an exchange in flight (codistill.exchange_delay): "
                                  "resume it with the same number of workers per model")
    name = f"model_{trainer.model_index}"
    files = {k: v for k, v in manifest["sha256"].items() if k.startswith(f"{name}/")}
    if not files:
        raise CheckpointError(f"checkpoint {manifest['dir']} has no sharded {name} (was it written with "
                              "train.parallel=ddp?)")
    directory = run_dir / "checkpoints" / manifest["dir"]
    for file in files:
        ckpt.verify_entry(run_dir, manifest, file)
    state = _dcp_state(trainer)  # templates: DCP loads into them in place
    dcp.load(state, checkpoint_id=directory / name, process_group=topo.model_group)
    set_model_state_dict(trainer.model, state["model"])
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"])
    trainer.initial = [local(t).to("cpu", copy=True) for t in state["initial"].values()]
    with torch.no_grad():
        for j, m in trainer.codist.teachers.modules.items():
            m.load_state_dict(state["teachers"][str(j)])
    trainer.codist.load_state_dict(mine["codist"])  # after DCP: the step, teachers' age, a pending shard
    return mine
