"""DiLoCo and local SGD on the codistillation grid: periodic outer steps over the exchange group.

Each model group trains as usual (DDP all-reduces its gradients every step, the config's optimizer
and schedule are the inner optimizer). Every H steps, at the start of step s = H, 2H, ..., the
groups of a column (the same replica index across models) do the outer step of DiLoCo
(Douillard et al. 2023, Algorithm 1):

    delta   = mean over groups of (theta_global - theta_local)      (the outer gradient)
    theta_global <- OuterSGD(theta_global, delta)                    (Nesterov, lr 0.7, momentum 0.9)
    theta_local  <- theta_global

Local SGD (periodic model averaging) is the same step with outer SGD lr 1 and no momentum, i.e.
theta_global <- mean of the groups' parameters. Floating-point buffers (BatchNorm statistics) are
averaged. At step 0 every group starts from model 0's initialization (DiLoCo needs one starting
point), and `finish` does a last outer step, so the groups end holding one model.

`OuterSync` has the `codistill.exchange.Exchange` protocol (maybe_exchange, wait, finish,
state_dict, load_state_dict, blocked_seconds, bytes in a CommCounter): `Codistillation` runs it as
its exchange `diloco` / `localsgd` (codistillation.EXCHANGES), with no teachers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .accounting import CommCounter
from .exchange import sync_buffers
from .publish_check import check_finite_before_publishing
from .sharding import as_dtensor, is_dtensor, local
from .stall_clock import StallClock
from .topology import Topology

# (lr, momentum, nesterov) of local SGD's outer step: theta_global <- mean of the local models.
AVERAGING = (1.0, 0.0, False)


class OuterSync:
    """Every `every` steps, one outer SGD step on the column's averaged parameter change."""

    def __init__(self, model: nn.Module, topo: Topology, every: int, lr: float, momentum: float,
                 nesterov: bool, counter: CommCounter | None = None, hierarchical: bool = False,
                 state_device: str = "device"):
        if every <= 0:
            raise ValueError(f"outer period must be > 0, got {every}")
        self.model, self.topo, self.every = model, topo, every
        self.counter = counter if counter is not None else CommCounter()
        # A sharded model's shards (sharding.local aliases FSDP's storage): each worker averages and
        # steps its own shard with worker r of the other groups, 1/k of the model.
        self.params = [local(p) for p in model.parameters()]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        # The outer optimizer owns a copy of the parameters: the global model of Algorithm 1. With
        # state_device="cpu" it and the momentum live in CPU memory (pinned under CUDA), as torchft
        # keeps them: the device holds them only as temporaries inside an outer step.
        device = self.params[0].device if self.params else torch.device("cpu")
        on_cpu = state_device == "cpu"
        self.global_params = [_copy_to(p.detach(), torch.device("cpu"), pin=device.type == "cuda") if on_cpu
                              else p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.global_params, lr=lr, momentum=momentum, nesterov=nesterov)
        # Sharded: the global copy and momentum are shards too, saved as DTensors (`sharded_state`)
        # so a run resumes at another k. The momentum exists from the start (zeros: SGD's first
        # step then sets it to the gradient, as when it creates it), so a checkpoint always has it.
        self.like = [p for p in model.parameters()] if is_dtensor(next(model.parameters())) else None
        if self.like is not None and momentum > 0:
            for g in self.global_params:
                self.outer.state[g]["momentum_buffer"] = torch.zeros_like(g)
        self.dirty = True  # local steps taken since the last outer step
        self.step = 0  # the step of the last maybe_exchange
        self.started = False  # every group holds model 0's initialization
        # Stall, timed as the codistillation exchange times it: between device synchronizations, so
        # that on NCCL the all-reduce is counted, not only its launch (stall_clock.py).
        self.clock = StallClock(self.params[0].device if self.params else "cpu")
        # Hierarchical: only replica 0's column communicates across groups, then broadcasts the
        # result over its model group (the replicas of a group hold identical models, so every
        # column would compute the same average).
        self.hierarchical = hierarchical and topo.replicas > 1
        self._nbytes = sum(p.numel() * p.element_size() for p in self.params + self.buffers)

    @property
    def blocked_seconds(self) -> float:
        return self.clock.seconds

    def maybe_exchange(self, step: int) -> bool:
        """Call at the start of every step; returns True when the local model changed."""
        self.step = step
        if step % self.every:
            self.dirty = True
            return False
        with self.clock.timing():
            if step > 0:
                self.outer_step(step)
            elif not self.started:
                self.start_together()
        self.dirty = True  # step s is about to be taken locally
        return True

    def wait(self) -> None:
        """Nothing runs in the background: outer steps complete inside `maybe_exchange`."""

    def finish(self) -> None:
        """The last outer step, so every group ends with the same model (idempotent)."""
        if self.dirty:
            with self.clock.timing():
                self.outer_step(self.step + 1)  # after the last step's update

    # -- the collectives ----------------------------------------------------------------------

    @torch.no_grad()
    def start_together(self) -> None:
        """Every group takes model 0's initialization (parameters and buffers)."""
        grid, replica = self.topo.grid, self.topo.replica_index
        tensors = self.params + self.buffers
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        if self._crosses():
            dist.broadcast(flat, src=grid.rank(0, replica), group=self.topo.exchange_group)
        self._spread(flat)
        _unflatten_into(flat, tensors)
        for g, p in zip(self.global_params, self.params):
            g.copy_(p)
        self.started = True
        if not self._crosses():
            self.counter.add_exchange(sent=0, received=0)
        elif self.topo.job_model == 0:
            self.counter.add_exchange(sent=(grid.n_models - 1) * self._nbytes, received=0)
        else:
            self.counter.add_exchange(sent=0, received=self._nbytes)

    @torch.no_grad()
    def outer_step(self, step: int) -> None:
        """Average the parameter change over the column, apply the outer optimizer, reset locals
        (at the start of step `step`)."""
        # Replica 0's buffers to every replica of its group first (DDP lets them drift between
        # forwards), so that every worker ends with identical buffers.
        sync_buffers(self.model, self.topo, self.counter)
        n = self.topo.grid.n_models
        deltas = [g.to(p.device, non_blocking=True) - p.detach() for g, p in zip(self.global_params, self.params)]
        flat = torch.cat([t.reshape(-1) for t in deltas + [b.detach() for b in self.buffers]])
        # A diverged group would poison every group's average: stop first, naming it.
        check_finite_before_publishing([flat], self.topo, step, sharded=self.like is not None)
        if self._crosses():
            dist.all_reduce(flat, group=self.topo.exchange_group)  # sum over the n groups
        self._spread(flat)
        flat /= n
        # Counted as a ring all-reduce among n (accounting.py); for n = 2 that is one model's
        # bytes, the same as one codistillation exchange.
        sent = 2.0 * (n - 1) / n * flat.numel() * flat.element_size() if self._crosses() else 0.0
        self.counter.add_exchange(sent=sent, received=sent)
        mean_deltas = [torch.empty_like(d) for d in deltas]
        _unflatten_into(flat, mean_deltas + self.buffers)
        for g, d in zip(self.global_params, mean_deltas):
            g.grad = d.to(g.device)
        self.outer.step()
        for g, p in zip(self.global_params, self.params):
            g.grad = None
            p.copy_(g)
        self.dirty = False

    def _crosses(self) -> bool:
        """Whether this worker communicates with the other groups (all do, unless hierarchical)."""
        return not self.hierarchical or self.topo.replica_index == 0

    def _spread(self, flat: torch.Tensor) -> None:
        """Hierarchical: replica 0's result to the other replicas of its group."""
        if self.hierarchical:
            dist.broadcast(flat, src=self.topo.grid.rank(self.topo.job_model, 0), group=self.topo.model_group)
            if self.topo.replica_index == 0:
                self.counter.buffer_sync_sent += (self.topo.replicas - 1) * flat.numel() * flat.element_size()

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.like is not None:  # the tensors are in `sharded_state`
            return {"dirty": self.dirty}
        return {"global": [g.detach().to("cpu", copy=True) for g in self.global_params], "outer": self.outer.state_dict(),
                "dirty": self.dirty}

    def sharded_state(self) -> dict:
        """The global copy and momentum as DTensors laid out like the parameters, aliasing ours (a
        torch.distributed.checkpoint loads into them in place)."""
        state = {}
        for i, (g, like) in enumerate(zip(self.global_params, self.like)):
            state[f"global.{i}"] = as_dtensor(g, like)
            if "momentum_buffer" in self.outer.state[g]:
                state[f"momentum.{i}"] = as_dtensor(self.outer.state[g]["momentum_buffer"], like)
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.like is not None:
            self.dirty = state["dirty"]
            return
        with torch.no_grad():
            for g, saved in zip(self.global_params, state["global"]):
                g.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.dirty = state["dirty"]


def _copy_to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    out = t.to(device, copy=True)
    return out.pin_memory() if pin else out


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
