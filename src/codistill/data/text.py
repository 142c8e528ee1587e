"""Running-text corpora for language modeling, registered here with the other datasets.

Their loaders carry `task = "lm"`, which makes the trainer use `codistill.lm.LMTask`; the readers
live in `codistill.lm.corpus` and are imported only when a corpus is loaded.
"""

from __future__ import annotations

from .registry import register_dataset


def _lm(fn):
    fn.task = "lm"
    return fn


@register_dataset("bible_web")
@_lm
def bible_web(root: str | None = None):
    """The World English Bible (about 900k words) from the Debian SWORD module sword-text-web,
    split into train / valid / test by contiguous blocks of verses."""
    from ..lm.corpus import load_bible_web

    return load_bible_web(root)


@register_dataset("text_files")
@_lm
def text_files(root: str | None = None):
    """Your own UTF-8 text: `data.root` is a directory with train.txt, valid.txt and test.txt, or
    one file, split by lines: the first 90% train, the next 5% valid, the last 5% test."""
    from ..errors import DataError
    from ..lm.corpus import load_text_files

    if root is None:
        raise DataError("text_files needs data.root: a directory with train.txt, valid.txt and test.txt, "
                        "or one text file")
    return load_text_files(str(root))
