"""Seeded, class-balanced index splits: validation carved from train, data fractions, and each
model's view of the training set (shared or disjoint)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .base import DatasetSplits

SPLIT_SEED = 1234  # fixed: the validation split must not move when the training seed changes


def balanced_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (taken, rest) with round(fraction * count) of every class taken."""
    g = torch.Generator().manual_seed(seed)
    taken, rest = [], []
    for c in torch.unique(targets):
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx)))
        taken.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(taken)).values, torch.sort(torch.cat(rest)).values


@dataclass
class Splits:
    """Index sets into the underlying datasets."""

    train: Dataset
    train_indices: torch.Tensor
    val: Dataset
    val_indices: torch.Tensor
    test: Dataset
    test_indices: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


def make_splits(ds: DatasetSplits, val_fraction: float, fraction: float = 1.0,
                test_fraction: float = 0.2) -> Splits:
    """Carve test (when the dataset has none), validation, then the training fraction."""
    all_idx = torch.arange(len(ds.train_targets))
    if ds.test is None:
        test_idx, all_idx = balanced_split(ds.train_targets, test_fraction, SPLIT_SEED)
        test = ds.train_eval or ds.train
    else:
        test, test_idx = ds.test, torch.arange(len(ds.test))
    targets = ds.train_targets[all_idx]
    if val_fraction > 0:
        v, t = balanced_split(targets, val_fraction, SPLIT_SEED + 1)
        val, val_idx, train_idx = ds.train_eval or ds.train, all_idx[v], all_idx[t]
    else:
        val, val_idx, train_idx = test, test_idx, all_idx
    if fraction < 1:
        keep, _ = balanced_split(ds.train_targets[train_idx], fraction, SPLIT_SEED + 2)
        train_idx = train_idx[keep]
    return Splits(ds.train, train_idx, val, val_idx, test, test_idx, ds.num_classes, ds.input_shape)


def model_indices(train_indices: torch.Tensor, split: str, model: int, n_models: int, seed: int) -> torch.Tensor:
    """The training examples model `model` iterates over.

    shared: all of them (each model shuffles them its own way, as in the paper).
    disjoint: a fixed 1/n of them (Anil et al.), the same partition for every seed of a run.
    """
    if split == "shared" or n_models == 1:
        return train_indices
    g = torch.Generator().manual_seed(seed)
    perm = train_indices[torch.randperm(len(train_indices), generator=g)]
    return torch.sort(perm[model::n_models]).values


def check_splits(name: str, sp: Splits, fraction: float, val_fraction: float) -> None:
    """Both splits of a dataset must agree: the test examples' shape and labels with training's.
    Raises DataError naming dataset `name`."""
    from ..errors import DataError

    if len(sp.train_indices) == 0 or len(sp.test_indices) == 0:
        raise DataError(f"data {name}: no {'training' if len(sp.train_indices) == 0 else 'test'} examples left "
                        f"(data.fraction={fraction}, data.val_fraction={val_fraction})")
    if sp.num_classes < 2:
        raise DataError(f"data {name}: the training split has {sp.num_classes} class(es); at least 2 are needed")
    for split, dataset, indices in (("training", sp.train, sp.train_indices), ("test", sp.test, sp.test_indices)):
        x, _ = dataset[int(indices[0])]
        if tuple(x.shape) != tuple(sp.input_shape):
            raise DataError(f"data {name}: {split} examples have shape {tuple(x.shape)}, "
                            f"the model expects {tuple(sp.input_shape)} (from the training split)")
        targets = getattr(dataset, "targets", None)
        if isinstance(targets, torch.Tensor) and len(targets):
            labels = targets[indices]
            if labels.min() < 0 or labels.max() >= sp.num_classes:
                raise DataError(f"data {name}: {split} labels range over {int(labels.min())}..{int(labels.max())}, "
                                f"outside the {sp.num_classes} classes of the training split")
