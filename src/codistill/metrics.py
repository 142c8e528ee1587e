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
    """Sums of task, distill and total loss, correct predictions and targets since the last reset,
    and the steps' gradient norms (sum, max, count)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # task, distill, total, correct, n
        self.norms = torch.zeros(3, dtype=torch.float64, device=device)  # sum, max, steps with a norm
        self.steps = 0
        self.group_targets = 0.0  # targets of the model group in the window, set by `means`
        self.start = time.perf_counter()

    @staticmethod
    @torch.no_grad()
    def batch_stats(losses: dict[str, torch.Tensor], logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One (micro-)batch's contribution: (task, distill, total) x targets, correct, targets."""
        real = targets != IGNORE_INDEX
        n = real.sum().to(torch.float64)
        correct = ((logits.argmax(-1) == targets) & real).sum().to(torch.float64)
        stacked = torch.stack([losses["task"], losses["distill"], losses["total"]]).detach().to(torch.float64)
        return torch.cat([stacked * n, correct.view(1), n.view(1)])

    @torch.no_grad()
    def add(self, stats: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """One step: its batches' summed `batch_stats`, and its gradient norm (None: no update)."""
        self.sums += stats
        if grad_norm is not None:
            norm = grad_norm.detach().to(self.norms)
            self.norms += torch.stack([norm, torch.clamp_min(norm - self.norms[1], 0), torch.ones_like(norm)])
        self.steps += 1

    def means(self, group=None, replicas: int = 1) -> list[float]:
        """Mean task, distill, total loss and accuracy over the window (and the model group)."""
        window = self.sums.clone()
        if replicas > 1:
            dist.all_reduce(window, group=group)
        values = window.tolist()
        self.group_targets = values[4]
        return [v / max(values[4], 1) for v in values[:4]]

    def grad_norm(self) -> tuple[float | None, float | None]:
        """Mean and max gradient norm of the window's updates (equal on every replica of a model)."""
        total, peak, count = self.norms.tolist()
        return (total / count, peak) if count else (None, None)

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
        self.norms.zero_()
        self.steps = 0
        self.start = time.perf_counter()

    def state_dict(self) -> dict:
        return {"window": self.sums.cpu(), "window_norms": self.norms.cpu(), "window_steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["window"].to(self.sums.device)
        if "window_norms" in state:  # checkpoints before the gradient norm was logged have none
            self.norms = state["window_norms"].to(self.norms.device)
        self.steps = state["window_steps"]
