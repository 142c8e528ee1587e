"""The token cache of a text corpus: its tokenizer and token ids, built once, verified at every use.

A cache directory (under `lm.cache_dir`, keyed by the corpus files and vocabulary size) holds
`tokenizer.model`, `train.bin`, `valid.bin`, `test.bin` (flat token ids, uint16 or int32, an EOS
after each line) and `cache.json`, which says what each file must be: the tokenizer's sha256, and
per split the dtype, token count, sha256 and largest id. It is built in a private directory and
renamed into place whole, so a reader (or a concurrent builder) never sees a half-built cache.

`verify_cache` checks every file against `cache.json` and the ids against the vocabulary before a
run starts: a cache that is empty, a byte short, zero-filled or holds ids the model has no
embedding for would otherwise train on garbage or fail inside the workers. A bad cache is an error
naming the file and the fix (delete the directory to rebuild it); it is never repaired silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ConfigError, DataError
from ..translation.tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer
from .corpus import TextCorpus

CACHE_VERSION = 2  # 2: cache.json with checksums (caches of version 1 are not read)
MANIFEST = "cache.json"
SPLITS = ("train", "valid", "test")
TOKENIZER_LINES = 2_000_000  # lines of the training split the tokenizer is trained on, at most
ENCODE_LINES = 10_000  # lines tokenized at a time
VERIFY_BYTES = 1 << 24  # bytes hashed and range-checked at a time


def cache_dir(cfg: Config, corpus: TextCorpus) -> Path:
    base = cfg.lm.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codistill" / "lm"
    key = hashlib.sha256(f"{CACHE_VERSION}:{corpus.fingerprint}:{cfg.lm.vocab_size}".encode()).hexdigest()[:16]
    return Path(base) / f"{corpus.name}-{cfg.lm.vocab_size}-{key}"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.int32


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(VERIFY_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _take(it, n):
    out = []
    for line in it:
        out.append(line)
        if len(out) == n:
            break
    return out


def encode_split(corpus: TextCorpus, split: str, tok: Tokenizer, path: Path) -> dict:
    """Stream the split's lines through the tokenizer into a flat id file (EOS after each line);
    returns the split's entry of cache.json."""
    dtype, eos = token_dtype(tok.vocab_size), tok.eos_id
    total, largest, h = 0, 0, hashlib.sha256()
    with open(path, "wb") as f:
        lines = corpus.lines(split)
        while chunk := [line for line in _take(lines, ENCODE_LINES) if line.strip()]:
            ids = np.asarray([i for seq in tok.encode(chunk) for i in (*seq, eos)], dtype=dtype)
            f.write(ids.tobytes())
            h.update(ids.tobytes())
            total, largest = total + len(ids), max(largest, int(ids.max()))
    if total == 0:
        raise DataError(f"{corpus.name}: the {split} split has no text")
    return {"dtype": np.dtype(dtype).name, "tokens": total, "sha256": h.hexdigest(), "max_id": largest}


def build_cache(cfg: Config, corpus: TextCorpus, checksums: bool = True) -> Path:
    """The corpus's verified (`verify_cache`) cache directory, built first if there is none."""
    d = cache_dir(cfg, corpus)
    if not d.exists():
        _build(cfg, corpus, d)
    verify_cache(d, cfg.lm.vocab_size, checksums)
    return d


