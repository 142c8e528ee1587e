"""MNIST-family datasets in the IDX format (gzipped or raw), e.g. Fashion-MNIST.

Format (http://yann.lecun.com/exdb/mnist/): big-endian header; magic = 0x00 0x00 <dtype> <ndim>,
then ndim u32 sizes, then the data. Images are u8 (N, 28, 28), labels u8 (N,).
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import DatasetSplits, TensorData, normalize_uint8
from .registry import register_dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, checking its header against its length. The (read-only) array is kept for
    the file's size and modification time: the suite resolves dozens of configs, each counting the
    training set, and decompressing Fashion-MNIST takes most of a second."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    return _read_idx(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path, size: int, mtime_ns: int) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} is corrupt: header says {shape} ({expected} bytes of data), "
                        f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
        if (root / name).exists():
            raise DataError(f"data file {root / name} is not a regular file")
    raise DataError(f"data file not found: {root / stem}[.gz]")


def load_idx_dataset(root: str | Path, mean: float, std: float) -> DatasetSplits:
    """train-/t10k- images and labels from `root`, as in the official MNIST distribution."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} is not a directory" if root.exists() else
                        f"data directory not found: {root}")
    splits = {}
    for split in ("train", "t10k"):
        images = read_idx(_find(root, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        if len(images) == 0:
            raise DataError(f"{root}: the {split} IDX files hold zero examples")
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8
        splits[split] = TensorData(x, torch.from_numpy(labels.astype(np.int64)), normalize_uint8(mean, std))
    train = splits["train"]
    num_classes = int(train.targets.max()) + 1
    return DatasetSplits(train, train.targets, splits["t10k"], num_classes, tuple(train.inputs.shape[1:]))


@register_dataset("fashion_mnist")
def fashion_mnist(root: str | None) -> DatasetSplits:
    """Fashion-MNIST (Zalando, MIT); default location: the Debian package dataset-fashion-mnist."""
    return load_idx_dataset(root or FASHION_MNIST_DIR, mean=0.2860, std=0.3530)


@register_dataset("mnist")
def mnist(root: str | None) -> DatasetSplits:
    """MNIST in IDX format; `data.root` must point at the files."""
    if root is None:
        raise DataError("mnist needs data.root: a directory with the IDX files")
    return load_idx_dataset(root, mean=0.1307, std=0.3081)
