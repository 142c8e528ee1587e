"""What the trainer trains on: data, model construction, forward pass and evaluation.

The trainer only sees this interface, so a new kind of workload (translation, in
`codistill.translation`) plugs in without touching the loop:

    Task.prepare(cfg, run_dir)               once per run, before any worker builds the task
    task.build_model(name)                   -> nn.Module
    task.train_batches(topo, seed, start)    -> (iterator of batches, steps_per_epoch)
    task.forward(module, batch)              -> (logits (N, C), targets (N,)), padding = -100
                                                (also the teachers' forward, under no_grad)
    task.evaluate(model, split, topo)        -> {"models": [{"loss", "accuracy", ...}], "ensemble": {...},
                                                 "disagreement": float}
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config
from .data import ShardBatchSampler, load_dataset, make_loader, make_splits, model_indices
from .evaluation import evaluate
from .models import build_model
from .topology import Topology


class ClassificationTask:
    """Image (or any fixed-size input) classification from a registered dataset."""

    def __init__(self, cfg: Config, device: torch.device, run_dir=None):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        data = load_dataset(cfg.data.name, cfg.data.root)
        self.splits = make_splits(data, cfg.data.val_fraction, cfg.data.fraction)

    @classmethod
    def prepare(cls, cfg: Config, run_dir) -> None:
        """Once per run, on one process, before the workers build their tasks (e.g. train a
        tokenizer into the run directory). Nothing to do for classification."""

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

    def train_batches(self, topo: Topology, seed: int, start_step: int = 0):
        d = self.cfg.data
        indices = model_indices(self.splits.train_indices, d.split, topo.model_index, topo.n_models,
                                self.cfg.train.seed)
        sampler = ShardBatchSampler(indices, d.batch_size, topo.replicas, topo.replica_index, seed)
        sampler.set_start_step(start_step)
        return iter(make_loader(self.splits.train, sampler, d.num_workers)), sampler.steps_per_epoch

    def forward(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return module(self.inputs(x)), y.to(self.device, non_blocking=True)

    def evaluate(self, model: nn.Module, split: str, topo: Topology) -> dict:
        sp = self.splits
        dataset, indices = (sp.val, sp.val_indices) if split == "val" else (sp.test, sp.test_indices)
        d = self.cfg.data
        return evaluate(model, dataset, indices, topo, d.eval_batch_size, self.device, d.num_workers)


TASKS = {"classification": ClassificationTask}


def task_class(cfg: Config):
    """The task for a config's dataset: a dataset loader's `task` attribute names it."""
    from .data import DATASETS

    kind = getattr(DATASETS.get(cfg.data.name), "task", "classification")
    if kind not in TASKS:  # a task registers itself when its package is imported
        import importlib

        importlib.import_module(f"codistill.{kind}")
    return TASKS[kind]


def make_task(cfg: Config, device: torch.device, run_dir=None):
    return task_class(cfg)(cfg, device, run_dir)


def steps_per_epoch(cfg: Config, world_size: int) -> int:
    """Steps for one model to pass over its training data, computed outside any process group
    (loads the data; raises ConfigError when a batch is larger than the data)."""
    from .topology import job_grid

    c = cfg.codistill
    grid, first, total = job_grid(world_size, c.n_models, c.model_index if c.exchange == "storage" else None)
    topo = Topology(grid, rank=0, model_group=None, exchange_group=None, first_model=first, total_models=total)
    _, steps = make_task(cfg, torch.device("cpu")).train_batches(topo, cfg.train.seed)
    return steps
