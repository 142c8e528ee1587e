"""What turns the backward passes of a step's micro-batches into one update, apart from the model:
autocast, gradient sync only on the last micro-batch, loss scaling, the global gradient norm and
clipping.

Each helper works on any module the component trains: DDP (`no_sync`), an FSDP2 module
(`set_requires_gradient_sync`), a plain module (one replica: nothing to pause), and on DTensor
gradients (the norm is made whole before clipping, as torchtitan does).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def autocast(device: torch.device, precision: str):
    """Autocast to `precision` (`fp32`: a context that changes nothing)."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (bf16 and fp32 have fp32's range and need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@contextlib.contextmanager
def grad_sync_paused(model: nn.Module):
    """Backward passes inside accumulate gradients locally, without the all-reduce over the model
    group (all but the last micro-batch of a step): DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync(False)`; a module with no replicas has nothing to pause."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d tensor on their device; no host sync), before
    clipping them to `max_norm` when given. Call it after the gradients are synchronized over the
    model group: every replica then sees (and clips by) the same norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor (sharded gradients): the norm over every shard
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
