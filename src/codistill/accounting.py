"""Bytes each worker communicates, counted where the traffic is issued.

Conventions (logical payload, independent of the backend's algorithm):
- gradient all-reduce of M bytes among k workers: each sends (and receives) 2 (k-1)/k M, the ring
  all-reduce's cost (reduce-scatter + all-gather);
- an exchange: each worker sends its model's state to each of the n-1 peers of its exchange group,
  (n-1) x its state bytes, and receives every peer's state once; with codistill.graph=ring or
  random, it sends to its students at that exchange and receives its k teachers' states only;
- before an exchange, replica 0 of each model broadcasts its buffers (BatchNorm statistics) to the
  other replicas, (replicas-1) x buffer bytes, counted on replica 0 as `buffer_sync_sent`;
- a hierarchical exchange sends states over replica 0's column only (the other replicas count the
  exchange with 0 bytes); replica 0 then broadcasts the received teachers over its model group,
  (replicas-1) x the teachers' bytes, also counted as `buffer_sync_sent` (in-group traffic);
- evaluation: what a worker sends to the other models of its exchange group while scoring the
  ensemble (evaluation.GridScore: (n-1) x its per-position rows), as `eval_sent`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.distributed as dist


@dataclass
class CommCounter:
    allreduce_sent: float = 0.0
    exchange_sent: float = 0.0
    exchange_received: float = 0.0
    buffer_sync_sent: float = 0.0
    eval_sent: float = 0.0
    allreduce_calls: int = 0
    exchanges: int = 0

    def add_allreduce(self, payload_bytes: int, group_size: int) -> None:
        self.allreduce_sent += 2.0 * (group_size - 1) / group_size * payload_bytes
        self.allreduce_calls += 1

    def add_exchange(self, sent: int, received: int) -> None:
        self.exchange_sent += sent
        self.exchange_received += received
        self.exchanges += 1

    def as_dict(self) -> dict:
        return asdict(self)

    def load(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def analytic_allreduce_bytes(n_grad_bytes: int, group_size: int, steps: int) -> float:
    return 2.0 * (group_size - 1) / group_size * n_grad_bytes * steps


def counting_allreduce_hook(counter: CommCounter):
    """A DDP communication hook: torch's own all-reduce hook, with its bucket bytes counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(process_group, bucket):  # no annotations: DDP inspects them and rejects strings
        buf = bucket.buffer()
        group = process_group if process_group is not None else dist.group.WORLD
        counter.add_allreduce(buf.numel() * buf.element_size(), dist.get_world_size(group))
        return allreduce_hook(process_group, bucket)

    return hook
