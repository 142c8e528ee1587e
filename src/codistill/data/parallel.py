"""Parallel corpora for translation, registered here with the other datasets.

Their loaders carry `task = "translation"`, which makes the trainer use
`codistill.translation.TranslationTask`; the readers live in `codistill.translation.corpus` and
are imported only when a corpus is loaded.
"""

from __future__ import annotations

from .registry import register_dataset


def _translation(fn):
    fn.task = "translation"
    return fn


@register_dataset("bible_en_es")
@_translation
def bible_en_es(root: str | None = None):
    """KJV English -> Reina-Valera 1909 Spanish (about 30,000 verse pairs), from the Debian SWORD
    modules sword-text-kjv and sword-text-sparv (or a directory holding both modules)."""
    from ..translation.corpus import load_bible

    return load_bible(root)


@register_dataset("parallel_text")
@_translation
def parallel_text(root: str | None = None):
    """Aligned text files in `data.root`: train/valid/test .src/.tgt."""
    from ..errors import DataError
    from ..translation.corpus import SPLIT_FILES, load_parallel_text

    if root is None:
        raise DataError("parallel_text needs data.root: a directory with "
                        + ", ".join(f for pair in SPLIT_FILES.values() for f in pair))
    return load_parallel_text(str(root))
