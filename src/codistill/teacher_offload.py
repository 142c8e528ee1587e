"""Teachers kept in CPU memory between their forwards (`codistill.teacher_offload`).

A teacher is used once per step, for one forward without autograd, and refreshed once per exchange;
the rest of the time it only takes device memory. With offloading, its state lives in a CPU store
(pinned under CUDA, so the copies to the device run asynchronously on the teachers' stream):

- Whole teachers (train.parallel=ddp): the store is the teacher's flat buffers (exchange.Teachers
  binds the teacher's tensors into them), moved to the CPU. A forward pre-hook copies the store to
  the device and points the teacher's tensors at that copy; a forward hook points them back at the
  store and drops the copy. One teacher is on the device at a time, only during its forward.
- Sharded teachers (train.parallel=fsdp): FSDP2's own `CPUOffloadPolicy` keeps the shards on the
  CPU and gathers them onto the device for the forward (sharding.shard_model); a forward hook
  reshards the teacher afterwards (FSDP leaves a root module gathered after a forward, for the
  backward a teacher never runs).
- The exchange: gloo receives into the CPU store directly; a device backend (NCCL) cannot, so a
  step whose exchange receives into the teachers (`Exchanger.should_start` and synchronous) runs
  with the teachers' flat buffers on the device and copies them back to the store after. The same
  dance runs on a CPU device, so that the tests exercise it.

Results are those of resident teachers: the same values, copied.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .exchange import Exchanger, Teachers
from .flat import FlatState
from .sharding import is_sharded


def _copy(buffers: dict, device: torch.device, pin: bool = False) -> dict:
    out = {dt: b.to(device, copy=True, non_blocking=True) for dt, b in buffers.items()}
    return {dt: b.pin_memory() for dt, b in out.items()} if pin else out


def _point(module: nn.Module, flat: FlatState, buffers: dict) -> None:
    """Make `module`'s (bound) tensors views into `buffers`, laid out as `flat`'s own."""
    held, flat.buffers = flat.buffers, buffers
    try:
        views = flat.views()
    finally:
        flat.buffers = held
    for name, t in module.state_dict(keep_vars=True).items():
        if name in flat.slots:
            t.data = views[flat.slots[name]]


class TeacherStore:
    """Moves `teachers` to the CPU store now and installs the per-forward moves (see module doc)."""

    def __init__(self, teachers: Teachers, device: torch.device):
        self.teachers, self.device = teachers, device
        self.pin = device.type == "cuda"
        self.on_device: dict[int, dict] = {}  # teacher j -> its flat buffers on the device, during its forward
        for j, m in teachers.modules.items():
            if is_sharded(m):  # FSDP holds the shards on the CPU (CPUOffloadPolicy); reshard after use
                m.register_forward_hook(lambda mod, *_: mod.reshard())
                continue
            flat = teachers.flats[j]
            flat.buffers = _copy(flat.buffers, torch.device("cpu"), self.pin)
            _point(m, flat, flat.buffers)
            m.register_forward_pre_hook(lambda mod, args, j=j: self._to_device(j))
            m.register_forward_hook(lambda mod, args, out, j=j: self._to_store(j))

    def _to_device(self, j: int) -> None:
        flat = self.teachers.flats[j]
        self.on_device[j] = _copy(flat.buffers, self.device)
        _point(self.teachers.modules[j], flat, self.on_device[j])

    def _to_store(self, j: int) -> None:
        flat = self.teachers.flats[j]
        _point(self.teachers.modules[j], flat, flat.buffers)
        del self.on_device[j]  # the device copy is freed (on CUDA, reused only after the stream's work)

    def receives_at(self, exchanger, step: int) -> bool:
        """Whether `exchanger`'s transfer at `step` writes into the teachers' flat buffers (a
        synchronous exchange; a delayed one lands in its staging buffers and is copied in)."""
        return (isinstance(exchanger, Exchanger) and exchanger.should_start(step)
                and (exchanger.delay == 0 or step == 0))

    @contextlib.contextmanager
    def receiving(self):
        """The teachers' flat buffers on the device for an exchange, copied back to the store after."""
        stores = {j: f.buffers for j, f in self.teachers.flats.items()}
        for j, flat in self.teachers.flats.items():
            flat.buffers = _copy(stores[j], self.device)
            if not is_sharded(self.teachers.modules[j]):
                _point(self.teachers.modules[j], flat, flat.buffers)
        try:
            yield
        finally:
            for j, flat in self.teachers.flats.items():
                for dt, b in stores[j].items():
                    b.copy_(flat.buffers[dt])
                flat.buffers = stores[j]
                if not is_sharded(self.teachers.modules[j]):
                    _point(self.teachers.modules[j], flat, flat.buffers)
