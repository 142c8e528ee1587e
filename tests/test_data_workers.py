"""Random augmentation in DataLoader workers: seeded by the model's seed, the replica and the step.

Every image file holds the same pixels, so two batches differ only if their augmentation (random
resized crop, flip) does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codistill.config import load_config
from codistill.data import imagefolder
from codistill.tasks import make_task
from codistill.topology import Grid, Topology, model_seed

pytestmark = pytest.mark.timeout(300)


def write_identical_images(root: Path, per_class: int = 8, size=(24, 20)) -> None:
    """root/{train,val}/{a,b}/<i>.png, every file the same textured image."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(pixels).save(folder / f"{i}.png")


def first_batches(tmp_path, workers: int, rank: int, steps: int = 3, start: int = 0) -> list[torch.Tensor]:
    """Inputs of the first `steps` batches (from step `start`) of grid rank `rank` (2 models x 2 replicas)."""
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}", f"data.num_workers={workers}",
                             "data.batch_size=2", "data.val_fraction=0", "model.name=cnn_tiny"])
    topo = Topology(Grid(4, 2), rank, None, None)
    batches, _ = make_task(cfg, torch.device("cpu")).train_batches(
        topo, model_seed(cfg.train.seed, topo.model_index), start_step=start)
    return [next(batches)[0] for _ in range(steps)]


@pytest.fixture
def identical_images(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder, "IMAGE_SIZE", 16)
    monkeypatch.setattr(imagefolder, "RESIZE_SIZE", 18)
    write_identical_images(tmp_path)
    return tmp_path


def test_replicas_and_models_draw_their_own_augmentations_in_workers(identical_images):
    ranks = [first_batches(identical_images, 2, rank) for rank in range(4)]  # (model, replica): 00 01 10 11
    for a in range(4):
        for b in range(a + 1, 4):
            assert not any(torch.equal(x, y) for x, y in zip(ranks[a], ranks[b])), (a, b)
    # The draws are a function of the position, not of which process fetched the batch.
    for x, y in zip(ranks[1], first_batches(identical_images, 0, rank=1)):
        assert torch.equal(x, y)


def test_a_resumed_stream_continues_the_augmentations(identical_images):
    whole = first_batches(identical_images, 2, rank=3, steps=6)  # 16 images, 2 replicas: 4 steps an epoch
    resumed = first_batches(identical_images, 2, rank=3, steps=3, start=3)  # mid-epoch, across its end
    for x, y in zip(whole[3:], resumed):
        assert torch.equal(x, y)


def _stop_and_resume(rank: int, world: int, root: str, out: str) -> None:
    """Train 7 steps into out/whole; then into out/stopped, stopped at step 5 (the checkpoint is at
    4, mid-epoch) and resumed from it by a new Trainer, as `codistill train --resume` does."""
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    import multiprocessing

    imagefolder.IMAGE_SIZE, imagefolder.RESIZE_SIZE = 16, 18  # this is a fresh (spawned) process
    # A spawned process spawns its DataLoader workers too (each importing torch: minutes on a busy
    # machine); forked, they start at once. The batches do not depend on it (seeded per batch).
    multiprocessing.set_start_method("fork", force=True)
    # 8 images, 2 per step: 4 steps an epoch; dropout draws from the training RNG.
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={root}", "data.num_workers=2",
                             "data.batch_size=2", "data.val_fraction=0", "model.name=cnn_tiny",
                             "model.options={dropout: 0.2}", "codistill.n_models=1", "train.steps=7",
                             "train.checkpoint_every=4", "train.eval_every=100", "train.progress=false",
                             "dist.threads=1"])
    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    Trainer(cfg, ctx, Path(out) / "whole").fit()
    stopped = Trainer(cfg, ctx, Path(out) / "stopped")
    stopped.fault = ("raise", rank, 5)  # every rank stops after step 5
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        stopped.fit()
    Trainer(cfg, ctx, Path(out) / "stopped", resume=True).fit()


def test_a_run_with_workers_resumed_mid_epoch_ends_bitwise_equal(tmp_path):
    from codistill.checkpoint import latest_model_states
    from mp_helpers import run_workers

    write_identical_images(tmp_path / "images", per_class=4)
    # One worker process (its two DataLoader workers): replicas have their own test above.
    run_workers(_stop_and_resume, 1, tmp_path, (str(tmp_path / "images"), str(tmp_path)), timeout=280)
    a, b = latest_model_states(tmp_path / "whole"), latest_model_states(tmp_path / "stopped")
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["steps"] == 7
    for key, tensor in a["model_0.pt"]["model"].items():
        assert torch.equal(tensor, b["model_0.pt"]["model"][key]), key
