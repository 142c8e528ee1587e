"""Exchange through shared storage (Anil et al.'s original mechanism).

Model groups run as separate jobs (separate torchrun invocations, each with its own process group)
and never wait for each other: every T steps each group's first rank publishes its model's state
to `exchange_dir/model_<i>/step_<s>.pt` (written to a temporary name, fsynced, renamed, then its
SHA-256 written beside it), and loads the newest complete file of every other model. A slow or
dead group only makes its peers' teachers staler (logged as staleness); a restarted group rejoins
by publishing again. Partial, corrupt or mismatched files are skipped with a warning, never loaded;
each publisher removes its own old files.

Within a job, the first rank reads the files and broadcasts the teachers to the other replicas, so
every worker of a model holds identical teachers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .accounting import CommCounter
from .checkpoint import save_file, sha256_file
from .errors import UserError
from .exchange import Teachers, sync_buffers
from .flat import FlatState
from .topology import Topology

KEEP = 3  # files each publisher keeps, so a reader never races the removal of the one it chose


def warn(message: str) -> None:
    print(f"codistill: warning: {message}", file=sys.stderr, flush=True)


class StorageExchanger:
    def __init__(self, model: nn.Module, teachers: Teachers, topo: Topology, every: int,
                 directory: str | Path, counter: CommCounter | None = None):
        if every <= 0:
            raise ValueError(f"exchange period must be > 0, got {every}")
        self.model, self.teachers, self.topo = model, teachers, topo
        self.model_index, self.every = topo.model_index, every
        self.directory = Path(directory)
        self.counter = counter if counter is not None else CommCounter()
        self.send = FlatState(model)
        self.blocked_seconds = 0.0
        self._bad: set[Path] = set()  # files already warned about

    def maybe_exchange(self, step: int) -> bool:
        if step % self.every:
            return False
        t0 = time.perf_counter()
        try:
            sync_buffers(self.model, self.topo, self.counter)
            if self.topo.is_model_leader:
                self.publish(step)
                self.load_newest()
            self._share_teachers()
            return True
        finally:
            self.blocked_seconds += time.perf_counter() - t0

    def publish(self, step: int) -> None:
        self.send.pack(self.model)
        mine = self.directory / f"model_{self.model_index}"
        path = mine / f"step_{step:08d}.pt"
        digest = save_file({"step": step, "model": self.model_index, "state": self.send.state_dict(),
                            "channels_last": self.send.channels_last()}, path)
        _write_text(path.with_suffix(".sha256"), digest)
        self.counter.add_exchange(sent=self.send.nbytes, received=0)
        for old in sorted(mine.glob("step_*.pt"))[:-KEEP]:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)

    def load_newest(self) -> None:
        """Load the newest complete, valid file of each peer into its teacher (first rank only)."""
        for j, flat in self.teachers.flats.items():
            for path in sorted((self.directory / f"model_{j}").glob("step_*.pt"), reverse=True):
                state = self._read(path, flat)
                if state is None:
                    continue
                layout = state.get("channels_last")
                if layout is not None and layout != flat.channels_last():
                    # The flat buffers hold each weight in its writer's memory format.
                    raise UserError(f"exchange file {path} was written by a job with another memory layout "
                                    f"(model.channels_last differs): give every job the same model.channels_last")
                if state["step"] != self.teachers.versions[j]:
                    flat.load_state_dict(state["state"])
                    self.teachers.mark_received(state["step"], [j])
                    self.counter.exchange_received += flat.nbytes
                break

    def _read(self, path: Path, flat: FlatState) -> dict | None:
        digest_file = path.with_suffix(".sha256")
        if not digest_file.is_file():
            return None  # still being written (the digest comes last)
        if path in self._bad:
            return None
        problem = None
        try:
            if sha256_file(path) != digest_file.read_text().strip():
                problem = "checksum mismatch"
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if {k: v.shape for k, v in state["state"].items()} != flat.shapes():
                    problem = "its state does not match this model's architecture"
                else:
                    return state
        except FileNotFoundError:
            return None  # removed by its publisher meanwhile
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            problem = f"unreadable ({str(e).splitlines()[0][:120]})"
        self._bad.add(path)
        warn(f"skipping exchange file {path}: {problem}")
        return None

    def _share_teachers(self) -> None:
        if self.topo.replicas == 1:
            return
        src = self.topo.grid.rank(0, 0)
        device = next(iter(self.send.buffers.values())).device  # NCCL broadcasts device tensors only
        versions = torch.tensor([self.teachers.versions[j] for j in self.teachers.flats], dtype=torch.int64,
                                device=device)
        dist.broadcast(versions, src=src, group=self.topo.model_group)
        for j, v in zip(self.teachers.flats, versions.tolist()):
            self.teachers.mark_received(v, [j])
            for buf in self.teachers.flats[j].buffers.values():
                dist.broadcast(buf, src=src, group=self.topo.model_group)

    def wait(self) -> None:
        """Nothing in flight: reads and writes complete inside maybe_exchange."""

    def finish(self) -> None:
        """Nothing in flight: reads and writes complete inside maybe_exchange."""

    def state_dict(self) -> dict:
        return {**self.teachers.state_dict(), "pending_step": -1}

    def load_state_dict(self, state: dict) -> None:
        self.teachers.load_state_dict(state)


def _write_text(path: Path, text: str) -> None:
    from .run_log import atomic_write_text

    atomic_write_text(path, text)
