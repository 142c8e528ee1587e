"""Validation metrics for every model and their ensemble, computed across the grid, for every task.

Each worker evaluates its own model on its replica's shard of the evaluation set (the same shard,
in the same batches, for every model of a column). Per batch the column sums the models'
probabilities (the ensemble's) and gathers each model's log-likelihood of the targets and its
predictions, so every worker scores every model, the ensemble (mean of probabilities) and their
disagreement; summing over the row (one worker per column) covers the whole set. A task only
supplies its batches and its `forward` (logits (N, C), targets (N,), IGNORE_INDEX where nothing
is scored, e.g. translation's padding).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .losses import IGNORE_INDEX
from .topology import Topology


class GridScore:
    """Running sums over this worker's shard: each model's NLL and correct count, the ensemble's,
    the positions where the models' predictions differ, and the count of scored positions."""

    def __init__(self, topo: Topology, device):
        self.topo = topo
        self.sums = torch.zeros(2 * topo.job_models + 4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch of this worker's model (collective over the column: every model calls it)."""
        keep = targets != IGNORE_INDEX
        y = targets[keep]
        logp = F.log_softmax(logits[keep].float(), dim=-1)  # (N, C)
        own = torch.stack([logp.gather(1, y.unsqueeze(1)).squeeze(1), logp.argmax(-1).to(logp.dtype)])
        n, probs = self.topo.job_models, logp.exp()  # the models of this job: the exchange group
        if n > 1:
            dist.all_reduce(probs, group=self.topo.exchange_group)
            probs /= n
            gathered = [torch.empty_like(own) for _ in range(n)]
            dist.all_gather(gathered, own, group=self.topo.exchange_group)
            every = torch.stack(gathered)  # (n, 2, N): per model, log p(target) and prediction
        else:
            every = own.unsqueeze(0)
        preds = every[:, 1].long()  # (n, N)
        s = self.sums
        s[0:2 * n:2] -= every[:, 0].sum(1).to(s.dtype)
        s[1:2 * n:2] += (preds == y).sum(1).to(s.dtype)
        s[2 * n] -= probs.gather(1, y.unsqueeze(1)).clamp_min(1e-12).log().sum().to(s.dtype)
        s[2 * n + 1] += (probs.argmax(-1) == y).sum()
        s[2 * n + 2] += (preds != preds[:1]).any(0).sum()  # disagreement: not every model agrees
        s[2 * n + 3] += len(y)

    def result(self) -> dict:
        """{"models": [{"loss", "accuracy"}], "ensemble": {...}, "disagreement", "count"} over the
        whole set; identical on all ranks (collective over the row)."""
        if self.topo.replicas > 1:
            dist.all_reduce(self.sums, group=self.topo.model_group)
        v, n = self.sums.cpu().tolist(), self.topo.job_models
        total = max(v[-1], 1.0)
        return {"models": [{"loss": v[2 * m] / total, "accuracy": v[2 * m + 1] / total} for m in range(n)],
                "ensemble": {"loss": v[2 * n] / total, "accuracy": v[2 * n + 1] / total},
                "disagreement": v[2 * n + 2] / total, "count": int(v[-1])}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, forward: Callable, topo: Topology, device) -> dict:
    """`GridScore.result()` of `model` in eval mode over this worker's `batches`, each scored by
    `forward(model, batch)` -> (logits (N, C), targets (N,)) (a task's own forward)."""
    score = GridScore(topo, device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            score.add(*forward(model, batch))
    finally:
        model.train(was_training)
    return score.result()


def parameter_distance(model: nn.Module, initial: list[torch.Tensor]) -> float:
    """||theta_t - theta_0||_2 over all parameters (the paper's Fig. 1c)."""
    with torch.no_grad():
        sq = sum(((p.detach().float() - p0) ** 2).sum() for p, p0 in zip(model.parameters(), initial))
    return float(sq) ** 0.5
