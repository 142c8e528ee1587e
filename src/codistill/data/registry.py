"""Datasets by name. Each loader takes the directory (or None for its default) and returns
`DatasetSplits`; missing or corrupt files raise `DataError` naming the file, never a fallback."""

from __future__ import annotations

from typing import Callable

from .base import DatasetSplits

DATASETS: dict[str, Callable[[str | None], DatasetSplits]] = {}


def register_dataset(name: str):
    def decorator(fn):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        DATASETS[name] = fn
        return fn

    return decorator


def load_dataset(name: str, root: str | None = None) -> DatasetSplits:
    from ..errors import ConfigError

    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root)
