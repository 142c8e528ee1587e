"""Running-text corpora: where the lines of each split come from, without holding big files in memory.

- `bible_web`: the World English Bible (SWORD module engWEB2015eb of the Debian package
  sword-text-web; `data.root` = the directory holding engWEB2015eb/, default the package's), one
  line per verse in canonical order. Verses are cut into contiguous blocks of BLOCK_VERSES; of
  every 20 blocks one goes to valid and one to test, so no verse (and almost no context) is shared
  between splits.
- `text_files`: `data.root` is a directory with train.txt, valid.txt and test.txt, or one file
  whose lines are split in order: the first 90% train, the next 5% valid, the last 5% test. UTF-8;
  files are streamed, never read whole.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

SWORD_DIR = "/usr/share/sword/modules/texts/ztext"
WEB_MODULE = "engWEB2015eb"
BLOCK_VERSES = 200  # contiguous verses per block of the Bible split
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
ONE_FILE_FRACTIONS = (0.9, 0.05)  # train, valid; the rest is test


@dataclass(frozen=True)
class TextCorpus:
    """What a language-modeling dataset loader returns: the lines of each split, by iteration.

    `fingerprint` identifies the content (module path, or file paths, sizes and mtimes), so the
    token cache of a corpus is rebuilt when its files change.
    """

    name: str
    fingerprint: str
    verses: dict[str, tuple[str, ...]] | None = None  # in-memory corpora
    files: dict[str, tuple[Path, int, int | None]] | None = None  # split -> (file, first line, end line)

    def lines(self, split: str) -> Iterator[str]:
        split = "valid" if split == "val" else split
        if self.verses is not None:
            yield from self.verses[split]
            return
        path, start, end = self.files[split]
        try:
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\r\n") for line in itertools.islice(f, start, end))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a chunk)") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from None


def block_split(count: int, block: int = BLOCK_VERSES) -> dict[str, list[int]]:
    """Indices 0..count-1 cut into contiguous blocks; block b goes to valid if b % 40 == 20, to test
    if b % 40 == 39, else to train."""
    out = {"train": [], "valid": [], "test": []}
    for i in range(count):
        b = (i // block) % 40
        out["valid" if b == 20 else "test" if b == 39 else "train"].append(i)
    return out


@functools.lru_cache(maxsize=2)
def load_bible_web(root: str | None = None) -> TextCorpus:
    from ..data.sword import read_verses

    module = Path(root or SWORD_DIR) / WEB_MODULE
    verses = [v for v in read_verses(module) if v]  # headings and empty slots give ""
    if not verses:
        raise DataError(f"{module}: no verses")
    parts = block_split(len(verses))
    return TextCorpus("bible_web", f"sword:{module.resolve()}",
                      verses={k: tuple(verses[i] for i in idx) for k, idx in parts.items()})


def _stat(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path} is a directory; a text file was expected there")
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is not a regular file (a device or pipe?); a text file was expected")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")


def count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def load_text_files(root: str | None) -> TextCorpus:
    """Your own UTF-8 text: `root` is a directory with train.txt, valid.txt and test.txt, or one
    file, split by lines: the first 90% train, the next 5% valid, the last 5% test."""
    if root is None:
        raise DataError("text_files needs data.root: a directory with train.txt, valid.txt and test.txt, "
                        "or one text file")
    # Remembered per absolute path and file state: a relative root in another working directory,
    # or a file appended to since, is read again (a resume compares the text with the run's).
    base = Path(root).resolve()
    paths = [base / name for name in SPLIT_FILES.values()] if base.is_dir() else [base]
    return _load_text_files(base, tuple(_stat(p) if p.is_file() else None for p in paths))


@functools.lru_cache(maxsize=4)
def _load_text_files(base: Path, _state: tuple) -> TextCorpus:
    if base.is_dir():
        paths = {k: base / name for k, name in SPLIT_FILES.items()}
        for p in paths.values():
            _check_file(p)
        files = {k: (p, 0, None) for k, p in paths.items()}
        stats = [_stat(p) for p in paths.values()]
    else:
        _check_file(base)
        n = count_lines(base)
        a, b = round(ONE_FILE_FRACTIONS[0] * n), round(sum(ONE_FILE_FRACTIONS) * n)
        if not 0 < a < b < n:
            raise DataError(f"{base} has {n} lines, too few to split 90/5/5 into train, valid and test")
        files = {"train": (base, 0, a), "valid": (base, a, b), "test": (base, b, None)}
        stats = [_stat(base)]
    fingerprint = hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]
    return TextCorpus("text_files", fingerprint, files=files)
