"""Starting workers and the default process group.

Two ways in:
- under `torchrun` (one node or many): every process runs the command itself, and the environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says who it is;
- standalone (`--nproc N`): `spawn` starts N local processes that meet through a `FileStore` on a
  file in the run directory (no ports are opened for rendezvous, and no path is parsed as a URL, so
  any character in --out is safe).
gloo on CPU, NCCL when CUDA is present (or as configured).

A launcher environment is all or nothing: RANK, WORLD_SIZE or LOCAL_RANK without the rest of
torchrun's variables (or without a torchrun agent) are leftovers from another launch, and are
refused before anything starts, with the variables to unset; so is a complete environment whose
torchrun store cannot be reached (`check_rendezvous`: left over from a launch that has ended).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
AGENT_VAR = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent for every process it starts
AGENT_STORE_VAR = "TORCHELASTIC_USE_AGENT_STORE"  # set by it too: True when it serves the store
RENDEZVOUS_PROBE_S = 5.0  # torchrun's store exists before its workers start: they reach it at once
INT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def launcher_env() -> dict[str, int] | None:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT as ints, or None when standalone.

    Raises UserError for a partial or inconsistent environment, which would otherwise make a
    standalone run wait for peers that never come (MASTER_ADDR/MASTER_PORT alone are harmless).
    """
    present = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v in os.environ]
    if not present:
        return None
    unset = "unset " + " ".join(v for v in TORCHRUN_VARS if v in os.environ)
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserError(f"partial launcher environment: {', '.join(present)} set but {', '.join(missing)} "
                        f"missing; to run standalone with --nproc: {unset}; or start with torchrun")
    if AGENT_VAR not in os.environ:
        raise UserError(f"{', '.join(present)} are set but no torchrun agent started this process "
                        f"({AGENT_VAR} unset): leftovers from another launch? To run standalone with "
                        f"--nproc: {unset}; or start with torchrun")
    values = {}
    for var in INT_VARS:
        try:
            values[var] = int(os.environ[var])
        except ValueError:
            raise UserError(f"launcher variable {var}={os.environ[var]!r} is not an integer") from None
    if not (values["WORLD_SIZE"] > 0 and 0 <= values["RANK"] < values["WORLD_SIZE"] and values["LOCAL_RANK"] >= 0
            and 0 < values["MASTER_PORT"] < 65536):
        raise UserError("inconsistent launcher environment: need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 and "
                        f"MASTER_PORT in 1..65535, got {', '.join(f'{k}={v}' for k, v in values.items())}")
    if AGENT_STORE_VAR not in os.environ:  # without it, rank 0 would host a store and wait for peers
        raise UserError(f"{', '.join(present)} and {AGENT_VAR} are set but not {AGENT_STORE_VAR}, which torchrun "
                        f"sets for every process it starts: leftovers from another launch? To run standalone "
                        f"with --nproc: {unset} {AGENT_VAR}; or start with torchrun")
    return values


