"""Datasets (a registry by name), splits and per-model sharded sampling."""

from . import cifar, digits, idx, imagefolder, parallel, text  # noqa: F401  (explicit imports fill the registry)
from .base import DatasetSplits, TensorData
from .registry import DATASETS, load_dataset, register_dataset
from .sampling import ShardBatchSampler, eval_batches, make_loader
from .splits import Splits, balanced_split, make_splits, model_indices

__all__ = [
    "DATASETS", "DatasetSplits", "ShardBatchSampler", "Splits", "TensorData", "balanced_split",
    "eval_batches", "load_dataset", "make_loader", "make_splits", "model_indices", "register_dataset",
]
