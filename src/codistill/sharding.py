"""Sharded model groups (`train.parallel=fsdp`): FSDP2 applied to a model from outside.

Each model is sharded over its own model group (a `DeviceMesh` built from the grid's row group) with
`torch.distributed.fsdp.fully_shard`, as torchtitan does: one FSDP unit per block of every
`nn.ModuleList` (a Transformer's layers), then the root, so a forward holds one block's gathered
weights at a time. Worker r of a group keeps shard r of every parameter (dim-0 chunk r, FSDP's
layout), its gradients and optimizer state; teachers are sharded the same way, so shard r of teacher
j has exactly the shape of shard r of model j, and the exchange moves shards between the workers of
one column (worker r of every group): 1/k of a model per worker (exchange.py, flat.py).

Everything outside FSDP works on `local(t)`, the plain tensor behind a DTensor parameter (the
shard), which aliases FSDP's storage, so writing into it updates the model.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor (a sharded parameter). torch.distributed.tensor is imported only by
    sharded runs: importing it costs every process ~1.5 s, and no DTensor exists until it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's shard of a DTensor (aliasing it), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def as_dtensor(shard: torch.Tensor, like):
    """`shard` (this worker's part, laid out like `like`'s, a DTensor) as a DTensor aliasing it."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def padded_numel(t: torch.Tensor) -> int:
    """Elements of this worker's slot for `t`: a sharded parameter's shard padded, as FSDP keeps it,
    to the first (largest) dim-0 chunk, ceil(rows / k) rows; a plain tensor's own size."""
    if not is_dtensor(t):
        return t.numel()
    rows, k = t.shape[0], t.device_mesh.size()
    return -(-rows // k) * (t.numel() // rows if rows else 0)


def keep_shards_in(module: nn.Module, slot_of) -> None:
    """Make FSDP keep each sharded parameter of `module` in `slot_of(param)`, a 1-D tensor of
    `padded_numel(param)` elements (values copied in): FSDP all-gathers from there and the
    parameter's local tensor is a view of it, so writing the slot IS writing the shard. FSDP offers
    no public way to hand it storage; this sets the two fields its own `reset_sharded_param` sets
    after `load_state_dict(assign=True)` (torch 2.14), and that method, run again on the first
    forward, finds the storage already its own and keeps it."""
    from torch.distributed.fsdp import FSDPModule

    for unit in (m for m in module.modules() if isinstance(m, FSDPModule)):
        group = unit._get_fsdp_state()._fsdp_param_group
        for fp in group.fsdp_params if group is not None else []:
            slot = slot_of(fp.sharded_param)
            padded = slot.view(fp.padded_sharded_param_size)
            with torch.no_grad():
                padded.copy_(fp._sharded_param_data.view(padded.shape))
            rows = fp.sharded_param._local_tensor.size(0)
            fp._sharded_param_data = slot
            fp.sharded_param._local_tensor = padded.narrow(0, 0, rows)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def model_mesh(topo, device: torch.device, shard_size: int | None = None):
    """The DeviceMesh this worker's model is sharded over: one dimension over the model group (the
    grid's row), or with `shard_size` s < k two, (replicate, shard) = (k / s, s), for HSDP: the
    model is sharded within each run of s consecutive workers of the group (one machine, when a
    machine holds s workers) and replicated across the k / s runs, so the forward's gathers stay
    inside a run and only the gradients' shards are all-reduced across runs. Worker r holds shard
    r mod s either way, so the exchange (worker r of every group) still pairs equal shards.
    Collective: every rank of the world calls it."""
    from torch.distributed.device_mesh import DeviceMesh

    k = topo.replicas
    if shard_size is None or shard_size == k:
        return DeviceMesh.from_group(topo.model_group, device.type)
    if shard_size < 1 or k % shard_size:
        raise ValueError(f"shard_size {shard_size} must divide the {k} workers per model")
    grid = topo.grid
    ranks = torch.tensor([grid.model_ranks(m) for m in range(grid.n_models)]).view(grid.n_models, k // shard_size,
                                                                                 shard_size)
    world = DeviceMesh(device.type, ranks, mesh_dim_names=("model", "replicate", "shard"))
    return world["replicate", "shard"]


def shard_size_of(mesh) -> int:
    """Workers one shard is spread over: the mesh's last dimension (the whole mesh without HSDP)."""
    return mesh.size(mesh.ndim - 1)


def shard_model(module: nn.Module, mesh, offload: bool = False) -> nn.Module:
    """fully_shard every block of every ModuleList, then the root (in place; returns the module).
    offload: the shards live in CPU memory (pinned under CUDA), gathered onto the device for each
    forward (FSDP2's CPUOffloadPolicy; for teachers, which have no optimizer step)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    blocks = [b for m in module.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(module, mesh=mesh, offload_policy=policy)
    return module


def _fsdp_modules(module: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Inside, every worker of the group holds the whole model (all-gathered once, collectively)
    and forwards need no collective: evaluation may run different numbers of batches per worker,
    and one worker alone may sample from the model. A no-op for an unsharded module."""
    units = _fsdp_modules(module)
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def reshard(module: nn.Module) -> None:
    """Free a sharded module's gathered weights. FSDP keeps the root unit gathered after a forward,
    expecting the backward to need it; a teacher has no backward, and kept gathered it would cost a
    full root between forwards and go on computing from weights the exchange has since replaced."""
    for m in _fsdp_modules(module):
        m.reshard()


def sharded_traffic(module: nn.Module, group_size: int, replicas: int = 1) -> tuple[float, float]:
    """(bytes one worker sends per forward + backward, per gradient reduce-scatter) of a sharded
    module, in accounting.py's convention (each collective moves (k-1)/k of its payload). A forward
    all-gathers every unit; the backward gathers the blocks again (FSDP keeps the root gathered
    from forward to backward; a forward without backward, a teacher's, does not have it, see
    `forward_gather_bytes`); the gradients are reduce-scattered once per update. For a root-only
    model, forward + backward + reduce-scatter is DDP's all-reduce, 2 (k-1)/k of the model.
    HSDP (`replicas` > 1 copies of groups of `group_size`): the reduce-scattered gradient shard,
    1 / group_size of the model, is then all-reduced over the replicas, 2 (r-1)/r of it."""
    share = (group_size - 1) / group_size
    blocks = {id(p) for m in _fsdp_modules(module) if m is not module for p in m.parameters()}
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    inner = nbytes(p for p in module.parameters() if id(p) in blocks)
    total = nbytes(module.parameters())
    across = 2 * (replicas - 1) / replicas * total / group_size
    return share * (total + inner), share * total + across


def forward_gather_bytes(module: nn.Module, group_size: int) -> float:
    """Bytes one worker sends to gather a sharded module for one forward (a teacher's)."""
    return (group_size - 1) / group_size * sum(p.numel() * p.element_size() for p in module.parameters())
