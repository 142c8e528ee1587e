"""Validation metrics for every model and their ensemble, computed across the grid, for every task.

Each worker evaluates its own model on its replica's shard of the evaluation set (the same shard,
in the same batches, for every model of a column). Per batch the column gathers what the metrics
need, never the (N, C) probabilities (for a language model that would be more than the model every
few batches, over the link codistillation exists to spare): per scored position and model, the
log-probability of the target, the top-1 class and the top-k probabilities with their classes.
Summing over the row (one worker per column) covers the whole set. What each metric gets:

- each model's NLL and accuracy, and the disagreement (not every model picks the same top-1): exact;
- the ensemble's NLL (the mean of the models' probabilities): exact, as log of the mean of the
  models' p(target), by logsumexp;
- the ensemble's top-1 (its accuracy): exact when C <= 2 k (the whole distribution then costs no more
  than a top-k and is sent instead). Otherwise it is the class with the largest sum of the models'
  known top-k probabilities, exact wherever that sum beats every other class's upper bound (each
  model's k-th probability standing in for a class outside its top-k); the fraction of positions
  where this certifies it is `ensemble.argmax_exact` (1.0 when exact everywhere).

A task only supplies its batches and its `forward` (logits (N, C), targets (N,), IGNORE_INDEX where
nothing is scored, e.g. translation's padding). `eval_subset` is the `eval.max_samples` budget.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .losses import IGNORE_INDEX
from .sharding import is_dtensor, local
from .topology import Topology

SUBSET_SEED = 4321  # fixed: the budgeted subset is the same at every evaluation, for every model and run


def eval_subset(indices, budget: int):
    """At most `budget` of `indices` (0: all): a seeded random subset, in the original order."""
    if budget <= 0 or budget >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(SUBSET_SEED))[:budget].sort().values
    return indices[pick] if isinstance(indices, torch.Tensor) else [indices[i] for i in pick.tolist()]


def topk_ensemble_argmax(values: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's top-1 from each model's top-k: values, classes (n, N, k), probabilities in
    descending order. Returns (class (N,), certified (N,) bool): the class with the largest sum of
    the models' listed probabilities (the smallest such class on ties, as argmax), and whether that
    sum beats every other class's upper bound, which makes it the top-1 of the full mean."""
    vals, cls = values.permute(1, 0, 2), classes.permute(1, 0, 2)  # (N, n, k)
    n_pos, n, k = vals.shape
    cand = cls.reshape(n_pos, n * k)  # every class some model lists: (N, n k)
    hit = cand[:, :, None, None] == cls[:, None]  # (N, n k, n, k): candidate c is model j's i-th
    known = (hit * vals[:, None]).sum((2, 3))  # sum of p_j(c) over the models that list c
    kth = vals[:, :, -1]  # (N, n): p_j of any class model j does not list is at most this
    upper = known + (~hit.any(3) * kth[:, None]).sum(2)
    best = known.max(1).values
    pred = torch.where(known == best[:, None], cand, torch.iinfo(cand.dtype).max).min(1).values
    rival = torch.where(cand == pred[:, None], -math.inf, upper).max(1).values
    # A class no model lists is at most sum_j kth_j (equal only when it ties with some model's k-th
    # probability): >= there, so that models agreeing on their top-1 certify it with k = 1.
    return pred, (best > rival) & (best >= kth.sum(1))


