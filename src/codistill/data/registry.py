"""Datasets by name, each with the task that trains on it.

A loader takes the directory (or None for its default) and returns what its task reads
(`DatasetSplits` for classification, `ParallelCorpus` for translation); missing or corrupt files
raise `DataError` naming the file, never a fallback. The image datasets register themselves in
this package with the default task (classification); a task package registers its own datasets:

    register_dataset("bible_en_es", load_bible, task=TranslationTask)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Registered:
    loader: Callable[[str | None], Any]
    task: type | None  # the `codistill.tasks.Task` that trains on it; None: classification
    takes_root: bool = True  # False: built in (scikit-learn's digits), data.root does nothing


DATASETS: dict[str, Registered] = {}


def register_dataset(name: str, loader: Callable | None = None, *, task: type | None = None,
                     takes_root: bool = True):
    """Register `loader` under `name` (or, without a loader, decorate one)."""
    if loader is None:
        return lambda fn: register_dataset(name, fn, task=task, takes_root=takes_root)
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} registered twice")
    DATASETS[name] = Registered(loader, task, takes_root)
    return loader


def registered(name: str) -> Registered:
    from ..errors import ConfigError

    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, root: str | None = None):
    return registered(name).loader(root)
