"""Seeds derived from the run's seed, so no two streams of randomness coincide.

`topology.model_seed(seed, j)` was once `seed + j`: model 1 of `train.seed=0` was model 0 of `train.seed=1`
(same initialization and data order), so two "independent" seeds of a comparison shared a model.
Every seed here is numpy's `SeedSequence(seed, spawn_key=path)`, the j-th child of
`SeedSequence(seed).spawn(...)` for a one-element path: distinct (seed, path) pairs hash their
entropy apart, and a path never aliases a seed (the spawn key is kept apart from the entropy).
"""

from __future__ import annotations

import numpy as np

DERIVATION = "SeedSequence"
"""Recorded in result rows and config hashes (experiments/): rows made with `seed + j` lack it."""


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for the stream `path` (model, replica, position, ...) of a run seeded `seed`.

    63 bits: torch's generators take unsigned 64-bit seeds, and callers may add an epoch to one
    (e.g. `DistributedSampler` adds the epoch to its seed)."""
    if seed < 0 or any(p < 0 for p in path):
        raise ValueError(f"seeds and their paths are non-negative, got {seed}, {path}")
    low, high = np.random.SeedSequence(seed, spawn_key=path).generate_state(2, np.uint32)
    return int(low) | (int(high) & 0x7FFF_FFFF) << 32
