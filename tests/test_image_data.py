"""Image dataset loaders on small files written in the official formats; splits on tiny targets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from codistill.data import (DATASETS, DatasetSplits, ShardBatchSampler, TensorData, balanced_split, cifar,
                            imagefolder, load_dataset, make_loader, make_splits)
from codistill.errors import DataError

pytestmark = pytest.mark.timeout(60)


N_BATCH = 6  # images per CIFAR batch file


# -- CIFAR ------------------------------------------------------------------------------------------

def _cifar_dict(n: int, label_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", label_key: [int(v) for v in rng.integers(0, num_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def write_cifar10(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, dict]:
    """cifar-10-batches-py: data_batch_1..5 and test_batch, pickled dicts of numpy arrays."""
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_dict(N_BATCH, b"labels", 10, seed=i)
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


def write_cifar100(root: Path) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    batches = {"train": _cifar_dict(20, b"fine_labels", 100, seed=0),
               "test": _cifar_dict(8, b"fine_labels", 100, seed=1)}
    for name, d in batches.items():
        d[b"coarse_labels"] = [v // 5 for v in d[b"fine_labels"]]
        (root / name).write_bytes(pickle.dumps(d))
    return batches


def _expected_images(data: np.ndarray, mean, std) -> torch.Tensor:
    """The official layout, pixel by pixel: data[n, c * 1024 + h * 32 + w] is channel c at (h, w)."""
    n = len(data)
    img = torch.empty(n, 3, 32, 32)
    for c in range(3):
        img[:, c] = torch.from_numpy(data[:, c * 1024:(c + 1) * 1024].reshape(n, 32, 32).astype(np.float32))
    return (img / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: Python 2 era (the real files), 5: out-of-band buffers
def test_cifar10_loads_official_format(tmp_path, protocol):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", protocol)
    ds = load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"))
    assert isinstance(ds, DatasetSplits)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    train_labels = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert ds.train_targets.dtype == torch.long and ds.train_targets.tolist() == train_labels
    assert ds.train.inputs.dtype == torch.uint8 and ds.train.inputs.shape == (5 * N_BATCH, 3, 32, 32)
    assert len(ds.test) == N_BATCH

    x, y = ds.test.__getitems__(list(range(N_BATCH)))
    assert x.dtype == torch.float32 and x.shape == (N_BATCH, 3, 32, 32)
    assert y.tolist() == batches["test_batch"][b"labels"]
    expected = _expected_images(batches["test_batch"][b"data"], cifar.CIFAR10_MEAN, cifar.CIFAR10_STD)
    torch.testing.assert_close(x, expected)

    x, y = ds.train.__getitems__([0, 7, 29])  # augmented, same shape and labels
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert y.tolist() == [train_labels[0], train_labels[7], train_labels[29]]


def test_cifar100_loads_fine_labels(tmp_path):
    batches = write_cifar100(tmp_path)
    ds = DATASETS["cifar100"].loader(str(tmp_path))
    assert ds.num_classes == 100 and ds.input_shape == (3, 32, 32)
    assert ds.train_targets.tolist() == batches["train"][b"fine_labels"]
    x, y = ds.test.__getitems__([0, 1])
    expected = _expected_images(batches["test"][b"data"][:2], cifar.CIFAR100_MEAN, cifar.CIFAR100_STD)
    torch.testing.assert_close(x, expected)
    assert y.tolist() == batches["test"][b"fine_labels"][:2]


def test_crop_and_flip_takes_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognizable
    out = cifar.crop_and_flip(x, pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        candidates = [(padded[i, :, t:t + 8, s:s + 8], False) for t in range(5) for s in range(5)]
        candidates += [(c.flip(-1), True) for c, _ in candidates]
        matches = [flip for c, flip in candidates if torch.equal(c, out[i])]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0]
    assert 0 < flips < len(x)  # both flipped and unflipped images occur (p = 1 - 2 * 2**-16)
    assert torch.equal(cifar.crop_and_flip(x[:1].expand(64, -1, -1, -1), pad=0).unique(dim=0).sort(0).values,
                       torch.stack([x[0], x[0].flip(-1)]).unique(dim=0).sort(0).values)


def test_cifar_needs_root(tmp_path):
    with pytest.raises(DataError, match="data.root must point at the extracted cifar-10-batches-py"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", str(tmp_path / "nowhere"))


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_dict", "bad_shape", "bad_label"])
def test_cifar_corrupt_file_is_named(tmp_path, damage):
    batches = write_cifar10(tmp_path)
    path = tmp_path / "test_batch"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "bad_shape":
        d = batches["test_batch"]
        path.write_bytes(pickle.dumps({**d, b"data": d[b"data"][:, :1000]}))
    else:
        d = batches["test_batch"]
        path.write_bytes(pickle.dumps({**d, b"labels": [10] * N_BATCH}))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))


class _Exploit:
    """Unpickling this calls os.system (if the unpickler lets it)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvalExploit:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


