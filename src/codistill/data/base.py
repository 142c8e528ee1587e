"""What every dataset provides, and the in-memory dataset most of them use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset


class TensorData(Dataset):
    """Examples held in memory as one tensor; a batch is fetched with one indexing operation.

    `inputs` may be stored compactly (uint8 images); `transform` turns a fetched batch into the
    model's input (e.g. scale and normalize), so memory stays small and per-batch work vectorized.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets, self.transform = inputs, targets.long(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices):
        """A whole batch at once (DataLoader calls this when it exists)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.inputs[idx]
        return (self.transform(x) if self.transform else x), self.targets[idx]


def normalize_uint8(mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (N, C, H, W) -> float32, scaled to [0, 1], then standardized."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255.0) - mean) / std

    return transform


@dataclass
class DatasetSplits:
    """A classification dataset as the trainer sees it.

    `train_targets` lets the trainer carve class-balanced subsets (validation, data fraction)
    without loading inputs. `test` is None for datasets without an official test split (the trainer
    then carves one). `train_eval` is the training set without augmentation: the validation split
    carved from the training set reads it (None: the training set has no augmentation).
    """

    train: Dataset
    train_targets: torch.Tensor
    test: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    train_eval: Dataset | None = None