def _build(cfg: Config, corpus: TextCorpus, d: Path) -> None:
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.", suffix=".tmp"))
    try:
        lines = [line for line in _take(corpus.lines("train"), TOKENIZER_LINES) if line.strip()]
        if not lines:
            raise DataError(f"{corpus.name}: the train split has no text")
        tok = Tokenizer(train_tokenizer(lines, cfg.lm.vocab_size, setting="lm.vocab_size"))
        if tok.vocab_size < cfg.lm.vocab_size:
            raise ConfigError(f"lm.vocab_size={cfg.lm.vocab_size} is more than the training text of "
                              f"{corpus.name} can train ({tok.vocab_size} pieces); use at most {tok.vocab_size}")
        tok.save(tmp / TOKENIZER_FILE)
        manifest = {"version": CACHE_VERSION, "vocab_size": tok.vocab_size,
                    "tokenizer_sha256": hashlib.sha256(tok.proto).hexdigest(),
                    "splits": {s: encode_split(corpus, s, tok, tmp / f"{s}.bin") for s in SPLITS}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, d)  # whole, at once; fails if another builder got there first
        except OSError:
            if not d.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(d: Path) -> dict:
    """cache.json of cache `d`, its fields type-checked (DataError naming the fix otherwise)."""
    fix = f"delete {d} to rebuild it"
    try:
        m = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(f"token cache {d} has no {MANIFEST} (damaged, or from another version); {fix}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"token cache {d / MANIFEST} cannot be read ({e}); {fix}") from None
    ok = (isinstance(m, dict) and m.get("version") == CACHE_VERSION and isinstance(m.get("vocab_size"), int)
          and isinstance(m.get("tokenizer_sha256"), str) and isinstance(m.get("splits"), dict)
          and set(m["splits"]) == set(SPLITS)
          and all(isinstance(e, dict) and isinstance(e.get("tokens"), int) and e["tokens"] > 0
                  and isinstance(e.get("sha256"), str) and isinstance(e.get("dtype"), str)
                  for e in m["splits"].values()))
    if not ok:
        raise DataError(f"token cache {d / MANIFEST} is not a version-{CACHE_VERSION} cache manifest; {fix}")
    return m


def verify_cache(d: Path, vocab_size: int, checksums: bool = True) -> dict:
    """Check cache `d` for a vocabulary of `vocab_size` pieces; returns its manifest.

    Always: the tokenizer's size, each file's dtype and length. With `checksums` (once per process
    that launches a run, not in every worker): every byte's sha256, and the ids' range."""
    m, fix = read_manifest(d), f"delete {d} to rebuild it"
    if m["vocab_size"] != vocab_size:
        raise DataError(f"token cache {d} was built for {m['vocab_size']} pieces, lm.vocab_size is {vocab_size}; {fix}")
    dtype = np.dtype(token_dtype(vocab_size))
    tok_path = d / TOKENIZER_FILE
    if not tok_path.is_file():
        raise DataError(f"token cache {d} has no {TOKENIZER_FILE}; {fix}")
    if checksums and sha256_file(tok_path) != m["tokenizer_sha256"]:
        raise DataError(f"{tok_path} does not match its checksum in {MANIFEST} (changed since it was built); {fix}")
    for split, entry in m["splits"].items():
        path = d / f"{split}.bin"
        if entry["dtype"] != dtype.name:
            raise DataError(f"{path} holds {entry['dtype']} ids; {vocab_size} pieces need {dtype.name}; {fix}")
        size = path.stat().st_size if path.is_file() else None
        if size != entry["tokens"] * dtype.itemsize:
            have = "is missing" if size is None else f"holds {size} bytes"
            raise DataError(f"{path} {have}, expected {entry['tokens']} tokens x {dtype.itemsize} bytes = "
                            f"{entry['tokens'] * dtype.itemsize}; {fix}")
        if checksums:
            _check_contents(path, entry, dtype, vocab_size, fix)
    return m


def _check_contents(path: Path, entry: dict, dtype: np.dtype, vocab_size: int, fix: str) -> None:
    h, largest = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(VERIFY_BYTES - VERIFY_BYTES % dtype.itemsize):
            h.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype)
            largest, smallest = max(largest, int(ids.max())), int(ids.min())
            if smallest < 0:
                raise DataError(f"{path} holds the negative token id {smallest}; {fix}")
    if h.hexdigest() != entry["sha256"]:
        raise DataError(f"{path} does not match its checksum in {MANIFEST} (changed since it was built); {fix}")
    if largest >= vocab_size:
        raise DataError(f"{path} holds token id {largest}, outside the vocabulary of {vocab_size} pieces; {fix}")
