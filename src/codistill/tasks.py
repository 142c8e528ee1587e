"""What the trainer trains on: data, model construction, forward pass and evaluation.

The trainer only sees the `Task` protocol, so a new kind of workload plugs in without touching the
loop. A dataset names the task that trains on it when it is registered:

    register_dataset("bible_en_es", load_bible, task=TranslationTask)   # codistill/translation

Datasets registered without a task (the image datasets in `codistill.data`) are classification's.
A task package registers its datasets when imported, and is imported below: a new task adds its
`register_dataset(...)` calls to its package and one import line here.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

from . import lm, translation  # noqa: F401  (the task packages: each registers its datasets)
from .config import Config
from .data import (ShardBatchSampler, check_splits, eval_batches, load_dataset, make_loader, make_splits,
                   model_indices, registered)
from .errors import ConfigError
from .evaluation import eval_subset, evaluate
from .models import MODELS, build_model, check_model_options
from .topology import Topology, job_topology


@runtime_checkable
class Task(Protocol):
    """The trainer's view of a workload. Targets use `codistill.losses.IGNORE_INDEX` for positions
    that no loss or metric scores (padding). A class attribute `model_kind` (optional) names the
    kind of model it trains (`codistill.models.KINDS`), checked before launch."""

    def __init__(self, cfg: Config, device: torch.device, run_dir=None) -> None: ...

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """Before any worker starts or the run directory is touched: open the data, raise
        ConfigError / DataError on what would fail later (e.g. a batch larger than the data)."""

    @classmethod
    def prepare(cls, cfg: Config, run_dir) -> None:
        """Once per run, on one process, before the workers build their tasks (e.g. train a
        tokenizer into the run directory)."""

    def build_model(self, name: str) -> nn.Module: ...

    def steps_per_epoch(self, topo: Topology) -> int:
        """Steps for this worker's model to pass over its training data, without loading batches."""

    def train_batches(self, topo: Topology, seed: int, start_step: int = 0) -> tuple[Iterator, int]:
        """(this worker's batches from global step `start_step` on, forever; steps per epoch)."""

    def forward(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), targets (N,)) of one batch; also the teachers' forward (under no_grad)."""

    def evaluate(self, model: nn.Module, split: str, topo: Topology) -> dict:
        """`codistill.evaluation.evaluate`'s metrics (plus the task's own) on "val" or "test";
        identical on all ranks."""

    # Optional: `write_extras(model, topo)`, called on every rank after the run's summary is
    # written, for outputs a run can do without (the LM's sample); none runs collectives (a
    # sharded model arrives gathered on every worker of its group, so one worker may use it alone).
    # Optional: `check_resume(cfg, run_dir)` (classmethod), before a run is resumed: refuse data
    # that no longer matches what the run trained on.


class ClassificationTask:
    """Image (or any fixed-size input) classification from a registered dataset."""

    model_kind = "classifier"  # what its models read (codistill.models.KINDS)

    def __init__(self, cfg: Config, device: torch.device, run_dir=None):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        data = load_dataset(cfg.data.name, cfg.data.root)
        self.splits = make_splits(data, cfg.data.val_fraction, cfg.data.fraction)

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """The splits agree, a batch fits in the data, and every model takes model.options and
        gives (N, classes) logits (built on the meta device: no memory, no compute)."""
        task = cls(cfg, torch.device("cpu"))
        sp = task.splits
        check_splits(cfg.data.name, sp, cfg.data.fraction, cfg.data.val_fraction)
        task.steps_per_epoch(job_topology(cfg, world_size))  # ConfigError when a batch exceeds the data
        check_model_options(cfg.model_names(), sp.num_classes, sp.input_shape, (2, *sp.input_shape),
                            cfg.model.options)

    @classmethod
    def prepare(cls, cfg: Config, run_dir) -> None:
        """Nothing to prepare for classification."""

    def build_model(self, name: str) -> nn.Module:
        sp = self.splits
        model = build_model(name, sp.num_classes, sp.input_shape, **self.cfg.model.options).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    @property
    def channels_last(self) -> bool:
        return self.cfg.model.channels_last and len(self.splits.input_shape) == 3

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sampler(self, topo: Topology, seed: int) -> ShardBatchSampler:
        d = self.cfg.data
        indices = model_indices(self.splits.train_indices, d.split, topo.model_index, topo.n_models,
                                self.cfg.train.seed)
        return ShardBatchSampler(indices, d.batch_size, topo.replicas, topo.replica_index, seed)

    def steps_per_epoch(self, topo: Topology) -> int:
        return self.sampler(topo, self.cfg.train.seed).steps_per_epoch  # arithmetic on the index count

    def train_batches(self, topo: Topology, seed: int, start_step: int = 0):
        sampler = self.sampler(topo, seed)
        sampler.set_start_step(start_step)
        # Augmentation seeded by the model's seed, the replica and the step (make_loader).
        loader = make_loader(self.splits.train, sampler, self.cfg.data.num_workers,
                             pin_memory=self.device.type == "cuda", seed=seed, replica=topo.replica_index,
                             start=start_step)
        return iter(loader), sampler.steps_per_epoch

    def forward(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return module(self.inputs(x)), y.to(self.device, non_blocking=True)

    def evaluate(self, model: nn.Module, split: str, topo: Topology) -> dict:
        sp, d = self.splits, self.cfg.data
        dataset, indices = (sp.val, sp.val_indices) if split == "val" else (sp.test, sp.test_indices)
        if split == "val":
            indices = eval_subset(indices, self.cfg.eval.max_samples)
        # Through the training loader: in-memory data in one indexing op per batch, image files
        # decoded by data.num_workers processes.
        shard = eval_batches(indices, d.eval_batch_size, topo.replicas, topo.replica_index)
        return evaluate(model, make_loader(dataset, shard, d.num_workers), self.forward, topo, self.device,
                        self.cfg.eval.topk)


def check_names(cfg: Config) -> None:
    """The dataset and every model are registered (a ConfigError naming the allowed ones). Here, not
    in config.py: config is the bottom layer, and the registries are filled by the layers above it
    (models/, data/, and the task packages imported at the top of this file)."""
    registered(cfg.data.name)
    for name in cfg.model_names():
        if name not in MODELS:
            raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")


def task_class(cfg: Config) -> type[Task]:
    """The task registered with the config's dataset (classification when none is)."""
    return registered(cfg.data.name).task or ClassificationTask


def make_task(cfg: Config, device: torch.device, run_dir=None) -> Task:
    return task_class(cfg)(cfg, device, run_dir)


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Optimizer steps for one model to pass over its training data, computed outside any process
    group (loads the data, starts no DataLoader; raises ConfigError when a batch is larger than the data)."""
    batches = make_task(cfg, torch.device("cpu")).steps_per_epoch(job_topology(cfg, world_size))
    return optimizer_steps_per_epoch(batches, cfg.train.accumulate)


def optimizer_steps_per_epoch(batches_per_epoch: int, accumulate: int) -> int:
    """Optimizer steps in one pass over a model's data of `batches_per_epoch` micro-batches, with
    `accumulate` (train.accumulate) micro-batches per step."""
    if batches_per_epoch < accumulate:
        raise ConfigError(f"train.accumulate={accumulate} micro-batches per step exceed the "
                          f"{batches_per_epoch} batches of an epoch; lower it or data.batch_size")
    return batches_per_epoch // accumulate
