"""Reader for SWORD "zText" Bible modules (e.g. the Debian packages sword-text-kjv, sword-text-sparv).

A module directory holds, per testament (`ot`, `nt`), three files:

    <t>.bzv  one 10-byte entry per verse slot: little-endian u32 block, u32 offset, u16 size
    <t>.bzs  one 12-byte entry per block:      little-endian u32 offset, u32 compressed size, u32 size
    <t>.bzz  the blocks, each one zlib stream

Verse slot i is bytes [offset, offset + size) of its decompressed block (UTF-8 OSIS markup). Slots
follow the module's versification and include headings (module, testament, book, chapter), so slot i
of two modules with the same versification is the same verse (or heading) in both.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

from ..errors import DataError

VERSE_ENTRY = struct.Struct("<IIH")  # block, offset in the decompressed block, size
BLOCK_ENTRY = struct.Struct("<III")  # offset in .bzz, compressed size, decompressed size
TESTAMENTS = ("ot", "nt")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"SWORD module file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read SWORD module file {path}: {e}") from None


def _entries(path: Path, entry: struct.Struct) -> list[tuple[int, ...]]:
    raw = _read(path)
    if len(raw) % entry.size:
        raise DataError(f"{path} is corrupt: {len(raw)} bytes is not a whole number of "
                        f"{entry.size}-byte entries")
    return list(entry.iter_unpack(raw))


def read_testament(directory: str | Path, testament: str, encoding: str = "utf-8") -> list[str]:
    """Every verse slot of one testament (`ot` or `nt`) as raw markup, in index order ("" if empty)."""
    d = Path(directory)
    bzv, bzs, bzz = (d / f"{testament}.{ext}" for ext in ("bzv", "bzs", "bzz"))
    verses = _entries(bzv, VERSE_ENTRY)
    blocks = _entries(bzs, BLOCK_ENTRY)
    data = _read(bzz)
    cache: dict[int, bytes] = {}

    def block(b: int) -> bytes:
        if b not in cache:
            if b >= len(blocks):
                raise DataError(f"{bzv} is corrupt: a verse points at block {b}, {bzs} has {len(blocks)}")
            offset, compressed, size = blocks[b]
            if offset + compressed > len(data):
                raise DataError(f"{bzs} is corrupt: block {b} ends at byte {offset + compressed}, "
                                f"{bzz} has {len(data)}")
            try:
                raw = zlib.decompress(data[offset:offset + compressed])
            except zlib.error as e:
                raise DataError(f"{bzz} is corrupt: block {b} does not decompress ({e})") from None
            if len(raw) != size:
                raise DataError(f"{bzz} is corrupt: block {b} decompresses to {len(raw)} bytes, "
                                f"{bzs} says {size}")
            cache[b] = raw
        return cache[b]

    out = []
    for i, (b, offset, size) in enumerate(verses):
        if size == 0:
            out.append("")
            continue
        raw = block(b)
        if offset + size > len(raw):
            raise DataError(f"{bzv} is corrupt: verse slot {i} ends at byte {offset + size} of block {b}, "
                            f"which has {len(raw)}")
        try:
            out.append(raw[offset:offset + size].decode(encoding))
        except UnicodeDecodeError as e:
            raise DataError(f"{bzz}: verse slot {i} is not valid {encoding} ({e.reason})") from None
    return out


def read_module(directory: str | Path, testaments: tuple[str, ...] = TESTAMENTS) -> list[str]:
    """Raw markup of every verse slot of the given testaments, concatenated in that order."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"SWORD module directory not found: {d}")
    slots: list[str] = []
    for t in testaments:
        slots += read_testament(d, t)
    return slots


# Elements whose content is not part of the running text: notes (footnotes, cross references)
# and titles (book, chapter and section headings, which differ between translations).
_DROPPED = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1\s*>", re.DOTALL)
# Structural elements (poetry lines, paragraphs, divisions) separate words; inline ones (<w>, ...) do not.
_BREAK = re.compile(r"</?(?:l|lb|lg|p|div|chapter|verse|milestone|br)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
# Stray USFM character markers left by the converter, e.g. "\\nd LORD\\+nd*".
_USFM = re.compile(r"\\\+?[a-z]+[0-9]*\*?")
_SPACE = re.compile(r"\s+")


def strip_osis(markup: str) -> str:
    """OSIS verse markup -> plain text.

    Notes and titles are dropped with their content; every other element (<w> words, <transChange>
    added words, <divineName>, <q> quotes, ...) is replaced by its content; entities are unescaped,
    the paragraph sign and USFM leftovers removed and white space collapsed.
    """
    text = _DROPPED.sub("", markup)
    text = _BREAK.sub(" ", text)
    text = _TAG.sub("", text)
    text = _USFM.sub(" ", text)
    text = html.unescape(text).replace("\u00b6", " ")
    return _SPACE.sub(" ", text).strip()


def read_verses(directory: str | Path, testaments: tuple[str, ...] = TESTAMENTS) -> list[str]:
    """Plain text of every verse slot (headings and empty slots give "")."""
    return [strip_osis(m) for m in read_module(directory, testaments)]