@pytest.mark.parametrize("payload", ["os.system", "eval", "torch"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, payload):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"os.system": _Exploit(f"touch {marker}"), "eval": _EvalExploit(), "torch": torch.zeros(2)}[payload]
    d = _cifar_dict(N_BATCH, b"labels", 10, seed=0)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({**d, b"data": evil}))
    with pytest.raises(DataError, match="data_batch_1.*refusing to unpickle"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_restricted_unpickler_allows_only_numpy_arrays(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"p{protocol}"
        path.write_bytes(pickle.dumps({b"data": arr, b"n": np.int64(3)}, protocol=protocol))
        got = cifar.read_batch(path)
        np.testing.assert_array_equal(got[b"data"], arr)
        assert got[b"n"] == 3
    # numpy 1.x (and the real CIFAR files) name numpy.core; numpy 2.x names numpy._core
    raw = pickle.dumps({b"data": arr}, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    for pkg in (b"numpy.core", b"numpy._core"):
        (tmp_path / "named").write_bytes(raw.replace(b"numpy.core.multiarray\n", pkg + b".multiarray\n"))
        np.testing.assert_array_equal(cifar.read_batch(tmp_path / "named")[b"data"], arr)
    with pytest.raises(pickle.UnpicklingError, match="codec"):
        cifar._latin1_encode("x", "rot13")


# -- ImageFolder -----------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "eel"]


def write_imagefolder(root: Path, per_class: dict[str, int] | None = None, size=(20, 24)) -> None:
    """root/{train,val}/<class>/<i>.png, tiny RGB images of a class-specific colour."""
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range((per_class or {}).get(name, n)):
                pixels = np.full((*size, 3), 60 * c + 10 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture
def small_crops(monkeypatch):
    monkeypatch.setattr(imagefolder, "IMAGE_SIZE", 16)
    monkeypatch.setattr(imagefolder, "RESIZE_SIZE", 18)


def test_imagefolder_loads(tmp_path, small_crops):
    write_imagefolder(tmp_path)
    ds = load_dataset("imagefolder", str(tmp_path))
    assert ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    assert ds.train_targets.dtype == torch.long and ds.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert not hasattr(ds.train, "inputs") and not hasattr(ds.test, "inputs")  # make_loader: default collate
    x, y = ds.train[5]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and y == 1
    x, y = ds.test[4]  # eval transform: a uniform image stays uniform, normalized per channel
    assert y == 2
    mean, std = torch.tensor(imagefolder.IMAGENET_MEAN), torch.tensor(imagefolder.IMAGENET_STD)
    expected = (torch.full((3,), 120 / 255) - mean) / std
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-2, rtol=0)


def test_imagefolder_through_loader_and_evaluation(tmp_path, small_crops):
    from codistill.models import build_model

    write_imagefolder(tmp_path)
    ds = load_dataset("imagefolder", str(tmp_path))
    sp = make_splits(ds, val_fraction=0.0)
    assert sp.val is ds.test  # val_fraction 0: validation on val/ with the eval transform
    sampler = ShardBatchSampler(sp.train_indices, batch_size=4, replicas=1, replica=0, seed=0)
    x, y = next(iter(make_loader(sp.train, sampler, num_workers=1)))  # decoded in a worker process
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,) and y.dtype == torch.long
    model = build_model("resnet_cifar_tiny", ds.num_classes, ds.input_shape)
    serial = _evaluate(model, sp.val, [[0, 1, 2], [3, 4, 5]])
    assert serial["count"] == 6 and 0 < serial["models"][0]["loss"] < float("inf")
    # Decoded in worker processes, in the same order, to the same metrics.
    parallel = _evaluate(model, sp.val, [[0, 1, 2], [3, 4, 5]], num_workers=2)
    assert parallel["count"] == 6
    for key in ("loss", "accuracy"):
        assert parallel["models"][0][key] == pytest.approx(serial["models"][0][key], rel=1e-6)


def _evaluate(model, dataset, batches, num_workers=0) -> dict:
    """The evaluation core on one process over the given index batches (as ClassificationTask)."""
    from codistill.evaluation import evaluate
    from codistill.topology import Grid, Topology

    loader = make_loader(dataset, batches, num_workers)
    return evaluate(model, loader, lambda m, b: (m(b[0]), b[1]), Topology(Grid(1, 1), 0, None, None), "cpu")


class _WorkerTagged(torch.utils.data.Dataset):
    """Input [1, 0] when fetched in a DataLoader worker process, [0, 0] in the calling process."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        in_worker = torch.utils.data.get_worker_info() is not None
        return torch.tensor([float(in_worker), 0.0]), 0


def test_evaluation_fetches_file_backed_batches_in_worker_processes():
    import math

    batches = [[0, 1], [2, 3]]
    serial = _evaluate(torch.nn.Identity(), _WorkerTagged(), batches)
    parallel = _evaluate(torch.nn.Identity(), _WorkerTagged(), batches, num_workers=2)
    # Target 0 everywhere: NLL of softmax([0, 0]) in this process, of softmax([1, 0]) in workers.
    assert serial["models"][0]["loss"] == pytest.approx(math.log(2))
    assert parallel["models"][0]["loss"] == pytest.approx(math.log(1 + math.exp(-1)))
    assert parallel["count"] == 4 and parallel["models"][0]["accuracy"] == 1.0


def test_imagefolder_errors(tmp_path, small_crops):
    with pytest.raises(DataError, match="data.root"):
        load_dataset("imagefolder", None)
    write_imagefolder(tmp_path / "a")
    import shutil

    shutil.rmtree(tmp_path / "a" / "val")
    with pytest.raises(DataError, match=r"a/val"):
        load_dataset("imagefolder", str(tmp_path / "a"))
    (tmp_path / "b" / "train").mkdir(parents=True)  # no class folders at all
    (tmp_path / "b" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"b/train"):
        load_dataset("imagefolder", str(tmp_path / "b"))
    write_imagefolder(tmp_path / "c", per_class={"dog": 0})  # an empty class folder
    with pytest.raises(DataError, match="dog"):
        load_dataset("imagefolder", str(tmp_path / "c"))
    write_imagefolder(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "val" / "eel")
    with pytest.raises(DataError, match="different class folders.*eel"):
        load_dataset("imagefolder", str(tmp_path / "d"))


# -- splits ----------------------------------------------------------------------------------------

def _targets(counts: list[int]) -> torch.Tensor:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(7))]


def test_balanced_split_is_balanced_disjoint_and_seeded():
    y = _targets([10, 20, 40])
    taken, rest = balanced_split(y, 0.25, seed=3)
    assert torch.bincount(y[taken]).tolist() == [2, 5, 10]  # round(0.25 * count) per class
    assert torch.bincount(y[rest]).tolist() == [8, 15, 30]
    assert torch.equal(torch.sort(torch.cat([taken, rest])).values, torch.arange(len(y)))
    again, _ = balanced_split(y, 0.25, seed=3)
    other, _ = balanced_split(y, 0.25, seed=4)
    assert torch.equal(taken, again) and not torch.equal(taken, other)


def _synthetic(counts: list[int], with_test: bool) -> DatasetSplits:
    y = _targets(counts)
    train = TensorData(torch.arange(len(y)).float().view(-1, 1), y)
    test = TensorData(torch.zeros(6, 1), torch.arange(6) % len(counts)) if with_test else None
    return DatasetSplits(train, y, test, len(counts), (1,))


def test_make_splits_validation_and_fraction():
    ds = _synthetic([30, 60, 90], with_test=True)
    full = make_splits(ds, val_fraction=0.1)
    half = make_splits(ds, val_fraction=0.1, fraction=0.5)
    y = ds.train_targets
    assert torch.bincount(y[full.val_indices]).tolist() == [3, 6, 9]
    assert set(full.val_indices.tolist()).isdisjoint(full.train_indices.tolist())
    assert len(full.val_indices) + len(full.train_indices) == len(y)
    assert full.val is ds.train and full.test is ds.test and len(full.test_indices) == 6
    # the validation split does not move with the training fraction; the fraction is class-balanced
    assert torch.equal(half.val_indices, full.val_indices)
    assert torch.bincount(y[half.train_indices]).tolist() == [14, 27, 40]  # round(0.5 * [27, 54, 81])
    assert set(half.train_indices.tolist()) <= set(full.train_indices.tolist())
    again = make_splits(ds, val_fraction=0.1, fraction=0.5)
    assert torch.equal(again.train_indices, half.train_indices)


def test_make_splits_carves_test_when_missing_and_val_zero_uses_test():
    ds = _synthetic([20, 20], with_test=False)
    sp = make_splits(ds, val_fraction=0.25, test_fraction=0.2)
    parts = [set(sp.test_indices.tolist()), set(sp.val_indices.tolist()), set(sp.train_indices.tolist())]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sum(map(len, parts)) == 40 and sp.test is ds.train
    assert torch.bincount(ds.train_targets[sp.test_indices]).tolist() == [4, 4]
    assert torch.bincount(ds.train_targets[sp.val_indices]).tolist() == [4, 4]  # 0.25 of the 16 left
    sp0 = make_splits(ds, val_fraction=0.0)
    assert torch.equal(sp0.val_indices, sp0.test_indices)


def test_validation_carved_from_train_is_not_augmented(tmp_path):
    from codistill.data import load_dataset, make_splits

    write_cifar10(tmp_path)
    splits = make_splits(load_dataset("cifar10", str(tmp_path)), val_fraction=0.2)
    idx = splits.val_indices[:8].tolist()
    first, _ = splits.val.__getitems__(idx)
    second, _ = splits.val.__getitems__(idx)
    assert torch.equal(first, second)  # deterministic: no random crop or flip
    a, _ = splits.train.__getitems__(idx * 20)
    b, _ = splits.train.__getitems__(idx * 20)
    assert not torch.equal(a, b)  # the training view is augmented
