"""Validation metrics for every model and their ensemble, computed across the grid.

Each worker evaluates its own model on its replica's shard of the evaluation set (the same shard
for every model of a column). The column then gathers every model's probabilities for that shard,
so each worker can score every model, the ensemble (mean of probabilities) and their disagreement;
summing the counts over the row (one worker per column) covers the whole set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .data import eval_batches, make_loader
from .topology import Topology


@torch.no_grad()
def predict(model: nn.Module, dataset, batches: list[list[int]], device,
            num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, C), targets (N,)) of `model` in eval mode on the given index batches,
    in order. Batches come through the training loader: in-memory data in one indexing op per
    batch, image files decoded by `num_workers` processes."""
    was_training = model.training
    model.eval()
    probs, targets = [], []
    for x, y in make_loader(dataset, batches, num_workers):
        probs.append(F.softmax(model(x.to(device)).float(), dim=-1))
        targets.append(y.to(device))
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)


def score(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[NLL sum, correct count] of one set of probabilities."""
    nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), targets, reduction="sum")
    correct = (probs.argmax(-1) == targets).sum()
    return torch.stack([nll, correct.to(nll.dtype)])


def evaluate(model: nn.Module, dataset, indices: torch.Tensor, topo: Topology, batch_size: int,
             device, num_workers: int = 0) -> dict:
    """Metrics of every model and the ensemble on `indices` of `dataset`; identical on all ranks."""
    batches = eval_batches(indices, batch_size, topo.replicas, topo.replica_index)
    probs, targets = predict(model, dataset, batches, device, num_workers)
    n = topo.job_models  # the models of this job: the exchange group's members
    if n > 1:
        gathered = [torch.empty_like(probs) for _ in range(n)]
        dist.all_gather(gathered, probs, group=topo.exchange_group)
        all_probs = torch.stack(gathered)  # (n, N_shard, C)
    else:
        all_probs = probs.unsqueeze(0)
    stats = [score(p, targets) for p in all_probs]
    stats.append(score(all_probs.mean(0), targets))
    top1 = all_probs.argmax(-1)  # (n, N_shard)
    disagree = (top1 != top1[:1]).any(0).sum().to(torch.float64)
    count = torch.tensor(float(len(targets)), dtype=torch.float64, device=probs.device)
    vec = torch.cat([torch.cat(stats).to(torch.float64), disagree.view(1).to(probs.device), count.view(1)])
    if topo.replicas > 1:
        dist.all_reduce(vec, group=topo.model_group)
    vec = vec.cpu()
    total = vec[-1].item()
    out = {"models": [{"loss": vec[2 * m].item() / total, "accuracy": vec[2 * m + 1].item() / total}
                      for m in range(n)],
           "ensemble": {"loss": vec[2 * n].item() / total, "accuracy": vec[2 * n + 1].item() / total},
           "disagreement": vec[-2].item() / total, "count": int(total)}
    return out


def parameter_distance(model: nn.Module, initial: list[torch.Tensor]) -> float:
    """||theta_t - theta_0||_2 over all parameters (the paper's Fig. 1c)."""
    with torch.no_grad():
        sq = sum(((p.detach().float() - p0) ** 2).sum() for p, p0 in zip(model.parameters(), initial))
    return float(sq) ** 0.5
