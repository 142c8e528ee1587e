"""Who distils from whom: the teacher graph over the n models (`codistill.graph`).

Not the rank grid (topology.py): that says which workers train which model; this says which
models each model takes as teachers at each exchange.

    all     every model distils from the n - 1 others (the paper's; the step runs n - 1 teachers)
    ring    model i distils from models i+1, ..., i+k (mod n), k = `peers`: fixed for the run
    random  at each exchange e, model i draws k distinct teachers among the others, from the seed
            derive_seed(seed, e, i): every worker computes every model's draw on its own, so the
            replicas of a model agree and each sender knows its receivers without communicating

With ring and random a step runs k teachers, whatever n: the teacher cost per step is bounded.
The collective exchange then sends each model's state only to its students (exchange.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .seeds import derive_seed

GRAPHS = ("all", "ring", "random")


def check_graph(kind: str, n_models: int, peers: int) -> None:
    """ValueError naming the bad setting (config.py turns it into one error line)."""
    if kind not in GRAPHS:
        raise ValueError(f"codistill.graph must be one of {', '.join(GRAPHS)}; got {kind!r}")
    if kind != "all" and n_models >= 2 and not 1 <= peers <= n_models - 1:
        raise ValueError(f"codistill.peers must be in 1..{n_models - 1} (n_models - 1) with "
                         f"codistill.graph={kind}, got {peers}")


@dataclass(frozen=True)
class TeacherGraph:
    kind: str = "all"
    n_models: int = 2
    peers: int = 1
    """k: teachers per model for ring and random (all: n - 1)."""
    seed: int = 0
    """The run's seed (random draws)."""

    def __post_init__(self):
        check_graph(self.kind, self.n_models, self.peers)

    @property
    def fixed(self) -> bool:
        """The same teachers at every exchange."""
        return self.kind != "random"

    def teachers_of(self, model: int, exchange: int = 0) -> list[int]:
        """Model indices `model` distils from after exchange number `exchange` (step e * T), sorted."""
        others = [j for j in range(self.n_models) if j != model]
        if self.kind == "all" or not others:
            return others
        if self.kind == "ring":
            return sorted((model + d) % self.n_models for d in range(1, self.peers + 1))
        return sorted(random.Random(derive_seed(self.seed, exchange, model)).sample(others, self.peers))

    def students_of(self, model: int, exchange: int = 0) -> list[int]:
        """Models that take `model` as a teacher at exchange `exchange`: whom its state is sent to."""
        return [i for i in range(self.n_models) if model in self.teachers_of(i, exchange)]

    def held_by(self, model: int) -> list[int]:
        """Teacher copies a worker of `model` holds: its fixed teachers, or every other model for
        random (any of them may be drawn, and models may differ in architecture)."""
        if self.fixed:
            return self.teachers_of(model)
        return [j for j in range(self.n_models) if j != model]