class GridScore:
    """Running sums over this worker's shard: each model's NLL and correct count, the ensemble's,
    the positions where the models' predictions differ, where the ensemble's top-1 is certified,
    and the count of scored positions; `bytes_sent`: what this worker sent to the other models."""

    def __init__(self, topo: Topology, device, topk: int = 8):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topo, self.topk = topo, topk
        self.sums = torch.zeros(2 * topo.job_models + 5, dtype=torch.float64, device=device)
        self.bytes_sent = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One batch of this worker's model (collective over the column: every model calls it)."""
        keep = targets != IGNORE_INDEX
        y = targets[keep]
        logp = F.log_softmax(logits[keep].float(), dim=-1)  # (N, C)
        classes = logp.shape[-1]
        dense = classes <= 2 * self.topk  # the whole distribution is no larger than a top-k
        wire = torch.float32 if classes < 2**24 else torch.float64  # class ids travel exactly as floats
        columns = [logp.gather(1, y.unsqueeze(1)), logp.argmax(-1, keepdim=True).to(logp.dtype)]
        if dense:
            columns.append(logp.exp())
        else:
            top = logp.topk(self.topk, dim=-1)
            columns += [top.values.exp(), top.indices.to(logp.dtype)]
        own = torch.cat(columns, 1).to(wire)  # (N, 2 + C) or (N, 2 + 2 k)
        n = self.topo.job_models  # the models of this job: the exchange group
        if n > 1:
            gathered = [torch.empty_like(own) for _ in range(n)]
            dist.all_gather(gathered, own, group=self.topo.exchange_group)
            every = torch.stack(gathered)  # (n, N, width)
            self.bytes_sent += (n - 1) * own.numel() * own.element_size()
        else:
            every = own.unsqueeze(0)
        logp_y, preds = every[:, :, 0].float(), every[:, :, 1].long()  # (n, N)
        if dense:
            ensemble_pred = (every[:, :, 2:].float().sum(0) / n).argmax(-1)
            certified = torch.ones_like(y, dtype=torch.bool)
        else:
            k = self.topk
            ensemble_pred, certified = topk_ensemble_argmax(every[:, :, 2:2 + k].float(), every[:, :, 2 + k:].long())
        ensemble_logp_y = torch.logsumexp(logp_y, 0) - math.log(n)  # log of the mean of p(target)
        s = self.sums
        s[0:2 * n:2] -= logp_y.sum(1).to(s.dtype)
        s[1:2 * n:2] += (preds == y).sum(1).to(s.dtype)
        s[2 * n] -= ensemble_logp_y.clamp_min(math.log(1e-12)).sum().to(s.dtype)
        s[2 * n + 1] += (ensemble_pred == y).sum()
        s[2 * n + 2] += (preds != preds[:1]).any(0).sum()  # disagreement: not every model agrees
        s[2 * n + 3] += certified.sum()
        s[2 * n + 4] += len(y)

    def result(self) -> dict:
        """{"models": [{"loss", "accuracy"}], "ensemble": {"loss", "accuracy", "argmax_exact"},
        "disagreement", "count", "bytes_sent"} over the whole set; identical on all ranks
        (collective over the row), except `bytes_sent`, this worker's own."""
        if self.topo.replicas > 1:
            dist.all_reduce(self.sums, group=self.topo.model_group)
        v, n = self.sums.cpu().tolist(), self.topo.job_models
        total = max(v[-1], 1.0)
        return {"models": [{"loss": v[2 * m] / total, "accuracy": v[2 * m + 1] / total} for m in range(n)],
                "ensemble": {"loss": v[2 * n] / total, "accuracy": v[2 * n + 1] / total,
                             "argmax_exact": v[2 * n + 3] / total},
                "disagreement": v[2 * n + 2] / total, "count": int(v[-1]), "bytes_sent": self.bytes_sent}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, forward: Callable, topo: Topology, device,
             topk: int = 8) -> dict:
    """`GridScore.result()` of `model` in eval mode over this worker's `batches`, each scored by
    `forward(model, batch)` -> (logits (N, C), targets (N,)) (a task's own forward); `topk`: the
    classes each model sends per position for the ensemble's top-1 (`eval.topk`)."""
    score = GridScore(topo, device, topk)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            score.add(*forward(model, batch))
    finally:
        model.train(was_training)
    return score.result()


def initial_parameters(model: nn.Module) -> list[torch.Tensor]:
    """theta_0 for `parameter_distance`: an fp32 copy of this worker's parameters (its shards when
    sharded) kept on the CPU, so the metric costs no device memory between log steps."""
    return [local(p).detach().float().to("cpu", copy=True) for p in model.parameters()]


def parameter_distance(model: nn.Module, initial: list[torch.Tensor]) -> float:
    """||theta_t - theta_0||_2 over all parameters (the paper's Fig. 1c); for a sharded model the
    shards' squared distances are summed over the workers the model is sharded over."""
    with torch.no_grad():
        params = list(model.parameters())
        sq = torch.zeros((), device=local(params[0]).device if params else "cpu")
        for p, p0 in zip(params, initial):
            sq += ((local(p).detach().float() - p0.to(sq.device)) ** 2).sum()
        mesh = next((p.device_mesh for p in params if is_dtensor(p)), None)
        if mesh is not None:  # over the shard dimension (the last; HSDP's replicas hold equal shards)
            dist.all_reduce(sq, group=mesh.get_group(mesh.ndim - 1))
    return float(sq) ** 0.5
