"""Checkpoints: the full run state, written atomically with checksums, loaded without unpickling code.

Layout in the run directory:

    checkpoints/step_000100/model_0.pt   model, optimizer, teachers + their age, initial parameters
                                         (written by the first rank of model group 0, and so on)
    checkpoints/step_000100/rank_3.pt    that rank's RNG states and byte counters
    checkpoints/latest.json              {"step": 100, "dir": "step_000100", "sha256": {file: hex}}

Files are written to a temporary name, fsynced and renamed; `latest.json` is replaced only after
every file of the step is complete, so a crash at any point leaves the previous checkpoint intact.
Loading verifies each file's SHA-256 and uses `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .run_log import atomic_write_text

KEEP = 2  # checkpoints kept on disk; older ones are removed once a newer one is complete


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_file(obj, path: Path) -> str:
    """torch.save atomically; returns the SHA-256 of the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def load_file(path: Path, expected_sha256: str | None = None):
    """Verify and load one checkpoint file (tensors and plain containers only)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(f"cannot load checkpoint file {path}: {str(e).splitlines()[0]}") from None


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:06d}"


MANIFEST_FIELDS = {"step": int, "dir": str, "world_size": int, "sha256": dict}
# model_0.pt / rank_3.pt; a sharded run's DCP files: model_0/.metadata, model_0/__1_0.distcp
FILE_NAME = re.compile(r"(model|rank)_\d+\.pt|model_\d+/(\.metadata|__\d+_\d+\.distcp)")
STEP_DIR = re.compile(r"step_\d+")


def read_latest(run_dir: Path) -> dict | None:
    """The manifest of the newest complete checkpoint, or None if the run has none; every field is
    checked here, so a damaged manifest is one error naming the field, not a crash in a worker."""
    path = run_dir / "checkpoints" / "latest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: not a JSON object")
    for key, tp in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if key not in manifest:
            raise CheckpointError(f"checkpoint manifest {path} is corrupt: field {key!r} is missing")
        if not isinstance(value, tp) or isinstance(value, bool):
            raise CheckpointError(f"checkpoint manifest {path} is corrupt: field {key!r} must be "
                                  f"{tp.__name__}, got {value!r}")
    if manifest["step"] < 0 or manifest["world_size"] <= 0 or manifest["dir"] != step_dir(run_dir, manifest["step"]).name:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: step {manifest['step']}, "
                              f"dir {manifest['dir']!r}, world_size {manifest['world_size']} do not fit together")
    for name, digest in manifest["sha256"].items():
        if not FILE_NAME.fullmatch(name) or not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            raise CheckpointError(f"checkpoint manifest {path} is corrupt: bad sha256 entry {name!r}: {digest!r}")
    return manifest


def commit(run_dir: Path, step: int, hashes: dict[str, str], world_size: int) -> None:
    """Publish a complete checkpoint (after every file is written) and prune old ones."""
    manifest = {"step": step, "dir": step_dir(run_dir, step).name, "world_size": world_size, "sha256": hashes}
    atomic_write_text(run_dir / "checkpoints" / "latest.json", json.dumps(manifest, indent=2) + "\n")
    # By step number, not by name: from step 1,000,000 on `step_{:06d}` grows a digit and
    # "step_1000000" sorts before "step_999500" as text.
    dirs = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name)),
                  key=lambda p: int(p.name[len("step_"):]))
    for old in dirs[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load_entry(run_dir: Path, manifest: dict, name: str):
    if name not in manifest["sha256"]:
        raise CheckpointError(f"checkpoint {manifest['dir']} has no {name} "
                              "(was it written by a different number of workers or models?)")
    return load_file(run_dir / "checkpoints" / manifest["dir"] / name, manifest["sha256"][name])


def verify_entry(run_dir: Path, manifest: dict, name: str) -> None:
    """Check one file of a checkpoint: a torch file is loaded (weights_only); a sharded run's DCP
    file (sharded_checkpoint.py) is checked against its SHA-256."""
    if name.endswith(".pt"):
        load_entry(run_dir, manifest, name)
        return
    path = run_dir / "checkpoints" / manifest["dir"] / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if sha256_file(path) != manifest["sha256"][name]:
        raise CheckpointError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")


def latest_model_states(run_dir: Path) -> dict[str, dict]:
    """{"model_0.pt": state, ...} of the run's newest checkpoint, each file checked against its
    sha256 (for comparing runs: bitwise resume checks, the GPU check)."""
    manifest = read_latest(Path(run_dir))
    if manifest is None:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    return {name: load_entry(Path(run_dir), manifest, name) for name in sorted(manifest["sha256"])
            if name.startswith("model_") and name.endswith(".pt")}


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_run_state(run_dir: Path, step: int, model_file: str, model_state: dict | None, rank: int,
                   rank_state: dict, world_size: int) -> None:
    """Write one rank's part of the checkpoint at `step`, then publish it once every rank has.

    Collective: every rank calls it. model_state is None on ranks that do not write their model's
    file (all but a model's first rank); rank_state is this rank's own (RNG, counters).
    """
    import torch.distributed as dist

    directory = step_dir(run_dir, step)
    hashes = {}
    if model_state is not None:
        hashes[model_file] = save_file(model_state, directory / model_file)
    hashes[f"rank_{rank}.pt"] = save_file(rank_state, directory / f"rank_{rank}.pt")
    everyone = [None] * world_size
    dist.all_gather_object(everyone, hashes)
    if rank == 0:
        commit(run_dir, step, {k: v for h in everyone for k, v in h.items()}, world_size)
    dist.barrier()


def load_run_state(run_dir: Path, model_file: str, rank: int, world_size: int) -> tuple[dict, dict]:
    """(model state, this rank's state) of the newest complete checkpoint, verified."""
    manifest = read_latest(run_dir)
    if manifest is None:
        raise CheckpointError(f"nothing to resume: {run_dir} has no checkpoint")
    if manifest.get("world_size", world_size) != world_size:
        raise CheckpointError(f"checkpoint was written by {manifest['world_size']} workers, this run has {world_size}")
    return load_entry(run_dir, manifest, model_file), load_entry(run_dir, manifest, f"rank_{rank}.pt")
