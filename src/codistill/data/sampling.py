"""Per-model, per-replica minibatch indices, resumable at any step.

Like `torch.utils.data.DistributedSampler` (seeded shuffle per epoch, disjoint shards per replica,
tail dropped), but over an arbitrary index set and positioned by a step count, so a resumed run
reads exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from ..seeds import derive_seed


def shuffle_and_deal(count: int, seed: int, epoch: int, replicas: int, replica: int) -> torch.Tensor:
    """Positions 0..count-1 shuffled with a seed derived from (seed, epoch), then dealt round-robin to the
    replicas: `replica`'s share, rows replica, replica + replicas, ... of the shuffled order."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(count, generator=g)[replica::replicas]


def deal(indices: torch.Tensor, replicas: int, replica: int, seed: int, epoch: int) -> torch.Tensor:
    """Replica `replica`'s share of `indices` in epoch `epoch` (`shuffle_and_deal` over them)."""
    return indices[shuffle_and_deal(len(indices), seed, epoch, replicas, replica)]


class ShardSampler(Sampler[int]):
    """`DistributedSampler` over an index set: this replica's share, reshuffled every epoch.

    Each `iter()` starts the next epoch by itself (no `set_epoch` to forget); every replica yields
    the same count, len(indices) // replicas.
    """

    def __init__(self, indices: torch.Tensor, replicas: int, replica: int, seed: int):
        self.indices, self.replicas, self.replica, self.seed = indices, replicas, replica, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        mine = deal(self.indices, self.replicas, self.replica, self.seed, self.epoch)[: len(self)]
        self.epoch += 1
        return iter(mine.tolist())

    def __len__(self) -> int:
        return len(self.indices) // self.replicas


class ShardBatchSampler(Sampler[list[int]]):
    """Yields this replica's batches for one model, epoch after epoch, forever.

    Epoch e shuffles `indices` with seed (seed, e) and deals them to the replicas
    (`shuffle_and_deal`); each share is cut to a whole number of batches, so all replicas take the
    same number of steps.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, replicas: int, replica: int, seed: int):
        self.indices, self.batch_size = indices, batch_size
        self.replicas, self.replica, self.seed = replicas, replica, seed
        self.steps_per_epoch = len(indices) // (replicas * batch_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size={batch_size} is too large: {len(indices)} training examples are fewer "
                f"than one step of {replicas} replica(s) needs")
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        """Resume: the next batch yielded is the one for global step `step`."""
        self.start_step = step

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch, batch_size) indices of this replica for one epoch."""
        mine = deal(self.indices, self.replicas, self.replica, self.seed, epoch)
        return mine[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, self.batch_size)

    def __iter__(self):
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        while True:
            for batch in self.epoch_batches(epoch)[offset:]:
                yield batch.tolist()
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the iterator itself never ends
        return self.steps_per_epoch


def make_loader(dataset: Dataset, batches, num_workers: int = 0, pin_memory: bool = False, *, seed: int = 0,
                replica: int = 0, start: int = 0) -> DataLoader:
    """A DataLoader over index batches; in-memory datasets fetch each batch in one indexing op.
    pin_memory: page-locked batches, for asynchronous copies to a GPU.

    What the fetch draws at random (augmentation: random crops and flips, in worker processes or
    here) is seeded per batch from (seed, replica, position): batch k of the iteration, position
    start + k, draws from `derive_seed(seed, replica, start + k)`. So replicas and models draw
    different augmentations, the draws do not depend on data.num_workers, and a run resumed at step
    `start` continues the stream the uninterrupted run read (the caller passes the model's seed).
    """
    batched = hasattr(dataset, "__getitems__") and hasattr(dataset, "inputs")
    positioned = PositionedBatches(batches, seed, replica, start)
    # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run
    # would see different dropout masks than the uninterrupted one. Seeded, so that the workers'
    # base seed (torch's, random's, numpy's in each worker) is this stream's too.
    generator = torch.Generator().manual_seed(derive_seed(seed, replica, start))
    return DataLoader(SeededFetch(dataset, batched), batch_sampler=positioned, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=(lambda b: b) if batched else None, generator=generator)


class PositionedBatches(Sampler):
    """The batches of `batches`, each paired with the seed of its position: (seed, indices)."""

    def __init__(self, batches, seed: int, replica: int, start: int):
        self.batches, self.seed, self.replica, self.start = batches, seed, replica, start

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            yield derive_seed(self.seed, self.replica, self.start + k), batch

    def __len__(self) -> int:
        return len(self.batches)


class SeededFetch(Dataset):
    """`dataset`, fetched a batch at a time with torch's, random's and numpy's global generators
    seeded from the batch's (seed, indices) pair, and restored afterwards (with no workers the fetch
    runs in the training process, whose generators drive dropout and are checkpointed)."""

    def __init__(self, dataset: Dataset, batched: bool):
        self.dataset, self.batched = dataset, batched

    def __getitems__(self, item):
        seed, indices = item
        with seeded_generators(seed):
            if self.batched:
                return self.dataset.__getitems__(indices)
            return [self.dataset[i] for i in indices]

    def __len__(self) -> int:
        return len(self.dataset)


@contextlib.contextmanager
def seeded_generators(seed: int):
    """torch's (CPU), Python's and numpy's global generators seeded with `seed` inside the block,
    as they were after it."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seed is 32-bit
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def eval_batches(indices: torch.Tensor, batch_size: int, replicas: int = 1, replica: int = 0) -> list[list[int]]:
    """This replica's share of an evaluation set, in order, in batches (the last may be short)."""
    mine = indices[replica::replicas]
    return [mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)]
