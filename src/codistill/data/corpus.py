"""Parallel corpora: aligned text files and the built-in English-Spanish Bible.

The corpora (registered as datasets by `codistill.translation`, for its `TranslationTask`):

- `bible_en_es`: King James Version (English) aligned verse by verse with Reina-Valera 1909
  (Spanish), read from the SWORD modules of the Debian packages sword-text-kjv and sword-text-sparv
  (`data.root` = the directory holding engKJV2006eb/ and spaRV1909eb/; default: the packages').
  Empty verses and pairs whose word-count ratio is outside [0.5, 2] are dropped, then a fixed seeded
  split keeps 2% for validation and 2% for test.
- `parallel_text`: your own corpus. `data.root` holds six UTF-8 files, one sentence per line,
  line i of a `.src` file translating line i of the `.tgt` file of the same split:
      train.src train.tgt valid.src valid.tgt test.src test.tgt
  (e.g. WMT'16 En-De after Moses detokenization: train = the training data, valid = newstest2013,
  test = newstest2014). Text is raw (not pre-tokenized): the task trains its own subword
  tokenizer, and BLEU is computed on detokenized output against these raw references. Pairs with an
  empty side are dropped; nothing else is filtered (`translation.max_len` drops long training pairs).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .sword import read_verses

SWORD_DIR = "/usr/share/sword/modules/texts/ztext"
BIBLE_MODULES = ("engKJV2006eb", "spaRV1909eb")  # source (English), target (Spanish)
SPLIT_SEED = 1234  # fixed: the held-out sets must not move with the training seed
SPLIT_FILES = {"train": ("train.src", "train.tgt"), "valid": ("valid.src", "valid.tgt"),
               "test": ("test.src", "test.tgt")}


@dataclass(frozen=True)
class Bitext:
    """Aligned sentences: src[i] translates to tgt[i]."""

    src: tuple[str, ...]
    tgt: tuple[str, ...]

    def __post_init__(self):
        if len(self.src) != len(self.tgt):
            raise ValueError(f"{len(self.src)} source but {len(self.tgt)} target sentences")

    def __len__(self) -> int:
        return len(self.src)

    def select(self, indices) -> "Bitext":
        return Bitext(tuple(self.src[i] for i in indices), tuple(self.tgt[i] for i in indices))

    def reversed(self) -> "Bitext":
        return Bitext(self.tgt, self.src)


@dataclass(frozen=True)
class ParallelCorpus:
    """Train / valid / test bitexts: what a translation dataset loader returns."""

    train: Bitext
    valid: Bitext
    test: Bitext

    def reversed(self) -> "ParallelCorpus":
        """Translate the other way (target -> source)."""
        return ParallelCorpus(self.train.reversed(), self.valid.reversed(), self.test.reversed())

    def split(self, name: str) -> Bitext:
        return {"train": self.train, "valid": self.valid, "val": self.valid, "test": self.test}[name]


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e}") from None


def read_aligned(src_path: str | Path, tgt_path: str | Path) -> Bitext:
    """Two files, one sentence per line, line i of one translating line i of the other."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                        "aligned files need one sentence per line in both")
    return Bitext(tuple(s.strip() for s in src), tuple(t.strip() for t in tgt))


def drop_empty(bitext: Bitext) -> Bitext:
    return bitext.select([i for i, (s, t) in enumerate(zip(bitext.src, bitext.tgt)) if s and t])


def filter_ratio(bitext: Bitext, low: float = 0.5, high: float = 2.0) -> Bitext:
    """Drop pairs with an empty side or a word-count ratio len(src) / len(tgt) outside [low, high]."""
    keep = []
    for i, (s, t) in enumerate(zip(bitext.src, bitext.tgt)):
        ns, nt = len(s.split()), len(t.split())
        if ns and nt and low <= ns / nt <= high:
            keep.append(i)
    return bitext.select(keep)


def split_bitext(bitext: Bitext, valid: float = 0.02, test: float = 0.02,
                 seed: int = SPLIT_SEED) -> ParallelCorpus:
    """Seeded random split; each held-out set keeps corpus order (deterministic for a given input)."""
    order = list(range(len(bitext)))
    random.Random(seed).shuffle(order)
    n_valid, n_test = round(valid * len(order)), round(test * len(order))
    if len(order) - n_valid - n_test <= 0:
        raise DataError(f"a corpus of {len(order)} pairs is too small to split")
    v, t, rest = order[:n_valid], order[n_valid:n_valid + n_test], order[n_valid + n_test:]
    return ParallelCorpus(bitext.select(sorted(rest)), bitext.select(sorted(v)), bitext.select(sorted(t)))


@functools.lru_cache(maxsize=4)
def load_bible(root: str | None = None, src_module: str = BIBLE_MODULES[0],
               tgt_module: str = BIBLE_MODULES[1]) -> ParallelCorpus:
    """Two SWORD modules of the same versification, aligned by verse slot, filtered and split."""
    base = Path(root or SWORD_DIR)
    src = read_verses(base / src_module)
    tgt = read_verses(base / tgt_module)
    if len(src) != len(tgt):
        raise DataError(f"{base / src_module} has {len(src)} verse slots but {base / tgt_module} has "
                        f"{len(tgt)}; the modules must share one versification")
    return split_bitext(filter_ratio(Bitext(tuple(src), tuple(tgt))))


@functools.lru_cache(maxsize=4)
def load_parallel_text(root: str | None) -> ParallelCorpus:
    """The six files of SPLIT_FILES in `root`; pairs with an empty side dropped."""
    if root is None:
        raise DataError("parallel_text needs data.root: a directory with "
                        + ", ".join(f for pair in SPLIT_FILES.values() for f in pair))
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data directory not found: {base}")
    splits = {name: drop_empty(read_aligned(base / s, base / t)) for name, (s, t) in SPLIT_FILES.items()}
    for name, bitext in splits.items():
        if len(bitext) == 0:
            raise DataError(f"{base / SPLIT_FILES[name][0]}: no sentence pairs")
    return ParallelCorpus(**splits)
