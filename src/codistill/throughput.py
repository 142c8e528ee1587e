"""What a log line says about speed: targets per second per worker, achieved TFLOP/s and MFU.

A target is what the loss scores: an image for classification, a token for language modeling and
translation (target tokens). Model FLOPs per target, for the models that define `flops_per_token`
(the GPT and Transformer families; formulas in their files and docs/performance.md), count the
student's forward and backward pass (6 FLOPs per parameter per token, plus attention); the teachers'
forward passes are extra work not counted. MFU = achieved model FLOP/s / the device's peak.
"""

from __future__ import annotations

import torch

# Dense peak TFLOP/s per GPU by name fragment and precision (fp32 means TF32 tensor cores where the
# GPU has them: configure_device turns TF32 on unless train.deterministic). Vendor data sheets, SXM.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device: torch.device, precision: str, configured: float | None = None) -> float | None:
    """`configured` (train.peak_tflops), else the table's entry for this GPU; None when unknown."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def flops_per_target(model: torch.nn.Module, seq_len: int | None) -> float | None:
    """Training FLOPs (forward + backward) per target of `model` at sequence length `seq_len`, or
    None for models without a count (or tasks without sequences)."""
    count = getattr(model, "flops_per_token", None)
    return float(count(seq_len)) if count is not None and seq_len else None


def speed(targets_per_s: float, flops: float | None, peak: float | None) -> dict[str, float | None]:
    """The log line's speed fields for one worker."""
    tflops = targets_per_s * flops / 1e12 if flops is not None else None
    return {"samples_per_s_per_worker": targets_per_s, "tflops_per_worker": tflops,
            "mfu": tflops / peak if tflops is not None and peak else None}
