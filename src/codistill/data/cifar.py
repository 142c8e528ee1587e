"""CIFAR-10 and CIFAR-100 in their official python format (Krizhevsky, 2009).

Format (https://www.cs.toronto.edu/~kriz/cifar.html): `cifar-10-batches-py/` holds pickled dicts
data_batch_1..5 and test_batch; `cifar-100-python/` holds train and test. Each dict has b"data",
a uint8 array (N, 3072) = 1024 red, 1024 green, 1024 blue values of a 32x32 image in row-major
order, and b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100), a list of N ints.

The files are pickles, and unpickling can run arbitrary code, so they are read with
`RestrictedUnpickler`, which resolves only the few numpy globals an array needs.

Training batches are augmented as in He et al. (2016): a random 32x32 crop of the image padded by
4 zero pixels, and a random horizontal flip. The validation split is carved from the training set
and reads it without augmentation (`DatasetSplits.train_eval`).
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import DataError
from .base import DatasetSplits, TensorData
from .registry import register_dataset

# Per-channel statistics of the CIFAR training sets (pixel values scaled to [0, 1]).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
PAD = 4  # augmentation: zero padding before the random crop


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes; any other codec is refused."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x pickles numpy._core; both load on either.
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0-4
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global raises `DataError`.

    The objects are looked up in a fixed table, never imported by name, so a malicious file cannot
    reach os.system, builtins.eval or anything else.
    """

    ALLOWED: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler.ALLOWED is None:
            RestrictedUnpickler.ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle global {module}.{name}: only numpy arrays are "
                            f"allowed in a CIFAR batch") from None


def read_batch(path: Path) -> dict:
    """One pickled CIFAR batch, with bytes keys (the files were written by Python 2)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e}") from None
    try:
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbled: pickle raises many types
        raise DataError(f"{path} is corrupt or not a CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _images_and_labels(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) int64 labels of one batch file, checked."""
    batch = read_batch(path)
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key, batch.get(label_key.decode()))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path} is not a CIFAR batch: needs a data array and {label_key.decode()}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: labels are not integers ({e})") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def normalize_channels(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (N, C, H, W) -> float32 in [0, 1], standardized per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def transform(x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255.0) - m) / s

    return transform


def crop_and_flip(x: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Random crop of the zero-padded images and random horizontal flip, one gather per batch.

    x: (N, C, H, W) -> (N, C, H, W); each image gets its own offset in [0, 2 * pad] and coin flip.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (N, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * pad + 1, (n, 1))
    left = torch.randint(0, 2 * pad + 1, (n, 1))
    rows = top + torch.arange(h)  # (N, H)
    cols = left + torch.arange(w)  # (N, W)
    flip = torch.rand(n, 1) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def _load_cifar(root: str | None, name: str, folder: str, train_files: list[str], test_file: str,
                label_key: bytes, num_classes: int, mean, std) -> DatasetSplits:
    if root is None:
        raise DataError(f"{name} has no default location: data.root must point at the extracted "
                        f"{folder} folder (from https://www.cs.toronto.edu/~kriz/cifar.html)")
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data directory not found: {path} (data.root must point at the extracted {folder} folder)")
    parts = [_images_and_labels(path / f, label_key, num_classes) for f in train_files]
    x_train = torch.from_numpy(np.concatenate([x for x, _ in parts]))  # (N, 3, 32, 32) uint8, a copy
    y_train = torch.from_numpy(np.concatenate([y for _, y in parts]))
    x_test, y_test = _images_and_labels(path / test_file, label_key, num_classes)
    normalize = normalize_channels(mean, std)

    def augment(x: torch.Tensor) -> torch.Tensor:
        return normalize(crop_and_flip(x))

    train = TensorData(x_train, y_train, augment)
    test = TensorData(torch.from_numpy(x_test.copy()), torch.from_numpy(y_test), normalize)
    train_eval = TensorData(x_train, y_train, normalize)  # same tensors, no augmentation
    return DatasetSplits(train, train.targets, test, num_classes, (3, 32, 32), train_eval)


@register_dataset("cifar10")
def cifar10(root: str | None) -> DatasetSplits:
    """CIFAR-10: 50,000 train + 10,000 test 32x32 colour images, 10 classes."""
    return _load_cifar(root, "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                       "test_batch", b"labels", 10, CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100")
def cifar100(root: str | None) -> DatasetSplits:
    """CIFAR-100: 50,000 train + 10,000 test 32x32 colour images, 100 (fine) classes."""
    return _load_cifar(root, "cifar100", "cifar-100-python", ["train"], "test",
                       b"fine_labels", 100, CIFAR100_MEAN, CIFAR100_STD)
