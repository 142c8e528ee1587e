"""`Codistillation`: the method as one object around your model and optimizer.

    codist = cd.Codistillation(make_net, n_models=2, every=50, alpha=1.0)
    loader = DataLoader(ds, batch_size=32, sampler=codist.sampler(ds))
    optimizer = torch.optim.SGD(codist.model.parameters(), lr=0.1)
    with codist.attach(optimizer):
        for x, y in loader:
            losses = codist.loss(codist.model(x), y, teacher_inputs=x)
            optimizer.zero_grad(); losses["total"].backward(); optimizer.step()

It owns everything codistillation adds to data-parallel training: the rank grid (`topology`), each
model's seed, DDP over the model group, the frozen teachers, the exchange that refreshes them
(collective or through storage, picked from `EXCHANGES`), the distillation loss, the teachers'
CUDA stream, and a sampler that shards data by replica with the model's seed. `Trainer`, the
benchmarks and the README example all go through it.

Steps: `step` counts completed optimizer steps (a hook on `optimizer.step`, installed by `attach`).
Step s begins with its exchange (at s = 0, T, 2T, ...; see exchange.py for the delay), run by the
first of these in that step: the model's forward in training mode (a forward pre-hook),
`teacher_logits`, `loss` or `maybe_exchange`. So what is sent is the model's state after exactly
s updates (before this step's forward touches BatchNorm statistics), and the teachers a step uses
are the ones the schedule says.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .accounting import CommCounter, counting_allreduce_hook
from .config import ONE_MODEL_EXCHANGES
from .cheap_teachers import LowPrecisionTeachers, check_cheap_teachers, leading_rows, should_run_teachers
from .data.sampling import ShardSampler
from .data.splits import model_indices
from .exchange import Exchange, Exchanger, NoExchange, Teachers, broadcast_buffers
from .losses import TopKTeacher, codistillation_loss, topk_teacher
from .sharding import (PARALLEL, forward_gather_bytes, gathered, model_mesh, shard_model, shard_size_of,
                       sharded_traffic)
from .teacher_offload import TeacherStore
from .teacher_graph import TeacherGraph
from .topology import Topology, build_topology, model_seed


def _collective(c: "Codistillation") -> Exchange:
    if not len(c.teachers):
        return NoExchange()
    return Exchanger(c.module, c.teachers, c.topo, c.every, c.delay, counter=c.counter, wire_dtype=c.wire_dtype,
                     hierarchical=c.hierarchical and c.mesh is None, graph=c.graph)


def _storage(c: "Codistillation") -> Exchange:
    from .storage_exchange import StorageExchanger

    if not len(c.teachers):
        return NoExchange()
    return StorageExchanger(c.module, c.teachers, c.topo, c.every, c.exchange_dir, counter=c.counter)


def _frozen(c: "Codistillation") -> Exchange:
    from .frozen_teachers import FrozenTeachers

    return FrozenTeachers(c.teachers, c.teacher_run)


def _outer_sync(averaging: bool) -> Callable[["Codistillation"], Exchange]:
    """DiLoCo (`outer` optimizer) or local SGD (plain averaging) every `every` steps; no teachers."""

    def make(c: "Codistillation") -> Exchange:
        from .outer_sync import AVERAGING, OuterSync

        lr, momentum, nesterov = AVERAGING if averaging else c.outer
        sync = OuterSync(c.module, c.topo, c.every, lr, momentum, nesterov, counter=c.counter,
                         hierarchical=c.hierarchical and c.mesh is None, state_device=c.outer_state_device)
        sync.start_together()  # one starting point (model 0's), before anyone records "initial"
        return sync

    return make


# The one place an exchange is chosen: name -> factory(codistillation). Another synchronization
# plugs in by adding an entry with the `Exchange` protocol.
EXCHANGES: dict[str, Callable[["Codistillation"], Exchange]] = {
    "collective": _collective, "storage": _storage, "frozen": _frozen,
    "diloco": _outer_sync(averaging=False), "localsgd": _outer_sync(averaging=True),
}
OUTER_SYNCS = ("diloco", "localsgd")  # exchanges that average the models themselves: no teachers
WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # exchange_dtype -> on the wire
OUTER_STATE_DEVICES = ("device", "cpu")  # where DiLoCo's global copy and momentum live
DILOCO_OUTER = (0.7, 0.9, True)  # Douillard et al. 2023: outer Nesterov SGD, lr 0.7, momentum 0.9


def _by_index(make_model: Callable) -> Callable[[int], nn.Module]:
    """make_model(j) if it takes an argument (a model index), else make_model()."""
    try:
        takes_index = len(inspect.signature(make_model).parameters) > 0
    except (TypeError, ValueError):  # some builtins have no signature
        takes_index = False
    return make_model if takes_index else (lambda j: make_model())


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Codistillation:
    """One of n codistilled models on this worker, with its teachers and their exchange.

    make_model: builds a fresh model; called with the model index j if it takes an argument
        (models may differ), for this worker's model and for each teacher.
    n_models, every (T), alpha: n, the exchange period and the distillation weight (a float, or a
        function of the step, e.g. a schedule).
    delay: collective exchange only, steps between an exchange's start and its swap (exchange.py).
    exchange: `collective` (one job holds all models) or `storage` (this job trains `model_index`,
        teachers travel through files in `exchange_dir`) or `frozen` (this job trains `model_index`;
        the teachers are the other models of the finished run `teacher_run`, never refreshed:
        offline distillation, frozen_teachers.py); or, instead of distillation, `diloco` /
        `localsgd`: every `every` steps the models average their parameter change and apply it with
        the outer SGD `outer` = (lr, momentum, nesterov) / plain averaging (outer_sync.py); no
        teachers, and all models start from model 0's initialization and end as one.
    loss, temperature, label_smoothing: the objective (losses.py).
    teacher_mode, teacher_precision: `eval`/`train` teachers; `bf16` / `fp16` runs them under autocast.
    exchange_dtype: collective exchange only, `bf16` / `fp16` sends the fp32 weights rounded to it
        (half the bytes); the teachers run from the rounded weights.
    hierarchical: collective exchange only, replica 0 of each model exchanges and then broadcasts the
        teachers over its model group (the states cross between groups once, not once per replica).
    seed: the run's seed; model j uses model_seed(seed, j) for its initialization and data order.
    device: where models live (default: the current CUDA device under NCCL, else the CPU).
    topology, counter: pass them to share a grid or byte counter already built.
    wrap: wrap the model in DDP over its model group (False when a framework wraps it, as the
        Lightning strategy does; `model` is then the module itself).
    parallel: `ddp` (every worker of a group holds the whole model) or `fsdp`: the model and its
        teachers are sharded over the model group with FSDP2 (sharding.py; `model` is the sharded
        module itself), and the exchange and outer steps move each worker's shard over its column
        (1/k of a model per worker). `hierarchical` then changes nothing: each shard already
        crosses between groups once, as the hierarchical exchange arranges for DDP.
    shard_size: with parallel='fsdp', shard over runs of this many workers of the group and
        replicate across runs (HSDP, a 2-D mesh; sharding.model_mesh); None: the whole group.
    trained_teachers_only: never distill toward a teacher that still holds the initial weights
        handed out at step 0 (through storage, a slow peer's first trained file can arrive long after
        step T); the trainer sets it with the default burn-in.
    graph, peers: who distils from whom (teacher_graph.py): `all` (every other model), `ring` (models
        i+1 .. i+peers mod n) or `random` (`peers` others drawn at each exchange, the same on every
        replica of a model). A worker runs, and with the collective exchange receives, only its
        teachers; it holds copies of the ones it may use (ring: its peers; random: all others).
        Storage exchange: `all` or `ring` (its jobs do not exchange in step, so they cannot agree
        on a draw).
    max_teacher_age: > 0: a teacher whose weights are more than this many steps old sits out of the
        distillation term (the mean runs over the others); 0 never drops one.
    distill_fraction, teacher_every, teacher_dtype, teacher_topk: cheaper teachers (cheap_teachers.py):
        teachers on the first ceil(f * B) examples of each batch only; on steps 0, m, 2m, ... only
        (the distillation term is absent on the others, alpha unscaled); run from a `bf16` copy of
        their weights or with `int8` dynamic quantized Linear layers (CPU); KL on each teacher's
        top-k classes plus one bucket for the rest (losses.topk_kl_per_row). Defaults: the paper's
        full-batch, every-step, fp32, full-KL teacher.
    outer_state_device: DiLoCo / local SGD, where the global copy and outer momentum live: `device`
        (the model's) or `cpu` (pinned under CUDA; the device holds them only inside an outer step).
    teacher_offload: keep the teachers in CPU memory (pinned under CUDA) between their forwards,
        one teacher on the device at a time during its forward (teacher_offload.py); same results.
    """

    def __init__(self, make_model: Callable, n_models: int = 2, every: int = 50,
                 alpha: float | Callable[[int], float] = 1.0, *, delay: int = 0, exchange: str = "collective",
                 exchange_dir: str | Path | None = None, teacher_run: str | Path | None = None, model_index: int | None = None, loss: str = "kl",
                 temperature: float = 1.0, label_smoothing: float = 0.0, teacher_mode: str = "eval",
                 teacher_precision: str = "fp32", exchange_dtype: str = "fp32", hierarchical: bool = False,
                 outer: tuple[float, float, bool] = DILOCO_OUTER, seed: int = 0,
                 device: torch.device | None = None, topology: Topology | None = None,
                 counter: CommCounter | None = None, wrap: bool = True, trained_teachers_only: bool = False,
                 max_teacher_age: int = 0, distill_fraction: float = 1.0, teacher_every: int = 1,
                 teacher_dtype: str = "fp32", teacher_topk: int | None = None, parallel: str = "ddp",
                 teacher_offload: bool = False, outer_state_device: str = "device",
                 graph: str = "all", peers: int = 1, shard_size: int | None = None):
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {exchange!r}; allowed: {', '.join(EXCHANGES)}")
        if teacher_precision not in WIRE_DTYPES:
            raise ValueError(f"unknown teacher_precision {teacher_precision!r}; allowed: {', '.join(WIRE_DTYPES)}")
        if exchange_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown exchange_dtype {exchange_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
        if exchange_dtype != "fp32" and exchange != "collective":
            raise ValueError("exchange_dtype applies to the collective exchange only")
        if hierarchical and exchange == "storage":
            raise ValueError("hierarchical applies to the collective exchange and DiLoCo / local SGD")
        if parallel not in PARALLEL:
            raise ValueError(f"unknown parallel {parallel!r}; allowed: {', '.join(PARALLEL)}")
        if parallel == "fsdp" and (exchange in ONE_MODEL_EXCHANGES or not wrap):
            raise ValueError("parallel='fsdp' needs the collective exchange (or DiLoCo / local SGD) and wrap=True")
        if exchange == "storage" and (model_index is None or exchange_dir is None) and topology is None:
            raise ValueError("exchange='storage' needs model_index (this job's model) and exchange_dir")
        if graph == "random" and exchange == "storage":
            raise ValueError("graph='random' needs the collective exchange (storage jobs cannot agree on a draw)")
        if exchange == "frozen" and (teacher_run is None or (model_index is None and topology is None)):
            raise ValueError("exchange='frozen' needs model_index (this job's model) and teacher_run")
        self.topo = topology or build_topology(n_models, model_index if exchange in ONE_MODEL_EXCHANGES else None)
        self.graph = TeacherGraph(graph, self.topo.n_models, peers, seed)
        self.every, self.delay, self.alpha, self.exchange_dir = every, delay, alpha, exchange_dir
        self.teacher_run = teacher_run
        self.loss_kind, self.temperature, self.label_smoothing = loss, temperature, label_smoothing
        self.teacher_precision, self.outer = teacher_precision, outer
        if outer_state_device not in OUTER_STATE_DEVICES:
            raise ValueError(f"unknown outer_state_device {outer_state_device!r}; allowed: {', '.join(OUTER_STATE_DEVICES)}")
        self.outer_state_device = outer_state_device
        self.wire_dtype, self.hierarchical = WIRE_DTYPES[exchange_dtype], hierarchical
        self.trained_teachers_only = trained_teachers_only
        self.device = device if device is not None else _default_device()
        check_cheap_teachers(distill_fraction, teacher_every, teacher_dtype, teacher_topk, self.device.type)
        if parallel == "fsdp" and teacher_dtype != "fp32":
            raise ValueError("teacher_dtype applies to parallel='ddp' (sharded teachers stay fp32)")
        if teacher_offload and teacher_dtype != "fp32":
            raise ValueError("teacher_offload keeps the fp32 teachers on the CPU; a teacher_dtype copy would stay "
                             "on the device: use teacher_dtype='fp32'")
        self.distill_fraction, self.teacher_every, self.teacher_topk = distill_fraction, teacher_every, teacher_topk
        self.low_precision = LowPrecisionTeachers(teacher_dtype)
        self.base_seed = seed
        self.seed = model_seed(seed, self.topo.model_index)
        self.counter = counter if counter is not None else CommCounter()

        # Sharded: each model and teacher over the model group's mesh, in place (sharding.py).
        self.mesh = model_mesh(self.topo, self.device, shard_size) if parallel == "fsdp" else None
        shard = (lambda m, *how: shard_model(m, self.mesh, *how)) if self.mesh is not None else (lambda m, *how: m)
        build = _by_index(make_model)
        torch.manual_seed(self.seed)
        self.module = shard(build(self.topo.model_index).to(self.device))  # this worker's model, no DDP
        with torch.random.fork_rng(devices=[]):  # teachers' (overwritten) init must not shift our RNG
            held = [] if exchange in OUTER_SYNCS else self.graph.held_by(self.topo.model_index)
            teachers = {j: shard(build(j).to(self.device), teacher_offload) for j in held}
        self.teachers = Teachers(teachers, teacher_mode, max_teacher_age)
        self.model = self._wrap(self.module) if wrap else self.module  # what to call forward on and optimize
        # First among the forward pre-hooks: the exchange reads the shards before FSDP gathers them.
        self.model.register_forward_pre_hook(self._before_forward, prepend=True)
        # In-group traffic of a sharded model, counted as its all-reduce: the student's gathers per
        # forward + backward and reduce-scatter per update, each teacher's gather per forward.
        k = shard_size_of(self.mesh) if self.mesh is not None else self.topo.replicas
        self._gather_bytes, self._reduce_bytes = (sharded_traffic(self.module, k, self.topo.replicas // k)
                                                  if self.mesh is not None else (0, 0))
        self._teacher_gather_bytes = {j: forward_gather_bytes(m, k) if self.mesh is not None else 0
                                      for j, m in self.teachers.modules.items()}
        self.exchanger = EXCHANGES[exchange](self)  # checked above (its buffers sized on the device)
        # Offloaded teachers: in a CPU store between forwards (teacher_offload.py).
        self.teacher_store = TeacherStore(self.teachers, self.device) if teacher_offload and len(self.teachers) else None
        self.teacher_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.step = 0  # completed optimizer steps
        self._exchanged_step = -1  # the step whose exchange already ran

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP over this model's group, counting its all-reduce bytes; no wrapper for one replica
        (nor for a sharded module: FSDP is its own wrapper)."""
        if self.topo.replicas == 1 or self.mesh is not None:
            return module
        ddp = DDP(module, process_group=self.topo.model_group,
                  device_ids=[self.device.index] if self.device.type == "cuda" else None)
        ddp.register_comm_hook(self.topo.model_group, counting_allreduce_hook(self.counter))
        return ddp

    # -- data -----------------------------------------------------------------------------------

    def sampler(self, dataset, split: str = "shared") -> ShardSampler:
        """This replica's share of `dataset`, shuffled with this model's seed, reshuffled each epoch.

        split: `shared` (every model sees all of it) or `disjoint` (model j sees its fixed 1/n).
        """
        indices = model_indices(torch.arange(len(dataset)), split, self.topo.model_index, self.topo.n_models,
                                self.base_seed)
        return ShardSampler(indices, self.topo.replicas, self.topo.replica_index, self.seed)

    # -- one step ---------------------------------------------------------------------------------

    def current_alpha(self) -> float:
        return float(self.alpha(self.step)) if callable(self.alpha) else float(self.alpha)

    def _before_forward(self, module: nn.Module, args) -> None:
        if module.training:  # not evaluation: that happens between steps
            self.maybe_exchange()
            if self.mesh is not None:  # as DDP does before every training forward
                broadcast_buffers(self.module, self.topo)
                self.counter.allreduce_sent += self._gather_bytes

    def evaluating(self):
        """A context for evaluating (or sampling from) the model outside the training steps
        (collective: every worker of the group calls it). Every worker first takes replica 0's
        buffers, as DDP's next training forward would: BatchNorm's running statistics drift between
        replicas after the last broadcast, and the model evaluated must be the one checkpointed and
        exported (replica 0's), not a mix of each worker's statistics over its share of the split
        (a few KiB per evaluation, not counted). A sharded model is then gathered on every worker."""
        broadcast_buffers(self.module, self.topo)
        return gathered(self.module) if self.mesh is not None else contextlib.nullcontext()

    def maybe_exchange(self) -> None:
        """Run this step's exchange, once (teacher_logits and loss call it too)."""
        if self._exchanged_step != self.step:
            self._exchanged_step = self.step
            store = self.teacher_store
            with store.receiving() if store and store.receives_at(self.exchanger, self.step) else contextlib.nullcontext():
                self.exchanger.maybe_exchange(self.step)

    def teacher_logits(self, batch, forward: Callable | None = None) -> list[torch.Tensor]:
        """Each teacher's logits on `batch`, without autograd; [] when alpha is 0 or no teacher
        holds weights yet. forward(teacher, batch) -> logits; default teacher(batch).

        On CUDA the teachers run on their own stream: call this before the student's forward so
        the two overlap; `loss` waits for them.
        """
        self.maybe_exchange()
        if self.current_alpha() <= 0 or not self.teachers.available(self.trained_teachers_only, self.step):
            return []
        if not should_run_teachers(self.step, self.teacher_every):
            return []
        batch = leading_rows(batch, self.distill_fraction)
        for j in self.teachers.available(self.trained_teachers_only, self.step):  # sharded: their gathers
            self.counter.allreduce_sent += self._teacher_gather_bytes[j]
        dtype = WIRE_DTYPES[self.teacher_precision]  # fp32: None, bf16, fp16
        amp = torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        if self.teacher_stream is None:
            with amp:
                return self._run_teachers(batch, forward)
        self.teacher_stream.wait_stream(torch.cuda.current_stream(self.device))  # the batch is ready
        with torch.cuda.stream(self.teacher_stream), amp:
            return self._run_teachers(batch, forward)

    def _run_teachers(self, batch, forward: Callable | None) -> list:
        run = (lambda j, m: self.low_precision.runnable(j, m, self.teachers.versions[j]))
        logits = self.teachers.logits(batch, forward, self.trained_teachers_only, self.step, runnable=run)
        if self.teacher_topk is None:
            return logits
        # one teacher's (tokens x vocabulary) logits at a time: each is cut to k columns before the next runs
        return [topk_teacher(t, self.teacher_topk, self.temperature) for t in logits]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: list[torch.Tensor] | None = None,
             *, teacher_inputs=None) -> dict[str, torch.Tensor]:
        """{"total", "task", "distill"} of the codistillation objective at this step (losses.py).

        Pass the teachers' logits (from `teacher_logits`) or their inputs (run here).
        """
        self.maybe_exchange()
        if teacher_logits is None:
            if teacher_inputs is None:
                raise TypeError("loss() needs teacher_logits or teacher_inputs")
            teacher_logits = self.teacher_logits(teacher_inputs)
        if self.teacher_stream is not None and teacher_logits:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.teacher_stream)
            for t in teacher_logits:
                for tensor in (t if isinstance(t, TopKTeacher) else (t,)):
                    tensor.record_stream(main)  # allocated on the side stream, used on the main one
        teacher_logits = [t if isinstance(t, TopKTeacher) else t.float() for t in teacher_logits]
        return codistillation_loss(logits.float(), teacher_logits, targets,
                                   alpha=self.current_alpha(), kind=self.loss_kind, temperature=self.temperature,
                                   label_smoothing=self.label_smoothing)

    def on_optimizer_step(self, *_) -> None:
        """One update done (installed on `optimizer.step` by `attach`)."""
        self.step += 1
        if self.mesh is not None:  # FSDP's gradient reduce-scatter of this update
            self.counter.allreduce_sent += self._reduce_bytes
            self.counter.allreduce_calls += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> "Attached":
        """Count `optimizer`'s steps from now on (a hook on `optimizer.step`).

        Use it as a context manager: leaving the block normally finishes a transfer still in
        flight; leaving it either way removes the hook.
        """
        return Attached(self, optimizer.register_step_post_hook(self.on_optimizer_step))

    # -- transfers and state ------------------------------------------------------------------------

    def wait(self) -> None:
        """Complete transfers in flight (before a checkpoint); nothing is swapped in early."""
        self.exchanger.wait()

    def finish(self) -> None:
        """Complete and swap in a pending transfer (at the end of training)."""
        self.exchanger.finish()

    @property
    def blocked_seconds(self) -> float:
        return self.exchanger.blocked_seconds

    def staleness(self) -> int:
        """Age in steps of the oldest teacher at the last completed step (0 with no teachers)."""
        return self.teachers.staleness(self.step - 1) if len(self.teachers) else 0

    def state_dict(self) -> dict:
        """The step and the exchange's state (teachers, their age, a pending transfer)."""
        self.wait()
        return {"step": self.step, "exchanger": self.exchanger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.exchanger.load_state_dict(state["exchanger"])
        self.low_precision.clear()  # the teachers' weights may differ at an unchanged version


class Attached:
    """What `Codistillation.attach` returns: the hook, removed on exit."""

    def __init__(self, codist: Codistillation, handle):
        self.codist, self.handle = codist, handle

    def __enter__(self) -> Codistillation:
        return self.codist

    def __exit__(self, exc_type, *_) -> None:
        self.handle.remove()
        if exc_type is None:  # after an error a peer may be gone: waiting on it would hang
            self.codist.finish()
