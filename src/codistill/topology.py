"""The rank grid: W = n_models x replicas.

    rank = model * replicas + replica

Rows are model groups (gradient all-reduce inside, DDP on the subgroup); columns are exchange groups
(the same replica index across models), over which teachers travel. n_models = 1 is plain all-reduce
data parallelism through the same code. Every rank creates every group, in the same order, because
`torch.distributed.new_group` is collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(frozen=True)
class Grid:
    """Pure rank arithmetic, no process groups: testable without torch.distributed."""

    world_size: int
    n_models: int

    def __post_init__(self):
        if self.n_models < 1 or self.world_size % self.n_models:
            raise ValueError(f"world size {self.world_size} is not divisible by n_models={self.n_models}")

    @property
    def replicas(self) -> int:
        return self.world_size // self.n_models

    def coords(self, rank: int) -> tuple[int, int]:
        """(model, replica) of a rank."""
        return divmod(rank, self.replicas)

    def rank(self, model: int, replica: int) -> int:
        return model * self.replicas + replica

    def model_ranks(self, model: int) -> list[int]:
        """The row: every worker of one model."""
        return [self.rank(model, r) for r in range(self.replicas)]

    def exchange_ranks(self, replica: int) -> list[int]:
        """The column: replica `replica` of every model."""
        return [self.rank(m, replica) for m in range(self.n_models)]


@dataclass
class Topology:
    """This rank's place in the grid and its two process groups."""

    grid: Grid
    rank: int
    model_group: object = field(repr=False)
    exchange_group: object = field(repr=False)

    @property
    def model_index(self) -> int:
        return self.grid.coords(self.rank)[0]

    @property
    def replica_index(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def n_models(self) -> int:
        return self.grid.n_models

    @property
    def replicas(self) -> int:
        return self.grid.replicas

    @property
    def is_model_leader(self) -> bool:
        """The first rank of its model group: the one that writes logs."""
        return self.replica_index == 0

    def peers(self) -> list[int]:
        """Indices of the other models."""
        return [m for m in range(self.n_models) if m != self.model_index]


def build_topology(n_models: int) -> Topology:
    """Create the row and column groups of the current default process group."""
    grid = Grid(dist.get_world_size(), n_models)
    rank = dist.get_rank()
    model_group = exchange_group = None
    for m in range(grid.n_models):
        group = dist.new_group(grid.model_ranks(m))
        if m == grid.coords(rank)[0]:
            model_group = group
    for r in range(grid.replicas):
        group = dist.new_group(grid.exchange_ranks(r))
        if r == grid.coords(rank)[1]:
            exchange_group = group
    return Topology(grid, rank, model_group, exchange_group)
