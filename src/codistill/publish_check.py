"""Never publish a diverged model: a finiteness check before every publication.

The trainer reads its losses on the host at log steps only (no host sync on other steps), so with
`train.nonfinite=stop` a model that diverged between two log steps would be sent to its peers at the
next exchange, and they would then stop with errors that name themselves. So every exchange checks
the state it is about to send: on exchange steps only, one flag per model of the exchange group
(n values, all-reduced over the column, so every worker of the column stops together, before any
state is sent, with one line that names the model that diverged). Other steps pay nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .faults import NonFiniteLossError
from .topology import Topology


def check_finite_before_publishing(tensors: list[torch.Tensor], topo: Topology, step: int,
                                   collective: bool = True, sharded: bool = False) -> None:
    """Raise NonFiniteLossError on every worker of the column when any model's `tensors` (the state
    it is about to send) hold a NaN or an infinity. `collective`: share the verdict over the
    exchange group (False when the peers are other jobs, as with exchange through storage).
    `sharded`: `tensors` are this worker's shards (train.parallel=fsdp), so the verdict is shared
    over the model group too: every worker of every column then stops together."""
    floats = [t for t in tensors if t.is_floating_point()]
    device = floats[0].device if floats else torch.device("cpu")
    flags = torch.zeros(topo.job_models, dtype=torch.float32, device=device)
    if floats:
        flags[topo.job_model] = torch.stack([~torch.isfinite(t).all() for t in floats]).any().float()
    if collective and topo.job_models > 1:
        dist.all_reduce(flags, group=topo.exchange_group)
    if sharded and topo.replicas > 1:
        dist.all_reduce(flags, group=topo.model_group)
    diverged = [topo.first_model + m for m, bad in enumerate(flags.tolist()) if bad]
    if diverged:
        which = ", ".join(map(str, diverged))
        raise NonFiniteLossError(
            f"model {which} diverged: its weights are not finite at step {step}, where the exchange would send "
            "them to its peers as a teacher; stopped before sending them, the last good checkpoint is kept "
            "(train.nonfinite=skip skips non-finite updates instead)")
