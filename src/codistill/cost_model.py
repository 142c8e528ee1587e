"""What a step costs when model groups sit on different machines: compute + what crosses the slow link.

The picture (docs/performance.md, "where codistillation pays"): W workers on M machines joined by a
slow link (bandwidth B bit/s, latency L s per message); each machine's own links are fast and free
here. Per step, one worker spends

    allreduce      c + comm(ring all-reduce of G gradient bytes over W workers)
    codistill      c + (n - 1) t + (1 - overlap) comm(state transfer of S bytes) / T
    outer sync     c + (1 - overlap) comm(parameter all-reduce across groups) / H    (DiLoCo / local SGD)

with c the worker's own forward + backward + optimizer step, t one teacher forward, T the exchange
period and H the outer period. `overlap` is the fraction of the transfer hidden behind training
(0 for a synchronous exchange; the asynchronous exchange measures it in `bench stall`).

Bytes across the link, per direction of one machine's link (what limits the time):
- the ring all-reduce sends 2 (W - 1) / W G along every ring edge; with the ring ordered by machine,
  one edge per direction leaves each machine, so each machine's link carries 2 (W - 1) / W G per
  direction per step, and the ring takes 2 (W - 1) sequential hops, each paying the latency;
- an exchange brings each of the r workers of a model group the states of the n - 1 other models:
  r (n - 1) S into each machine per exchange (one model group per machine), one latency;
- an outer all-reduce across n groups, one per column of r workers: r 2 (n - 1) / n P per direction.

`wire_overhead` turns payload into bytes on the wire (Ethernet + IP + TCP headers: 1514 bytes on the
wire carry 1448 of payload at MTU 1500). Nothing here is fitted: every input is measured by the
step-overhead and bytes benchmarks, or is the link's nominal rate.

Time to a target = steps to the target (a property of the arm's optimization, not of the network:
training is bitwise identical at every link rate) x seconds per step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UserError

WIRE_OVERHEAD = 1514 / 1448  # Ethernet (14) + IP (20) + TCP with timestamps (32) headers, MTU 1500

_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)(?:/s)?$")


def parse_link_rate(text: str) -> float:
    """'1gbit', '100mbit', '2.5Gbit/s' -> bits per second; a UserError on anything else."""
    m = _RATE.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--link: expected a rate such as 1gbit, 100mbit or 2.5gbit (units: "
                        f"{', '.join(_UNITS)}), got {text!r}")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if not LINK_RANGE[0] <= rate <= LINK_RANGE[1]:
        raise UserError(f"--link {text.strip()} is {format_rate(rate)}, outside {format_rate(LINK_RANGE[0])} .. "
                        f"{format_rate(LINK_RANGE[1])}, where a projection from this run means something")
    return rate


LINK_RANGE = (1e5, 1e13)
"""Links the cost model projects to: slower ones give centuries, faster ones nothing but compute."""


def format_rate(bits_per_s: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


@dataclass(frozen=True)
class Link:
    bits_per_s: float
    latency_s: float = 0.0
    wire_overhead: float = WIRE_OVERHEAD

    def seconds(self, payload_bytes: float, messages: int = 1) -> float:
        """Time to move `payload_bytes` one way, in `messages` sequential messages."""
        if payload_bytes <= 0:
            return 0.0
        return payload_bytes * self.wire_overhead * 8 / self.bits_per_s + messages * self.latency_s


# -- bytes across the slow link, per direction of one machine's link ------------------------------

def ring_allreduce_link_bytes(grad_bytes: float, world: int) -> float:
    """Per step: the ring edge leaving a machine carries 2 (W - 1) / W G."""
    return 2.0 * (world - 1) / world * grad_bytes if world > 1 else 0.0


def exchange_link_bytes(state_bytes: float, n_models: int, replicas: int) -> float:
    """Per exchange: each of the r workers of a machine's model group receives n - 1 states."""
    return float(replicas * (n_models - 1) * state_bytes)


