"""The training metrics between two log lines: summed on the device, read once per log.

Per step it adds tensors only (no host sync); `means` all-reduces over the model group and divides.
Losses are weighted by the step's number of targets (tokens for translation), so a window's mean is
per target whatever the batches' sizes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .faults import NonFiniteLossError
from .losses import IGNORE_INDEX  # target of padding positions


class MetricsWindow:
    """Sums of task, distill and total loss, correct predictions and targets since the last reset."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # task, distill, total, correct, n
        self.steps = 0
        self.start = time.perf_counter()

    @torch.no_grad()
    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor, targets: torch.Tensor) -> None:
        real = targets != IGNORE_INDEX
        n = real.sum().to(torch.float64)
        correct = ((logits.argmax(-1) == targets) & real).sum().to(torch.float64)
        stacked = torch.stack([losses["task"], losses["distill"], losses["total"]]).detach().to(torch.float64)
        self.sums += torch.cat([stacked * n, correct.view(1), n.view(1)])
        self.steps += 1

    def means(self, group=None, replicas: int = 1) -> list[float]:
        """Mean task, distill, total loss and accuracy over the window (and the model group)."""
        window = self.sums.clone()
        if replicas > 1:
            dist.all_reduce(window, group=group)
        return (window[:4] / window[4].clamp_min(1)).tolist()

    def check_finite(self, means: list[float], where: str) -> None:
        """Raise NonFiniteLossError (before anything is logged or saved) on a non-finite loss."""
        task, distill, total, _ = means
        if not all(math.isfinite(v) for v in (task, distill, total)):
            raise NonFiniteLossError(
                f"non-finite loss (task {task}, distill {distill}) before {where}; the last good checkpoint "
                "is kept (train.nonfinite=skip skips such updates instead)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0
        self.start = time.perf_counter()

    def state_dict(self) -> dict:
        return {"window": self.sums.cpu(), "window_steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["window"].to(self.sums.device)
        self.steps = state["window_steps"]
