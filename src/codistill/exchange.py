"""Teachers and the exchange that refreshes them.

`Teachers` holds frozen copies of the other models: never wrapped in DDP, never trained, run without
autograd. `Exchanger` moves every model's parameters AND buffers (BatchNorm statistics) to the
workers of every other model, over the exchange group (the grid's column: the same replica index
across models), so all workers of a model receive identical teachers.

Every T steps, at the start of step s (s = 0, T, 2T, ...), each column broadcasts each model's state
from that model's worker. With `delay` = 0 the transfer completes before step s runs (teachers hold
the other models' state after exactly s updates). With `delay` = D > 0 the transfer runs in the
background while training continues with the old teachers, and is swapped in at the start of step
s + D: the teachers then are D steps stale, identically on every worker (the swap step is fixed, not
"whenever it arrived", so runs stay reproducible). Step 0 is always synchronous.

Every way of refreshing teachers (this collective one, `storage_exchange.StorageExchanger`, or an
outer synchronization plugged in through `codistillation.EXCHANGES`) has the `Exchange` protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from .accounting import CommCounter
from .flat import FlatState
from .publish_check import check_finite_before_publishing
from .sharding import is_sharded, reshard
from .stall_clock import StallClock
from .teacher_graph import TeacherGraph
from .topology import Topology


def freeze_as_teacher(module: nn.Module, mode: str = "eval") -> nn.Module:
    """No gradients; eval mode, or train mode (batch statistics) that never updates its buffers."""
    module.requires_grad_(False)
    if mode == "eval":
        return module.eval()
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # use batch statistics, leave the exchanged buffers alone
    return module


class Teachers:
    """Stale copies of the other models, keyed by model index."""

    def __init__(self, modules: dict[int, nn.Module], mode: str = "eval", max_age: int = 0):
        self.max_age = max_age  # > 0: teachers older than this many steps sit out (0: never)
        self.modules = {j: freeze_as_teacher(m, mode) for j, m in sorted(modules.items())}
        # The teacher's tensors live in the flat buffers (views; a sharded teacher's shards are
        # FSDP's storage placed in them), so receiving is all there is: one copy of each teacher.
        self.flats = {j: FlatState(m) for j, m in self.modules.items()}
        for j, m in self.modules.items():
            self.flats[j].bind(m)
        self.sharded = any(is_sharded(m) for m in self.modules.values())
        self.versions = {j: -1 for j in self.modules}  # source step of each teacher's weights
        # Only the methods below write `versions`: mark_received, load_state_dict.
        # The teachers the distillation term uses now (codistill.graph=random draws them at each
        # exchange from those held; the others keep old weights and sit out).
        self.active = set(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def available(self, trained_only: bool = False, step: int | None = None) -> dict[int, nn.Module]:
        """Teachers that have received weights (exchange through storage may not have any yet);
        `trained_only`: only those holding weights trained for at least one step (not the initial
        weights that the exchange at step 0 hands out); with `step` and max_age > 0, only those at
        most max_age steps old."""
        first = 1 if trained_only else 0
        oldest = step - self.max_age if step is not None and self.max_age > 0 else None
        return {j: m for j, m in self.modules.items() if j in self.active
                and self.versions[j] >= first and (oldest is None or self.versions[j] >= oldest)}

    @torch.no_grad()
    def logits(self, batch, forward=None, trained_only: bool = False, step: int | None = None,
               runnable=None) -> list[torch.Tensor]:
        """Each available teacher's output on the student's own batch (the one teacher forward of
        the library). forward(teacher, batch) -> logits; default teacher(batch). runnable(j, teacher)
        -> the module to run in its place (a lower-precision copy; cheap_teachers.py)."""
        available = self.available(trained_only, step)
        teachers = [runnable(j, m) if runnable else m for j, m in available.items()]
        out = [m(batch) if forward is None else forward(m, batch) for m in teachers]
        for m in available.values():
            reshard(m)  # sharded: only the shards stay between forwards (they are what the exchange writes)
        return out

    def staleness(self, step: int) -> int:
        """Steps since the oldest teacher's weights were current (0 right after an exchange);
        -1 while no teacher has weights yet."""
        versions = [v for j, v in self.versions.items() if v >= 0 and j in self.active]
        return step - min(versions) if versions else -1

    def mark_received(self, step: int, models=None) -> None:
        """Teachers `models` (default: all) now hold their model's state after `step` updates."""
        for j in list(self.versions) if models is None else models:
            self.versions[j] = step

    def state_dict(self) -> dict:
        """Their age and, unless sharded (a sharded checkpoint saves the teachers' modules), weights."""
        state = {"versions": {str(j): v for j, v in self.versions.items()}, "active": sorted(self.active)}
        if not self.sharded:
            state["teachers"] = flats_state(self.flats)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self.sharded:  # sharded teachers are loaded as modules (sharded_checkpoint.py)
            load_flats(self.flats, state["teachers"])
        self.versions.update({int(j): v for j, v in state["versions"].items()})
        self.active = set(state.get("active", self.modules))