def outer_allreduce_link_bytes(param_bytes: float, groups: int, replicas: int) -> float:
    """Per outer step: r column all-reduces across the n groups, 2 (n - 1) / n P on each edge."""
    return replicas * 2.0 * (groups - 1) / groups * param_bytes if groups > 1 else 0.0


# -- seconds per step -----------------------------------------------------------------------------

def allreduce_step_s(compute_s: float, grad_bytes: float, world: int, link: Link, overlap: float = 0.0) -> float:
    """One all-reduce step with the workers spread over machines: every ring hop crosses in lock step."""
    comm = link.seconds(ring_allreduce_link_bytes(grad_bytes, world), messages=2 * (world - 1))
    return compute_s + (1.0 - overlap) * comm


def codistill_step_s(compute_s: float, teacher_s: float, n_models: int, replicas: int, state_bytes: float,
                     period: int, link: Link, overlap: float = 0.0) -> float:
    """One codistillation step: own step, n - 1 teacher forwards, 1/T of an exchange not hidden."""
    comm = link.seconds(exchange_link_bytes(state_bytes, n_models, replicas))
    return compute_s + (n_models - 1) * teacher_s + (1.0 - overlap) * comm / period


def outer_sync_step_s(compute_s: float, groups: int, replicas: int, param_bytes: float, period: int, link: Link,
                      overlap: float = 0.0) -> float:
    """DiLoCo / local SGD: inner steps inside each group, an all-reduce across groups every H steps."""
    comm = link.seconds(outer_allreduce_link_bytes(param_bytes, groups, replicas), messages=2 * (groups - 1))
    return compute_s + (1.0 - overlap) * comm / period


def async_overlap(transfer_s: float, delay_steps: int, step_s: float) -> float:
    """Fraction of a transfer hidden behind the D steps that train on while it runs (1 if it fits)."""
    if transfer_s <= 0:
        return 1.0
    return min(1.0, delay_steps * step_s / transfer_s)


def codistill_run_s_per_step(compute_s: float, teacher_s: float, n_models: int, replicas: int, state_bytes: float,
                             period: int, steps: int, link: Link, delay: int = 0) -> float:
    """Seconds per step averaged over a run of `steps`: ceil(steps / T) exchanges, the first (step 0)
    always synchronous (nothing to train on before it), the others hidden as far as D steps allow."""
    own = compute_s + (n_models - 1) * teacher_s
    transfer = link.seconds(exchange_link_bytes(state_bytes, n_models, replicas))
    hidden = async_overlap(transfer, delay, own) if delay else 0.0
    exchanges = math.ceil(steps / period)
    return own + (transfer + (exchanges - 1) * (1.0 - hidden) * transfer) / steps


def outer_sync_run_s_per_step(compute_s: float, groups: int, replicas: int, param_bytes: float, period: int,
                              steps: int, link: Link) -> float:
    """DiLoCo / local SGD averaged over a run of `steps` (outer_sync.py): one broadcast of model 0's
    start at step 0, a synchronous outer all-reduce at steps H, 2H, ... and a last one at the end."""
    start = link.seconds(exchange_link_bytes(param_bytes, groups, replicas))
    outer = link.seconds(outer_allreduce_link_bytes(param_bytes, groups, replicas), messages=2 * (groups - 1))
    outer_steps = (steps - 1) // period + 1  # at H, 2H, ... below `steps`, and the final one
    return compute_s + (start + outer_steps * outer) / steps


def time_to_target_s(steps_to_target: int | None, step_s: float) -> float | None:
    return None if steps_to_target is None else steps_to_target * step_s


# -- from a run's summary.json --------------------------------------------------------------------

