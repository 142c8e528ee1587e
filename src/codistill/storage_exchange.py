"""Exchange through shared storage (Anil et al.'s original mechanism).

Model groups run as separate jobs (separate torchrun invocations, each with its own process group)
and never wait for each other. `codistill.exchange_dir` is a path or a URL (exchange_store.py):

    run.json                         the run: {"run": id, "n_models": n}, written by the first job
    model_<i>/latest.json            pointer: {"object", "sha256", "step", "run", "incarnation", "time"}
    model_<i>/<run>.<incarnation>.step_<s>.pt   one publication (model state after s updates)

Every T steps each group's first rank snapshots its model and hands it to a background thread, which
writes the object, then the pointer naming it with its SHA-256 (so a reader sees a complete object or
the previous one), and then reads every peer's pointer: an object it has not loaded yet is
downloaded, verified and kept until the training loop swaps it into the teacher at the next step
boundary (with one replica; with several, at the next exchange step, where the replicas agree on it).
The step itself never waits on storage: if the previous round is still in flight, this period's
publication is skipped (counted). Peers reload when the pointer names a new object, not a new step
number, and every name carries the run and the incarnation (a fresh id per process start), so a
group restarted from an older checkpoint publishes lower steps that its peers still take, and never
overwrites or deletes what its previous incarnation or anyone else wrote. Each incarnation removes
only its own publications beyond the newest KEEP. Corrupt, partial or mismatched objects are
skipped with a warning, never loaded.

What runs blind otherwise is said at start and in the metrics: a location that was empty (a mistyped
exchange_dir: this job would train alone), jobs with another n_models (refused), a second job
publishing the same model (`storage/conflicts`), a peer that never published, and each teacher's age.

Within a job, the first rank reads the files and broadcasts the teachers that changed to the other
replicas, so every worker of a model holds identical teachers.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn as nn

from .accounting import CommCounter
from .errors import UserError
from .exchange import Teachers, sync_buffers
from .exchange_store import Store, describe_failure
from .flat import FlatState
from .publish_check import check_finite_before_publishing
from .topology import Topology

KEEP = 3  # publications each incarnation keeps, so a reader never races the removal of the one it chose
FORMAT = 1


def warn(message: str) -> None:
    print(f"codistill: warning: {message}", file=sys.stderr, flush=True)


def new_incarnation() -> str:
    """Unique per process start: UTC start time (readable order) and a random suffix."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


