"""scikit-learn's digits: 1,797 real 8x8 images shipped with scikit-learn, no download.

Tiny and fast: the tests' default. It has no official test split; the trainer carves one.
"""

from __future__ import annotations

import torch

from .base import DatasetSplits, TensorData
from .registry import register_dataset


@register_dataset("digits", takes_root=False)
def digits(root: str | None) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to roughly zero mean, unit variance.
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1).sub_(4.88).div_(6.02)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return DatasetSplits(TensorData(x, y), y, None, 10, (1, 8, 8))
