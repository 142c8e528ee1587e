"""The rank grid: W = n_models x replicas.

    rank = model * replicas + replica

Rows are model groups (gradient all-reduce inside, DDP on the subgroup); columns are exchange groups
(the same replica index across models), over which teachers travel. n_models = 1 is plain all-reduce
data parallelism through the same code. Every rank creates every group, in the same order, because
`torch.distributed.new_group` is collective.

The grid covers the models of one job. With exchange through storage each job trains one of the
n models, so its grid has one row while `Topology.model_index` and `Topology.n_models` stay global
(which model this is among all n): data splits and seeds depend on those, never on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from .seeds import derive_seed

if TYPE_CHECKING:  # annotations only: topology needs no more of the config than its fields
    from .config import Config


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
    """This rank's place in the grid, its two process groups, and its model among all n."""

    grid: Grid
    rank: int
    model_group: object = field(repr=False)
    exchange_group: object = field(repr=False)
    first_model: int = 0
    """Global index of the grid's first row (a storage job's own model)."""
    total_models: int | None = None
    """n, all models of the run; None: the grid's rows are all of them."""

    @property
    def job_model(self) -> int:
        """This rank's row in the grid (its model among the job's models)."""
        return self.grid.coords(self.rank)[0]

    @property
    def job_models(self) -> int:
        """Models trained by this job: the grid's rows."""
        return self.grid.n_models

    @property
    def model_index(self) -> int:
        """This rank's model among all n models of the run."""
        return self.first_model + self.job_model

    @property
    def replica_index(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def n_models(self) -> int:
        """n: all models of the run, in this job or not."""
        return self.total_models if self.total_models is not None else self.grid.n_models

    @property
    def replicas(self) -> int:
        return self.grid.replicas

    @property
    def is_model_leader(self) -> bool:
        """The first rank of its model group: the one that writes logs."""
        return self.replica_index == 0

    def peers(self) -> list[int]:
        """Global indices of the other models."""
        return [m for m in range(self.n_models) if m != self.model_index]


def model_seed(seed: int, model: int) -> int:
    """Model `model`'s seed (initialization, data order, dropout) in a run seeded `seed`: no two
    (seed, model) pairs share one (seeds.py; it was seed + model before)."""
    return derive_seed(seed, model)


def job_grid(world_size: int, n_models: int, job_model: int | None = None) -> tuple[Grid, int, int | None]:
    """(grid, first_model, total_models): all n models in the job, or only `job_model`."""
    if job_model is None:
        return Grid(world_size, n_models), 0, None
    if not 0 <= job_model < n_models:
        raise ValueError(f"job_model must be in 0..{n_models - 1}, got {job_model}")
    return Grid(world_size, 1), job_model, n_models


def job_topology(cfg: Config, world_size: int) -> Topology:
    """Rank 0's topology of a job of `world_size` workers, without process groups (for sizing)."""
    c = cfg.codistill
    grid, first, total = job_grid(world_size, c.n_models, c.model_index if c.exchange in ("storage", "frozen") else None)
    return Topology(grid, rank=0, model_group=None, exchange_group=None, first_model=first, total_models=total)


def build_topology(n_models: int, job_model: int | None = None) -> Topology:
    """Create the row and column groups of the current default process group.

    job_model None: this job trains all `n_models` models. Otherwise it trains model `job_model`
    only (exchange through storage): one row, every rank a replica of that model.
    """
    grid, first, total = job_grid(dist.get_world_size(), n_models, job_model)
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
    return Topology(grid, rank, model_group, exchange_group, first, total)
