"""Datasets (a registry by name), splits and per-model sharded sampling."""

from . import cifar, digits, idx, imagefolder  # noqa: F401  (explicit imports fill the registry)
from .base import DatasetSplits, TensorData
from .registry import DATASETS, load_dataset, register_dataset, registered
from .sampling import ShardBatchSampler, eval_batches, make_loader, shuffle_and_deal
from .splits import Splits, balanced_split, check_splits, make_splits, model_indices

__all__ = [
    "DATASETS", "DatasetSplits", "ShardBatchSampler", "Splits", "TensorData", "balanced_split", "check_splits",
    "eval_batches", "load_dataset", "make_loader", "make_splits", "model_indices", "register_dataset",
    "registered", "shuffle_and_deal",
]
