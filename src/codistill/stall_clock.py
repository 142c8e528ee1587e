"""Exchange stall: the wall time a worker waits on communication, measured one way by every exchange.

On CUDA a collective returns to the host once it is queued (NCCL runs it on its own stream;
`Work.wait()` only makes the current stream wait), so a host clock around the call measures the
launch, not the transfer: DiLoCo's all-reduce would read near 0 s and its communication would be
billed to the next compute. So the codistillation exchange and the outer step of DiLoCo / local SGD
both time a step that waits for communication between two device synchronizations: the first so
that compute queued before it is not stall, the second so that the transfer is. Steps that wait for
nothing are timed on the host alone and pay no synchronization.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    """Wait until everything queued on `device` has run (the CPU runs everything at once)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StallClock:
    """Seconds spent inside an exchange, summed over the run (`seconds`)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds = 0.0

    @contextmanager
    def timing(self, waits: bool = True):
        """Time the block; `waits`: it waits for a transfer, so synchronize the device before the
        clock starts and before it stops (two host syncs)."""
        if waits:
            synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
            if waits:
                synchronize(self.device)
        finally:
            self.seconds += time.perf_counter() - start
