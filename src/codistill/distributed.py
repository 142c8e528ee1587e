"""Starting workers and the default process group.

Two ways in:
- under `torchrun` (one node or many): every process runs the command itself, and the environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says who it is;
- standalone (`--nproc N`): `spawn` starts N local processes that meet through a rendezvous file
  in the run directory (no ports are opened for rendezvous).
gloo on CPU, NCCL when CUDA is present (or as configured).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_leader() -> bool:
    """The process that writes shared files and reports: rank 0 under torchrun, else this one."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def torchrun_world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


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
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise UserError(f"not under torchrun (missing {', '.join(missing)}); launch with torchrun "
                            "or pass --nproc N to start local workers")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
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
        if init_method is None:
            dist.init_process_group(backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                                    world_size=world_size, timeout=timeout)
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


def _entry(local_rank: int, fn: Callable, nproc: int, init_file: str, args: tuple) -> None:
    """Body of a spawned worker: user errors print one line (from rank 0) and exit 2."""
    try:
        fn(local_rank, nproc, f"file://{init_file}", *args)
    except UserError as e:
        if local_rank == 0:
            print(f"codistill: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def spawn(fn: Callable, nproc: int, rendezvous_dir: Path, args: tuple = (), threads: int = 1) -> None:
    """Run fn(rank, world_size, init_method, *args) in `nproc` fresh local processes.

    If any worker fails, the others are stopped; a worker's user error exits this process with 2.
    """
    init_file = Path(rendezvous_dir).resolve() / ".rendezvous"  # file:// URLs need an absolute path
    init_file.unlink(missing_ok=True)  # a stale file from a crashed run would break the rendezvous
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        mp.start_processes(_entry, args=(fn, nproc, str(init_file), args), nprocs=nproc,
                           start_method="spawn")
    except mp.ProcessExitedException as e:
        if e.exit_code == 2:
            raise SystemExit(2) from None
        raise UserError(f"worker {e.error_index} died (exit code {e.exit_code}); "
                        "the run directory keeps what was written before") from None
    finally:
        init_file.unlink(missing_ok=True)
