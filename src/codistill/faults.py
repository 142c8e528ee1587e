"""Faults: how training stops with a clear message, and fault injection for the tests.

`CODISTILL_FAULT="kind@rank:step"` makes one worker misbehave after `step` updates: `raise` (an
exception), `hang` (sleeps, so its peers must time out), `kill` (SIGKILL, like `kill -9`), `nan`
(its loss becomes NaN at that step), `slow` (sleeps SLOW_S after every step from then on: a
straggler) or `hold` (a straggler, SLOW_S per step, that waits after step 1 until the file named by
CODISTILL_FAULT_GO exists and at `step` until CODISTILL_FAULT_RELEASE exists, each where set: lets
a test keep one group training while another dies and until it has come back). Unset, it costs nothing. `codistill groups` hands a fault to one group's first attempt
only (CODISTILL_GROUP_FAULTS, groups.py).
"""

from __future__ import annotations

import os
import signal
import time

from .errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


class PeerError(UserError):
    """A peer stopped answering (timeout) or disconnected."""


def peer_error(e: RuntimeError, rank: int, step: int, timeout_s: float) -> PeerError | None:
    """A one-line error for collective failures caused by a hung or dead peer, else None."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return PeerError(f"rank {rank} waited more than dist.timeout_s={timeout_s:g} s for its peers at step "
                         f"{step}: a peer hung or died; the last checkpoint is kept")
    if "connection closed" in text or "connection reset" in text or "broken pipe" in text:
        return PeerError(f"rank {rank} lost its connection to a peer at step {step}: a peer died; "
                         "the last checkpoint is kept")
    return None


KINDS = ("raise", "hang", "kill", "nan", "slow", "hold")
SLOW_S = 0.1


def parse_fault(spec: str | None) -> tuple[str, int, int] | None:
    """CODISTILL_FAULT="kind@rank:step" (kind: raise, hang, kill, nan, slow, hold): fault injection for tests."""
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    rank, _, step = where.partition(":")
    if kind not in KINDS or not rank.isdigit() or not step.isdigit():
        raise UserError(f"CODISTILL_FAULT must be kind@rank:step with kind {'|'.join(KINDS)}, got {spec!r}")
    return kind, int(rank), int(step)


def inject_fault(fault: tuple[str, int, int] | None, rank: int, step: int) -> None:
    """Called after every step; `nan` faults are applied to the loss by the trainer instead."""
    if fault and fault[0] == "slow" and fault[1] == rank and step >= fault[2]:
        time.sleep(SLOW_S)
        return
    if fault and fault[0] == "hold" and fault[1] == rank:
        gate = {1: "CODISTILL_FAULT_GO", fault[2]: "CODISTILL_FAULT_RELEASE"}.get(step)
        path, deadline = os.environ.get(gate or "", ""), time.monotonic() + 600
        while path and not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.2)
        if step < fault[2]:
            time.sleep(SLOW_S)
        return
    if not fault or fault[1:] != (rank, step) or fault[0] == "nan":
        return
    if fault[0] == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")
    if fault[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10**6)  # hang: the peers must time out