def check_rendezvous() -> None:
    """Under torchrun, fail fast when its store cannot be reached.

    torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT before it starts any worker
    (TORCHELASTIC_USE_AGENT_STORE=True), so a worker that cannot connect at once is not one of its
    workers: its environment is left over from a launch that has ended (codistill called from a
    script that torchrun started, a shell that kept the variables), and the store connection would
    otherwise retry for dist.timeout_s (600 s). Where rank 0 hosts the store itself (agent store
    off), there is nothing to reach before it starts, and nothing is checked."""
    env = launcher_env()
    if env is None or os.environ.get(AGENT_STORE_VAR) != "True":
        return
    addr, port = os.environ["MASTER_ADDR"], env["MASTER_PORT"]
    try:
        socket.create_connection((addr, port), timeout=RENDEZVOUS_PROBE_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        unset = " ".join(v for v in (*TORCHRUN_VARS, AGENT_VAR, AGENT_STORE_VAR) if v in os.environ)
        raise UserError(f"torchrun's rendezvous at MASTER_ADDR:MASTER_PORT={addr}:{port} cannot be reached "
                        f"({reason}): leftovers of a torchrun launch that has ended? To run standalone with "
                        f"--nproc: unset {unset}; or start with torchrun") from None


def under_torchrun() -> bool:
    return launcher_env() is not None


def is_leader() -> bool:
    """The process that writes shared files and reports: rank 0 under torchrun, else this one."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def torchrun_world_size() -> int:
    return launcher_env()["WORLD_SIZE"]


def local_world_size(default: int = 1) -> int:
    """Workers on this machine: torchrun's LOCAL_WORLD_SIZE, else what the caller starts."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else default


def resolve_backend(backend: str = "auto", local_workers: int = 1, warn: bool = True) -> str:
    """gloo or nccl for `local_workers` processes on this machine.

    NCCL needs one GPU per process: two ranks on one GPU abort with "Duplicate GPU detected". So
    `auto` takes NCCL only when every local worker gets its own GPU and says why it falls back to
    gloo otherwise; an explicit `nccl` with too few GPUs is an error before anything starts.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        if gpus == 0:
            return "gloo"
        if local_workers > gpus:
            if warn:
                print(f"codistill: warning: {local_workers} local workers but {gpus} GPU(s): using gloo on the "
                      "CPU (NCCL needs one GPU per worker; start at most that many, e.g. --nproc "
                      f"{gpus}, or set dist.backend=gloo to silence this)", file=sys.stderr, flush=True)
            return "gloo"
        return "nccl"
    if backend == "nccl":
        if gpus == 0:
            raise UserError("dist.backend=nccl needs CUDA, and no GPU is visible; use gloo")
        if local_workers > gpus:
            raise UserError(f"dist.backend=nccl needs one GPU per worker: {local_workers} local workers, "
                            f"{gpus} GPU(s); start at most {gpus} per machine or use dist.backend=gloo")
    return backend


def configure_device(device: torch.device, deterministic: bool = False) -> None:
    """Per-process CUDA settings: cuDNN autotuning and TF32 matmuls for speed, or deterministic
    algorithms (bitwise-reproducible resume on GPU costs some speed) when asked."""
    if device.type != "cuda":
        if deterministic:
            torch.use_deterministic_algorithms(True)
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
        torch.use_deterministic_algorithms(True)


def init_distributed(backend: str = "auto", threads: int = 1, timeout_s: float = 600.0,
                     init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None, local_rank: int | None = None) -> DistContext:
    """Initialize the default process group (from torchrun's environment unless told otherwise)."""
    if init_method is None:
        env = launcher_env()
        if env is None:
            raise UserError("not under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset); "
                            "start this script with torchrun, e.g. torchrun --standalone --nproc-per-node 4 "
                            f"{os.path.basename(sys.argv[0]) or 'script.py'}")
        rank, world_size, local_rank = env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
    local_rank = rank if local_rank is None else local_rank
    backend = resolve_backend(backend, local_world_size(default=world_size), warn=local_rank == 0)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)  # resolve_backend checked one GPU per local rank
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads)  # several workers per machine: one thread each by default
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if init_method is None or isinstance(init_method, dist.Store):
            store = init_method or _attempt_store(rank, world_size, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's store, with keys private to this restart attempt and this initialization.

    After `torchrun --max-restarts` restarts the workers, the store still holds the gloo addresses
    the dead attempt published; without a per-attempt prefix the new workers read those and fail
    with "connectFullMesh ... Connection refused" (seen with torch 2.14). The same happens when one
    command initializes the process group more than once (`compare` runs one arm after another):
    every process counts its initializations in the same order, so the count is a shared prefix.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    global _initializations
    _initializations += 1
    return dist.PrefixStore(f"codistill/attempt_{attempt}/init_{_initializations}", store)


_initializations = 0  # process groups this process has created from torchrun's store


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


FAILURES = ".failures"  # per-rank failure records in the run directory, read by the parent
ERROR_LOG = "error.log"  # full tracebacks of failed workers, kept in the run directory


def _entry(local_rank: int, fn: Callable, nproc: int, run_dir: str, timeout_s: float, args: tuple,
           environ: dict | None = None) -> None:
    """Body of a spawned worker: a failure is recorded for the parent to report, never printed here
    (one line from the parent beats N tracebacks interleaved on the terminal)."""
    if environ is not None:  # forked from the fork server: take the caller's environment, as spawn does
        os.environ.clear()
        os.environ.update(environ)
    try:
        store = dist.FileStore(str(Path(run_dir) / ".rendezvous"), nproc)  # a plain path, not a URL
        store.set_timeout(timedelta(seconds=timeout_s))
        fn(local_rank, nproc, store, *args)
    except BaseException as e:  # noqa: BLE001 - every failure is reported by the parent
        _record_failure(Path(run_dir), local_rank, e)
        sys.exit(2 if isinstance(e, UserError) else 1)
    exit_skipping_teardown(0)


def exit_skipping_teardown(code: int) -> None:
    """End a worker process whose work is done and written, without the interpreter's teardown.

    Under load, gloo's C++ threads can still be winding down while Python finalizes, and the
    process then dies with SIGABRT ("terminate called without an active exception", seen in CI with
    torch 2.14) after a run that succeeded. The exit handlers still run (multiprocessing's
    unregisters its semaphores, or the parent's resource tracker warns about leaked ones); stdio is
    flushed. Only for processes that exist to run one job: never call it from a user's program.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _record_failure(run_dir: Path, rank: int, e: BaseException) -> None:
    from .faults import PeerError

    if isinstance(e, UserError):
        kind, message = ("peer" if isinstance(e, PeerError) else "user"), str(e)
    else:
        kind = "crash"
        first = (str(e).strip().splitlines() or [""])[0]
        message = f"rank {rank} failed: {type(e).__name__}{': ' + first if first else ''} " \
                  f"(traceback in {run_dir / ERROR_LOG})"
        text = f"--- rank {rank}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + "".join(traceback.format_exception(e))
        with open(run_dir / ERROR_LOG, "a") as f:  # one write per rank: lines of two ranks do not mix
            f.write(text)
    (run_dir / FAILURES).mkdir(exist_ok=True)
    record = {"rank": rank, "kind": kind, "time": time.time(), "message": message}
    (run_dir / FAILURES / f"rank_{rank}.json").write_text(json.dumps(record))


def first_failure(run_dir: Path, failed_rank: int) -> str | None:
    """The message of the failure that came first: a rank's own error before its peers' "lost
    connection" or timeout, which only follow from it; `failed_rank`, the rank the parent saw
    exit first, when it left no record (killed) and no rank raised an error of its own."""
    records = []
    for path in (run_dir / FAILURES).glob("rank_*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # killed while writing: the others tell the story
    own = sorted((r for r in records if r["kind"] != "peer"), key=lambda r: r["time"])
    if own:
        return own[0]["message"]
    if records and failed_rank in {r["rank"] for r in records}:
        return min(records, key=lambda r: r["time"])["message"]
    return None


# The test suite sets CODISTILL_START_METHOD=forkserver (tests/conftest.py): its workers are forked
# from one server per process that imported these once, where a spawned worker spends ~5 CPU-seconds
# importing torch and scikit-learn (most of a short test run on 2 cores). Users get spawn.
START_METHOD_ENV = "CODISTILL_START_METHOD"
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "codistill.trainer", "codistill.launch",
                      "sklearn.datasets"]  # the tests' digits; a module that is not installed is skipped


def _start_method() -> str:
    method = os.environ.get(START_METHOD_ENV, "spawn")
    if method not in ("spawn", "forkserver"):
        raise UserError(f"{START_METHOD_ENV} must be spawn or forkserver, not {method!r}")
    if method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    return method


def spawn(fn: Callable, nproc: int, rendezvous_dir: Path, args: tuple = (), threads: int = 1,
          timeout_s: float = 600.0) -> None:
    """Run fn(rank, world_size, store, *args) in `nproc` fresh local processes (`store` is the
    rendezvous, a dist.Store to pass to init_distributed as its init_method).

    If any worker fails, the others are stopped and the first real failure becomes a UserError (its
    traceback, for an unexpected exception, in `rendezvous_dir/error.log`).
    """
    run_dir = Path(rendezvous_dir).resolve()
    (run_dir / ".rendezvous").unlink(missing_ok=True)  # a stale file from a crashed run would break it
    shutil.rmtree(run_dir / FAILURES, ignore_errors=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # torch logs "Terminating process ... via signal SIGTERM" when it stops the survivors: noise
    # beside the one error line below.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    method = _start_method()
    environ = dict(os.environ) if method == "forkserver" else None
    try:
        mp.start_processes(_entry, args=(fn, nproc, str(run_dir), timeout_s, args, environ), nprocs=nproc,
                           start_method=method)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        message = first_failure(run_dir, e.error_index)
        if message is None:  # killed before it could say anything (kill -9, out of memory)
            code = getattr(e, "exit_code", None)
            how = f"signal {e.signal_name}" if getattr(e, "signal_name", None) else f"exit code {code}"
            message = f"worker {e.error_index} died ({how}); the run directory keeps what was written before"
        raise UserError(message) from None
    finally:
        (run_dir / ".rendezvous").unlink(missing_ok=True)
        shutil.rmtree(run_dir / FAILURES, ignore_errors=True)
