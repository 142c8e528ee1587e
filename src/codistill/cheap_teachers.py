"""Cheaper teachers: the four settings that cut what the teachers' forward costs a step.

- distill_fraction f: the teachers run on the first ceil(f * B) examples of each batch (a batch is
  already a random draw, so its first rows are one too) and the distillation term is the mean over
  those examples' rows only (an unbiased estimate of the full-batch mean).
- teacher_every m: the teachers run on steps 0, m, 2m, ... only; on the other steps the
  distillation term is absent (the loss is the task loss), and alpha is NOT scaled by m. Why not
  scaled: alpha * m on one step in m multiplies that step's distillation gradient by m, a spike the
  learning rate was not tuned for; unscaled, the time-averaged weight is alpha / m (a user who wants
  the same average weight sets alpha * m).
- teacher_dtype: `fp32` (the teachers themselves), `bf16` (a bfloat16 copy of each teacher's
  weights, run on bfloat16 inputs), `int8` (torch.ao dynamic quantization of each teacher's
  nn.Linear layers, int8 weights and activations quantized per batch; other layers stay fp32; CPU
  only, as torch offers it). The copy is remade when its teacher receives new weights (every T
  steps); the fp32 teacher stays, since the exchange receives into it and checkpoints save it.
- teacher_topk k (losses.py, `topk_teacher`): KL on each teacher's top-k tokens plus one bucket.

No torch.distributed here: `Codistillation` applies these around `Teachers`.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn

TEACHER_DTYPES = ("fp32", "bf16", "int8")


def check_cheap_teachers(distill_fraction: float, teacher_every: int, teacher_dtype: str,
                         teacher_topk: int | None, device_type: str = "cpu") -> None:
    """ValueError naming the bad setting (the config layer turns it into its one-line error)."""
    if not (isinstance(distill_fraction, (int, float)) and 0 < distill_fraction <= 1):
        raise ValueError(f"codistill.distill_fraction must be in (0, 1], got {distill_fraction}")
    if not (isinstance(teacher_every, int) and teacher_every >= 1):
        raise ValueError(f"codistill.teacher_every must be an integer >= 1, got {teacher_every}")
    if teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"codistill.teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    if teacher_topk is not None and not (isinstance(teacher_topk, int) and teacher_topk >= 1):
        raise ValueError(f"codistill.teacher_topk must be an integer >= 1 (or null: the full KL), got {teacher_topk}")
    if teacher_dtype == "int8":
        int8_problem = int8_unavailable(device_type)
        if int8_problem:
            raise ValueError(f"codistill.teacher_dtype=int8: {int8_problem}")


def int8_unavailable(device_type: str) -> str | None:
    """Why torch cannot run int8 dynamic quantization here, or None."""
    if device_type != "cpu":
        return f"torch's dynamic int8 quantization runs on the CPU only, these teachers are on {device_type}"
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401  (deprecated in recent torch: it may go)
    except ImportError:
        return "this torch has no torch.ao.quantization.quantize_dynamic"
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        return "this torch build has no quantized engine (torch.backends.quantized.supported_engines)"
    return None


def should_run_teachers(step: int, teacher_every: int) -> bool:
    """Teachers run on steps 0, m, 2m, ... (step counts completed updates)."""
    return step % teacher_every == 0


def rows_to_distill(batch_rows: int, distill_fraction: float) -> int:
    """ceil(f * B), at least 1: how many leading examples of a batch of B the teachers see."""
    return max(1, min(batch_rows, math.ceil(distill_fraction * batch_rows - 1e-9)))


def leading_rows(batch, distill_fraction: float):
    """The batch cut to its first ceil(f * B) examples along dim 0 (a tensor, or a tuple / list /
    named tuple of them, as the tasks' batches are); the batch itself when f = 1."""
    if distill_fraction >= 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[:rows_to_distill(batch.shape[0], distill_fraction)]
    if isinstance(batch, (tuple, list)):
        first = next(b for b in batch if isinstance(b, torch.Tensor))
        k = rows_to_distill(first.shape[0], distill_fraction)
        items = [b[:k] if isinstance(b, torch.Tensor) else b for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    raise TypeError(f"distill_fraction < 1 needs a tensor or a tuple of tensors as the batch, got {type(batch)}")


def _cast_floats_to_bf16(module, args):
    return tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class LowPrecisionTeachers:
    """For each teacher, the copy that runs: bf16 weights or int8 Linear layers; remade from the
    fp32 teacher whenever that teacher's version (the step its weights come from) changes."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.copies: dict[int, tuple[int, nn.Module]] = {}  # j -> (version copied, runnable copy)

    def clear(self) -> None:
        self.copies.clear()

    def runnable(self, j: int, teacher: nn.Module, version: int) -> nn.Module:
        if self.dtype == "fp32":
            return teacher
        held = self.copies.get(j)
        if held is not None and held[0] == version:
            return held[1]
        if self.dtype == "bf16" and held is not None:  # same shapes: refresh the bf16 weights in place
            run = held[1]
            with torch.no_grad():
                for dst, src in zip(run.state_dict().values(), teacher.state_dict().values()):
                    dst.copy_(src)
        else:
            run = self._make(teacher)
        self.copies[j] = (version, run)
        return run

    def _make(self, teacher: nn.Module) -> nn.Module:
        run = copy.deepcopy(teacher)
        if self.dtype == "bf16":
            run = run.to(torch.bfloat16)
            run.register_forward_pre_hook(_cast_floats_to_bf16)  # image inputs; token ids stay integers
            return run
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # its deprecation notice, once per teacher per exchange: said in the docs
            warnings.simplefilter("ignore", UserWarning)
            run = quantize_dynamic(run, {nn.Linear}, dtype=torch.qint8)
        run.register_forward_pre_hook(_mha_fastpath_off)
        run.register_forward_hook(_mha_fastpath_back)
        return run


# torch's Transformer layers take a fused "fast path" in eval mode that reads each Linear's `.weight`
# tensor, which a dynamically quantized Linear does not have (it is a method there): the int8 copy
# runs with the fast path off, and puts back what it found.
_FASTPATH_WAS: list[bool] = []


def _mha_fastpath_off(module, args):
    _FASTPATH_WAS.append(torch.backends.mha.get_fastpath_enabled())
    torch.backends.mha.set_fastpath_enabled(False)


def _mha_fastpath_back(module, args, output):
    torch.backends.mha.set_fastpath_enabled(_FASTPATH_WAS.pop())