def cross_group_bytes_per_step(summary: dict, groups: int) -> float:
    """Bytes (all directions) crossing between `groups` machines per step, from the run's counters.

    All-reduce (one model): `groups` ring edges cross machines, each carrying the per-worker ring
    bytes. Codistillation (one model group per machine): every worker receives n - 1 states per
    exchange from other machines, i.e. the W workers' exchange bytes cross. Gradients of a model
    group stay on its machine.
    """
    steps = max(summary["steps"], 1)
    b = summary["bytes_per_worker"]
    if summary["n_models"] == 1:
        return groups * b["allreduce"] / steps if groups > 1 else 0.0
    return summary["world_size"] * b["exchange"] / steps


# -- `codistill compare --link`: each arm's local measurements, projected onto a slow link ----------

def project_arm(name: str, summary: dict, evals: list[dict], target: float, link: Link, groups: int,
                delay: int = 0, compute_s: float | None = None, crossing: int | None = None,
                period: int | None = None) -> dict:
    """Projected s/step and time to `target` validation accuracy of one compare arm on `link`.

    Assumes one model group per machine (`groups` machines; the all-reduce arm spread over as many).
    The compute per step is `compute_s` (the arm's training clock per step without evaluations and
    without time blocked in its exchange: `curves.compute_seconds_per_step`) or else its whole local
    training clock per step (metrics.jsonl, evaluations excluded); either holds the teacher forwards
    and the local all-reduce. The link's cost is added to it: the gradient ring (all-reduce), 1/T of
    an exchange (codistillation) or the outer all-reduces of DiLoCo and local SGD (`summary["mode"]`).
    `crossing`: workers per model group whose exchange crosses the link (1 when hierarchical;
    default: all of them); `period`: T or H (default: the summary's exchange period). Storage
    exchanges are not projected (None).
    """
    steps = max(summary["steps"], 1)
    local_step = evals[-1]["time_without_eval"] / evals[-1]["step"] if evals and evals[-1]["step"] else None
    hit = next((e["step"] for e in evals if e["accuracy"] >= target), None)
    best = max(evals, key=lambda e: e["accuracy"], default=None)  # the first evaluation at the best
    out = {"name": name, "local_s_per_step": local_step, "compute_s_per_step": compute_s, "steps_to_target": hit,
           "best_accuracy": best and best["accuracy"], "best_step": best and best["step"],
           "cross_group_bytes_per_step": cross_group_bytes_per_step(summary, groups), "s_per_step": None,
           "time_to_target_s": None}
    c = compute_s if compute_s is not None else local_step
    if c is None:
        return out
    world, b = summary["world_size"], summary["bytes_per_worker"]
    n, r = summary["n_models"], summary["replicas"]
    crossing = r if crossing is None else crossing
    period = summary["exchange_every"] if period is None else period
    collective = n > 1 and summary.get("exchange", "collective") == "collective" and summary["exchanges"]
    if n == 1 and name.startswith("allreduce"):
        grad = b["allreduce"] / steps * world / (2.0 * (world - 1)) if world > 1 else 0.0
        out["s_per_step"] = allreduce_step_s(c, grad, world, link) if groups > 1 else c
    elif collective and summary.get("mode") in ("diloco", "localsgd"):
        # Mean bytes sent per worker (outer_sync.py): the crossing workers of group 0 broadcast
        # (n - 1) P at the start, then every crossing worker sends 2 (n - 1) / n P per outer step.
        outer_steps = summary["exchanges"] - 1
        param = b["exchange"] * n * r / (crossing * (n - 1) * (1 + 2 * outer_steps))
        out["s_per_step"] = outer_sync_run_s_per_step(c, n, crossing, param, period, steps, link)
    elif collective:
        state = b["exchange"] / summary["exchanges"] / (n - 1) * r / crossing
        transfer = link.seconds(exchange_link_bytes(state, n, crossing))
        overlap = async_overlap(transfer, delay, c) if delay else 0.0
        out["s_per_step"] = codistill_step_s(c, 0.0, n, crossing, state, period, link, overlap)
    if out["s_per_step"] is not None:
        out["time_to_target_s"] = time_to_target_s(hit, out["s_per_step"])
    return out
