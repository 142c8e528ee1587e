"""`codistill export RUN_DIR`: a trained model, or the ensemble, as plain weights for use without
codistill's trainer.

The file is safetensors: the model's state dict (an ensemble: model i's under `i.`), and in its
metadata, under "codistill", JSON saying how to build each model:

    {"ensemble": false, "models": [{"index": 0, "name": "gpt_tiny", "num_classes": 2000,
                                    "input_shape": [], "options": {...}}]}

so that `codistill.models.build_model(name, num_classes, input_shape, **options)` followed by
`load_state_dict(weights, strict=True)` gives the model (`load_exported` does both). The ensemble
is `Ensemble`: the log of the models' mean probability, the mixture the run's ensemble metrics
score. Works from DDP checkpoints (model_i.pt, DDP's `module.` prefix dropped) and from sharded ones
(DCP, read in one process: DCP keeps whole tensors' layout, so no process group is needed).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_entry, read_latest, verify_entry
from .errors import UserError
from .models import build_model


class Ensemble(nn.Module):
    """log of the mean of the models' probabilities (softmax of it is that mean)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, *inputs) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(*inputs).float(), dim=-1) for m in self.models])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.models))


def model_spec(task, name: str, options: dict, index: int) -> dict:
    """What build_model needs for model `name` of a task: classes, input shape, options."""
    if hasattr(task, "splits"):  # image and vector classification
        num_classes, shape = task.splits.num_classes, list(task.splits.input_shape)
    else:  # language model / translation: the tokenizer's vocabulary
        num_classes, shape = task.tokenizer.vocab_size, []
        if hasattr(task.tokenizer, "pad_id") and type(task).__name__.startswith("Translation"):
            options = {"pad_idx": task.tokenizer.pad_id, **options}
    return {"index": index, "name": name, "num_classes": num_classes, "input_shape": shape, "options": options}


def build(spec: dict) -> nn.Module:
    return build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["options"])


def checkpoint_weights(run_dir: Path, manifest: dict, spec: dict) -> dict[str, torch.Tensor]:
    """Model `spec["index"]`'s whole weights from the run's newest checkpoint, verified."""
    i = spec["index"]
    if f"model_{i}.pt" in manifest["sha256"]:
        state = load_entry(run_dir, manifest, f"model_{i}.pt")["model"]
        return {k.removeprefix("module."): v for k, v in state.items()}
    files = {k: v for k, v in manifest["sha256"].items() if k.startswith(f"model_{i}/")}
    if not files:
        raise CheckpointError(f"checkpoint {manifest['dir']} has no model {i}")
    directory = run_dir / "checkpoints" / manifest["dir"]
    for file in files:
        verify_entry(run_dir, manifest, file)
    import torch.distributed.checkpoint as dcp

    state = {"model": build(spec).state_dict()}  # the template DCP fills, whole tensors
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": as intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=directory / f"model_{i}", no_dist=True)
    return state["model"]


def export(run_dir: str | Path, model: int | None = None, ensemble: bool = False, out: str | Path | None = None) -> Path:
    """Write model `model` (default 0) or the ensemble of all models; returns the file written."""
    from safetensors.torch import save_file

    from .config import load_config
    from .tasks import make_task

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"cannot export {run_dir}: no config.yaml (not a codistill run directory?)")
    cfg = load_config(run_dir / "config.yaml")
    manifest = read_latest(run_dir)
    if manifest is None:
        raise UserError(f"cannot export {run_dir}: it has no checkpoint")
    n = cfg.codistill.n_models
    if model is not None and not 0 <= model < n:
        raise UserError(f"--model must be in 0..{n - 1}, got {model}")
    indices = list(range(n)) if ensemble else [model or 0]
    out = Path(out) if out else run_dir / "export" / ("ensemble.safetensors" if ensemble else f"model_{indices[0]}.safetensors")
    task = make_task(cfg, torch.device("cpu"), run_dir)
    names = cfg.model_names()
    specs = [model_spec(task, names[i], dict(cfg.model.options), i) for i in indices]
    tensors = {}
    for spec in specs:
        weights = checkpoint_weights(run_dir, manifest, spec)
        build(spec).load_state_dict(weights, strict=True)  # refuse to write what would not load
        prefix = f"{spec['index']}." if ensemble else ""
        tensors.update({prefix + k: v.detach().contiguous().cpu() for k, v in weights.items()})
    meta = {"codistill": json.dumps({"ensemble": ensemble, "models": specs, "step": manifest["step"]})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(_untied(tensors), str(tmp), metadata=meta)
    os.replace(tmp, out)  # whole or not at all
    return out


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two names for one storage (tied weights): give each its own copy."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def load_exported(path: str | Path) -> nn.Module:
    """The exported model (or Ensemble), built with build_model and loaded strictly, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["codistill"])
    weights = load_file(str(path))
    models = []
    for spec in meta["models"]:
        module = build(spec)
        prefix = f"{spec['index']}." if meta["ensemble"] else ""
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
        models.append(module)
    return (Ensemble(models) if meta["ensemble"] else models[0]).eval()
