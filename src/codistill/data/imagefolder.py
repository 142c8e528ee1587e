"""Image files in class folders (torchvision's ImageFolder layout), e.g. ImageNet:

    root/train/<class>/<image>.JPEG
    root/val/<class>/<image>.JPEG       (the same class folders; ImageNet's official validation set)

Images are decoded from disk one at a time, in DataLoader worker processes (`data.num_workers`, for
training and evaluation alike):
the dataset has no in-memory `inputs`, so `make_loader` uses the default per-example fetch and
collate. Train images get the standard ImageNet augmentation (RandomResizedCrop + horizontal flip);
the `val/` folder (our test split) is resized and center-cropped.

A validation split carved from train/ (`data.val_fraction` > 0) reads the same files with the eval
transform. The paper reports ImageNet's val/ folder; `data.val_fraction: 0` evaluates on it.

`IMAGE_SIZE` and `RESIZE_SIZE` set the crop and the eval resize (224 and 256 for ImageNet); change
them before loading for smaller images.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import DataError
from .base import DatasetSplits
from .registry import register_dataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # side of the (random or center) crop fed to the model
RESIZE_SIZE = 256  # eval: shorter side resized to this, then center-cropped to IMAGE_SIZE


def train_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size: int, resize: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _folder(path: Path, transform):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"data directory not found: {path} (imagefolder needs data.root with train/ and val/)")
    try:
        return ImageFolder(str(path), transform=transform)
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"{path}: {e}") from None


@register_dataset("imagefolder")
def imagefolder(root: str | None) -> DatasetSplits:
    """ImageNet-style folders: root/train and root/val, one subfolder per class."""
    if root is None:
        raise DataError("imagefolder has no default location: data.root must hold train/ and val/ class folders")
    root_path = Path(root)
    train = _folder(root_path / "train", train_transform(IMAGE_SIZE))
    test = _folder(root_path / "val", eval_transform(IMAGE_SIZE, RESIZE_SIZE))
    if test.class_to_idx != train.class_to_idx:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise DataError(f"{root_path}: train/ and val/ have different class folders "
                        f"(only in one of them: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    targets = torch.tensor(train.targets, dtype=torch.long)
    # The validation split carved from train/ must not be augmented: same files, eval transform.
    train_eval = copy.copy(train)
    train_eval.transform = eval_transform(IMAGE_SIZE, RESIZE_SIZE)
    return DatasetSplits(train, targets, test, len(train.classes), (3, IMAGE_SIZE, IMAGE_SIZE), train_eval)