class Exchange(Protocol):
    """What the trainer and `Codistillation` call: refresh teachers (or, for an outer
    synchronization, the model itself) at the start of step `step`."""

    blocked_seconds: float  # wall time spent inside the exchange (stall)

    def maybe_exchange(self, step: int) -> bool: ...  # at the start of every step; True when teachers changed
    def wait(self) -> None: ...  # complete transfers in flight (before a checkpoint); swaps nothing in
    def finish(self) -> None: ...  # complete a pending transfer and swap it in (at the end of training)
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NoExchange:
    """One model (all-reduce): nothing to exchange."""

    blocked_seconds = 0.0

    def maybe_exchange(self, step: int) -> bool:
        return False

    def wait(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def broadcast_buffers(model: nn.Module, topo: Topology) -> list:
    """Replica 0's buffers to every replica of the model group; returns them."""
    buffers = list(model.buffers())
    if topo.replicas > 1:
        src = topo.grid.rank(topo.job_model, 0)
        works = [dist.broadcast(b, src=src, group=topo.model_group, async_op=True) for b in buffers]
        for w in works:
            w.wait()
    return buffers


def sync_buffers(model: nn.Module, topo: Topology, counter: CommCounter) -> None:
    """Give every replica of our model replica 0's buffers before they are sent.

    DDP keeps parameters identical but lets BatchNorm running statistics drift between replicas
    until its next forward broadcasts them from the group's first rank; doing that broadcast here,
    first, is what makes all workers of a model send (and so receive) identical teachers.
    """
    if topo.replicas == 1:
        return
    buffers = broadcast_buffers(model, topo)
    if topo.replica_index == 0:
        counter.buffer_sync_sent += (topo.replicas - 1) * sum(b.numel() * b.element_size() for b in buffers)


class Exchanger:
    """Refreshes `teachers` from the other models every `every` steps.

    graph: who distils from whom (teacher_graph.py). `all` (or None): each column broadcasts every
    model's state to every other model. `ring` / `random`: point-to-point sends from each model to
    its students at that exchange only, so a worker receives k states, not n - 1, and sends its own
    as many times as it has students.
    """

    def __init__(self, model: nn.Module, teachers: Teachers, topo: Topology, every: int,
                 delay: int = 0, counter: CommCounter | None = None, wire_dtype: torch.dtype | None = None,
                 hierarchical: bool = False, graph: TeacherGraph | None = None):
        if every <= 0:
            raise ValueError(f"exchange period must be > 0, got {every}")
        if not 0 <= delay <= every:
            raise ValueError(f"exchange delay must be in [0, {every}], got {delay}")
        if topo.job_models != topo.n_models:
            raise ValueError("the collective exchange needs every model in this job (use exchange=storage)")
        self.model, self.teachers, self.topo = model, teachers, topo
        self.every, self.delay = every, delay
        self.graph = graph if graph is not None and graph.kind != "all" else None
        self.counter = counter if counter is not None else CommCounter()
        self.send = FlatState(model)
        # Background transfers land in staging buffers, so the teachers in use stay untouched.
        # On the model's device: teachers may be offloaded to the CPU (teacher_offload.py).
        self.staging = {j: FlatState(m, self.send.device) for j, m in teachers.modules.items()} if delay else None
        self._pending: tuple[int, list] | None = None  # (source step, async works)
        self.clock = StallClock(self.send.device)  # wall time spent inside the exchange (stall)
        # Compressed exchange: the fp32 part of each state crosses as `wire_dtype` (bf16 / fp16),
        # half the bytes; receivers widen it back, so the teachers run from the rounded weights.
        self.wire = None
        if wire_dtype is not None and torch.float32 in self.send.buffers:
            # One buffer per model of the column, each its own size (models may differ in architecture).
            flats = {topo.job_model: self.send, **teachers.flats}
            self.wire = {m: torch.empty(f.buffers[torch.float32].numel(), dtype=wire_dtype, device=self.send.device)
                         for m, f in flats.items()}
        self._unwire: dict[int, FlatState] | None = None  # where the wire buffers go once received
        # Hierarchical exchange: only replica 0's column crosses between model groups (machines, when
        # each model group is one machine); it then broadcasts what it received over its model group.
        # The same bytes cross the slow link once instead of once per replica; every replica ends
        # with the same teachers as before, so training is unchanged.
        self.hierarchical = hierarchical and topo.replicas > 1
        self._spread: dict[int, FlatState] | None = None  # received, not yet broadcast to the replicas

    def should_start(self, step: int) -> bool:
        return step % self.every == 0

    @property
    def blocked_seconds(self) -> float:
        return self.clock.seconds

    def maybe_exchange(self, step: int) -> bool:
        """Call at the start of every step; returns True when teachers changed."""
        # Steps that wait for a transfer are timed between device synchronizations (stall_clock.py):
        # two host syncs every T steps, none on other steps.
        with self.clock.timing(waits=self._waits_at(step)):
            return self._maybe_exchange(step)

    def _waits_at(self, step: int) -> bool:
        """Whether step `step` waits for a transfer (a synchronous one, or a pending one due)."""
        due = self._pending is not None and step >= self._pending[0] + self.delay
        return due or (self.should_start(step) and (self.delay == 0 or step == 0))

    def _maybe_exchange(self, step: int) -> bool:
        changed = False
        if self._pending is not None and step >= self._pending[0] + self.delay:
            self.finish()
            changed = True
        if self.should_start(step):
            if self.delay == 0 or step == 0:
                self.start(step, into=None)
                self.finish()
                changed = True
            else:
                self.start(step, into=self.staging)
        return changed

    def received_at(self, step: int) -> list[int]:
        """The teachers the exchange at `step` refreshes (and makes the ones in use)."""
        if self.graph is None:
            return list(self.teachers.modules)
        return self.graph.teachers_of(self.topo.job_model, step // self.every)

    def start(self, step: int, into: dict[int, FlatState] | None) -> None:
        """Snapshot our model and launch the column's broadcasts (asynchronously)."""
        sync_buffers(self.model, self.topo, self.counter)
        self.send.pack(self.model)
        check_finite_before_publishing(list(self.send.buffers.values()), self.topo, step,
                                       sharded=is_sharded(self.model))  # never send a diverged model
        grid, me, replica = self.topo.grid, self.topo.job_model, self.topo.replica_index
        targets = into if into is not None else self.teachers.flats
        received = self.received_at(step)
        if self.hierarchical:
            self._spread = targets
            if replica != 0:  # this replica receives from replica 0 of its own group, in `wait`
                self.counter.add_exchange(sent=0, received=0)  # nothing crosses between groups here
                self._pending, self._into_staging = (step, []), into is not None
                return
        if self.wire is not None:
            self.wire[me].copy_(self.send.buffers[torch.float32])
            self._unwire = {j: targets[j] for j in received}
        if self.graph is not None:
            self._start_sends(step, targets, received)
            return
        works = []
        for m in range(grid.n_models):
            flat = self.send if m == me else targets[m]
            for dtype, buffer in flat.buffers.items():
                if dtype == torch.float32 and self.wire is not None:
                    buffer = self.wire[m]
                works.append(dist.broadcast(buffer, src=grid.rank(m, replica),
                                            group=self.topo.exchange_group, async_op=True))
        state_bytes = self.wire_nbytes(self.send)
        self.counter.add_exchange(sent=(grid.n_models - 1) * state_bytes,
                                  received=sum(self.wire_nbytes(targets[j]) for j in self.teachers.modules))
        self._pending = (step, works)
        self._into_staging = into is not None

    def _buffers(self, m: int, flat: FlatState) -> list[torch.Tensor]:
        """Model m's state as it crosses: its flat buffers, the fp32 one as the wire dtype."""
        return [self.wire[m] if dtype == torch.float32 and self.wire is not None else buffer
                for dtype, buffer in flat.buffers.items()]

    def _start_sends(self, step: int, targets: dict[int, FlatState], received: list[int]) -> None:
        """ring / random: our state to this exchange's students, theirs from our teachers, point to
        point over the column (every worker derives the same draws, so sends and receives pair up)."""
        grid, me, replica = self.topo.grid, self.topo.job_model, self.topo.replica_index
        students = self.graph.students_of(me, step // self.every)
        group = self.topo.exchange_group
        ops = [dist.P2POp(dist.isend, buffer, grid.rank(s, replica), group, tag)
               for s in students for tag, buffer in enumerate(self._buffers(me, self.send))]
        ops += [dist.P2POp(dist.irecv, buffer, grid.rank(j, replica), group, tag)
                for j in received for tag, buffer in enumerate(self._buffers(j, targets[j]))]
        state_bytes = self.wire_nbytes(self.send)
        self.counter.add_exchange(sent=len(students) * state_bytes,
                                  received=sum(self.wire_nbytes(targets[j]) for j in received))
        self._pending = (step, dist.batch_isend_irecv(ops) if ops else [])
        self._into_staging = targets is self.staging

    def wait(self) -> None:
        """Complete the transfer in flight, if any; it is still swapped in at its step."""
        if self._pending is not None:
            step, works = self._pending
            for w in works:
                w.wait()
            if self._unwire is not None:  # widen the received states into their fp32 buffers
                for j, flat in self._unwire.items():
                    flat.buffers[torch.float32].copy_(self.wire[j])
                self._unwire = None
            if self._spread is not None:  # hierarchical: replica 0 hands the teachers to its group
                self._broadcast_in_group(self._spread)
                self._spread = None
            self._pending = (step, [])

    def _broadcast_in_group(self, targets: dict[int, FlatState]) -> None:
        """Every teacher's state from replica 0 to the other replicas of the model group (the fast,
        local links that carry the group's gradient all-reduce every step)."""
        src = self.topo.grid.rank(self.topo.job_model, 0)
        received = self.received_at(self._pending[0])
        for j in received:
            for buffer in targets[j].buffers.values():
                dist.broadcast(buffer, src=src, group=self.topo.model_group)
        if self.topo.rank == src:
            self.counter.buffer_sync_sent += (self.topo.replicas - 1) * sum(targets[j].nbytes for j in received)

    def wire_nbytes(self, flat: FlatState) -> int:
        """Bytes one state takes on the wire (its fp32 part at the wire dtype when compressed)."""
        if self.wire is None:
            return flat.nbytes
        fp32 = flat.buffers[torch.float32]
        wire = next(iter(self.wire.values()))
        return flat.nbytes - fp32.numel() * (fp32.element_size() - wire.element_size())

    def finish(self) -> None:
        """Wait for the pending transfer and swap it into the teachers."""
        if self._pending is None:
            return
        self.wait()
        received = self.received_at(self._pending[0])
        if self._into_staging:
            for j in received:
                self.teachers.flats[j].copy_(self.staging[j])
        self.teachers.mark_received(self._pending[0], received)
        self.teachers.active = set(received)
        self._pending = None

    def state_dict(self) -> dict:
        """Teachers, their age, and a transfer waiting to be swapped in (call `wait` first)."""
        state = {**self.teachers.state_dict(), "pending_step": -1}
        if self._pending is not None:
            if self._pending[1]:
                raise RuntimeError("a transfer is in flight: call wait() before state_dict()")
            state["pending_step"] = self._pending[0]
            state["staging"] = flats_state(self.staging) if self._into_staging else None
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teachers.load_state_dict(state)
        if state["pending_step"] >= 0:
            self._into_staging = state.get("staging") is not None
            if self._into_staging:
                load_flats(self.staging, state["staging"])
            self._pending = (state["pending_step"], [])


def flats_state(flats: dict[int, FlatState]) -> dict:
    return {str(j): f.state_dict() for j, f in flats.items()}


def load_flats(flats: dict[int, FlatState], state: dict) -> None:
    for j, flat in flats.items():
        flat.load_state_dict(state[str(j)])