class StorageExchanger:
    def __init__(self, model: nn.Module, teachers: Teachers, topo: Topology, every: int,
                 directory, counter: CommCounter | None = None):
        if every <= 0:
            raise ValueError(f"exchange period must be > 0, got {every}")
        self.model, self.teachers, self.topo = model, teachers, topo
        self.model_index, self.every = topo.model_index, every
        self.location = str(directory)
        self.counter = counter if counter is not None else CommCounter()
        self.send = FlatState(model)
        self.blocked_seconds = 0.0  # time the training loop spent here (the storage wait per step)
        self.loaded: dict[int, str] = {}  # object each teacher holds
        self.received_at: dict[int, float] = {}  # monotonic time each teacher's weights arrived
        self.publications = self.skipped = self.conflicts = 0
        self.incarnation = new_incarnation()
        self.store = self.run = None
        self._round: Future | None = None
        self._arrived: dict[int, tuple[dict, dict, float]] = {}  # j -> (pointer, state, time); under _lock
        self._lock = threading.Lock()
        self._bad: set[str] = set()  # objects already warned about
        self._warned: set[str] = set()
        self._published: deque[str] = deque()  # this incarnation's objects, oldest first
        self._last_pointer: str | None = None
        self._pointer_at_start: str | None = None  # the object our model's pointer named when we joined
        if topo.is_model_leader:  # only the first rank touches storage
            self.store = Store(self.location)
            self.run = self._join_run()
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-storage")

    # -- start: which run, and is anyone else publishing this model? ------------------------------------

    def _join_run(self) -> str:
        n = self.topo.n_models
        try:
            if not self.store.existed():
                warn(f"codistill.exchange_dir {self.location} was empty: this job (model {self.model_index}) is "
                     f"the first of its run; its {n - 1} peer group(s) must name this same location, or it trains "
                     "alone (teacher ages in the metrics stay empty)")
            mine = {"format": FORMAT, "run": uuid.uuid4().hex[:12], "n_models": n, "created": time.time()}
            self.store.create("run.json", json.dumps(mine).encode())
            run = json.loads(self.store.get("run.json") or b"{}")
            pointer = self._pointer(self.model_index)
        except UserError:
            raise
        except (OSError, ValueError) as e:
            raise UserError(describe_failure(self.location, e)) from None
        if run.get("n_models") != n:
            raise UserError(f"codistill.exchange_dir {self.location} belongs to a run of n_models="
                            f"{run.get('n_models')}; this job has codistill.n_models={n}: give every group the same "
                            "n_models, or use another exchange_dir")
        self._pointer_at_start = pointer.get("object") if pointer is not None else None
        if pointer is not None and pointer.get("run") == run["run"]:
            ago = time.time() - float(pointer.get("time", 0))
            warn(f"model {self.model_index} already has publications in {self.location} (step {pointer.get('step')}, "
                 f"{ago:.0f} s ago, incarnation {pointer.get('incarnation')}): fine for a group restarted after a "
                 f"failure; if that job still runs, two jobs claim codistill.model_index={self.model_index}")
        return run["run"]

    def _pointer(self, j: int) -> dict | None:
        data = self.store.get(f"model_{j}/latest.json")
        if data is None:
            return None
        try:
            pointer = json.loads(data)
            if not isinstance(pointer, dict) or not isinstance(pointer.get("object"), str):
                raise ValueError("not a pointer")
            return pointer
        except ValueError:
            self._warn_once(f"pointer:{j}", f"skipping model {j}'s pointer in {self.location}: not valid JSON")
            return None

    # -- the training loop's side: never waits on storage ----------------------------------------------

    def maybe_exchange(self, step: int) -> bool:
        t0 = time.perf_counter()
        try:
            changed: list[int] = []
            if self.topo.replicas == 1:  # nobody to agree with: swap in at any step boundary
                changed = self._swap_arrived()
            if step % self.every == 0:
                sync_buffers(self.model, self.topo, self.counter)
                # Every replica holds the same model: each checks its own, no collective.
                check_finite_before_publishing(list(self.model.state_dict().values()), self.topo, step,
                                               collective=False)
                if self.topo.is_model_leader:
                    if self.topo.replicas > 1:
                        changed = self._swap_arrived()
                    self._start_round(step)
                self._share_teachers(changed)
            return bool(changed)
        finally:
            self.blocked_seconds += time.perf_counter() - t0

    def _start_round(self, step: int) -> None:
        if self._round is not None:
            if not self._round.done():
                self.skipped += 1  # storage slower than T steps: skip, never block
                return
            self._round.result()  # re-raise what the round could not handle (a layout mismatch)
        self.send.pack(self.model)
        snapshot = self.send.state_dict()  # a CPU copy: training goes on changing the model
        self._round = self._pool.submit(self._exchange_round, step, snapshot, self.send.channels_last())

    def _swap_arrived(self) -> list[int]:
        if not self._arrived:  # the common case, every step: no lock taken
            return []
        with self._lock:
            arrived, self._arrived = self._arrived, {}
        for j, (pointer, state, when) in sorted(arrived.items()):
            flat = self.teachers.flats[j]
            layout = state.get("channels_last")
            if layout is not None and layout != flat.channels_last():
                # The flat buffers hold each weight in its writer's memory format.
                raise UserError(f"exchange object {pointer['object']} was written by a job with another memory "
                                "layout (model.channels_last differs): give every job the same model.channels_last")
            flat.load_state_dict(state["state"])
            self.teachers.mark_received(int(pointer["step"]), [j])
            self.loaded[j], self.received_at[j] = pointer["object"], when
            self.counter.exchange_received += flat.nbytes
        return sorted(arrived)

    def _share_teachers(self, changed: list[int]) -> None:
        """Replica 0's teachers that changed, to the other replicas (nothing for unchanged ones)."""
        if self.topo.replicas == 1:
            return
        src = self.topo.grid.rank(0, 0)
        device = next(iter(self.send.buffers.values())).device  # NCCL broadcasts device tensors only
        peers = list(self.teachers.flats)
        info = torch.tensor([[self.teachers.versions[j], j in changed] for j in peers], dtype=torch.int64,
                            device=device)
        dist.broadcast(info, src=src, group=self.topo.model_group)
        for j, (v, fresh) in zip(peers, info.tolist()):
            if fresh:
                self.teachers.mark_received(v, [j])
                for buf in self.teachers.flats[j].buffers.values():
                    dist.broadcast(buf, src=src, group=self.topo.model_group)

    def wait(self) -> None:
        """Complete the round in flight (before a checkpoint); swaps nothing in."""
        if self._round is not None:
            t0 = time.perf_counter()
            self._round.result()
            self.blocked_seconds += time.perf_counter() - t0

    def finish(self) -> None:
        """Complete the round in flight and swap in what it brought (at the end of training)."""
        self.wait()
        changed = self._swap_arrived() if self.topo.is_model_leader else []
        self._share_teachers(changed)

    # -- the background thread: publish, then fetch ------------------------------------------------------

    def _exchange_round(self, step: int, snapshot: dict, channels_last: list[bool]) -> None:
        try:
            self._publish(step, snapshot, channels_last)
            self._fetch(step)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - storage hiccups only make teachers staler; say so
            warn(f"exchange round at step {step} failed, teachers stay as they are: {describe_failure(self.location, e)}")

    def _publish(self, step: int, snapshot: dict, channels_last: list[bool]) -> None:
        # Another job publishes our model if the pointer is not ours after we published, or names
        # another object than when we joined (a restarted group's dead incarnation cannot publish).
        # Object names, not timestamps: two machines' clocks may disagree.
        current = self._pointer(self.model_index)
        if current is not None and current.get("incarnation") != self.incarnation and (
                self._last_pointer is not None or current.get("object") != self._pointer_at_start):
            self.conflicts += 1
            self._warn_once("conflict", f"another job (incarnation {current.get('incarnation')}) also publishes "
                            f"model {self.model_index} in {self.location}: two jobs claim codistill.model_index="
                            f"{self.model_index}, and each overwrites the other's pointer")
        name = f"{self.run}.{self.incarnation}.step_{step:08d}.pt"
        buf = io.BytesIO()
        torch.save({"step": step, "model": self.model_index, "run": self.run, "incarnation": self.incarnation,
                    "state": snapshot, "channels_last": channels_last}, buf)
        data = buf.getvalue()
        self.store.put(f"model_{self.model_index}/{name}", data)
        pointer = {"object": name, "sha256": hashlib.sha256(data).hexdigest(), "step": step, "run": self.run,
                   "incarnation": self.incarnation, "time": time.time(), "bytes": len(data)}
        self.store.put(f"model_{self.model_index}/latest.json", json.dumps(pointer).encode())
        self._last_pointer = name
        self.publications += 1
        self.counter.add_exchange(sent=self.send.nbytes, received=0)
        self._published.append(name)
        while len(self._published) > KEEP:
            self.store.delete(f"model_{self.model_index}/{self._published.popleft()}")

    def _fetch(self, step: int) -> None:
        for j, flat in self.teachers.flats.items():
            pointer = self._pointer(j)
            if pointer is None:
                if step >= 2 * self.every and j not in self.loaded:
                    self._warn_once(f"silent:{j}", f"no publication from model {j} in {self.location} after {step} "
                                    "steps of this job: is its job running, with the same codistill.exchange_dir?")
                continue
            name = pointer["object"]
            if pointer.get("run") != self.run:
                self._warn_once(f"run:{name}", f"skipping model {j}'s publication {name}: it belongs to another run")
                continue
            with self._lock:
                pending = self._arrived.get(j, ({},))[0].get("object")
            if name in (self.loaded.get(j), pending) or name in self._bad:
                continue  # nothing new: no download
            state = self._read(j, pointer, flat)
            if state is not None:
                with self._lock:
                    self._arrived[j] = (pointer, state, time.monotonic())

    def _read(self, j: int, pointer: dict, flat: FlatState) -> dict | None:
        name = pointer["object"]
        data = self.store.get(f"model_{j}/{name}")
        if data is None:
            return None  # removed by its publisher meanwhile: a newer pointer is there next round
        problem = None
        if hashlib.sha256(data).hexdigest() != pointer.get("sha256"):
            problem = "checksum mismatch (corrupt or truncated)"
        else:
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if {k: v.shape for k, v in state["state"].items()} != flat.shapes():
                    problem = "its state does not match this model's architecture"
                else:
                    return state
            except Exception as e:  # noqa: BLE001 - any unreadable object is skipped the same way
                problem = f"unreadable ({str(e).splitlines()[0][:120]})"
        self._bad.add(name)
        warn(f"skipping exchange object {self.location}/model_{j}/{name}: {problem}")
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    # -- what the logs and summary show --------------------------------------------------------------------

    def metrics(self, step: int) -> dict:
        """Per teacher: age in steps (since the step its weights are from) and in seconds (since they
        arrived here; this clock only, so no skew between machines); -1 before any arrived."""
        now = time.monotonic()
        out = {}
        for j, v in self.teachers.versions.items():
            out[f"teacher_age_steps/{j}"] = step - v if v >= 0 else -1
            out[f"teacher_age_s/{j}"] = round(now - self.received_at[j], 3) if j in self.received_at else -1
        out.update({"storage/publications": self.publications, "storage/skipped": self.skipped,
                    "storage/conflicts": self.conflicts})
        return out

    def state_dict(self) -> dict:
        return {**self.teachers.state_dict(), "pending_step": -1,
                "storage_objects": {str(j): name for j, name in self.loaded.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.teachers.load_state_dict(state)
        self.loaded = {int(j): name for j, name in state.get("storage_objects", {}).items()}
        self.received_at = {j: time.monotonic() for j in self.loaded}
