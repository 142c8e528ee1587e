"""Subword tokenizer: one SentencePiece BPE model shared by both languages.

Trained on the training split (source and target sentences together) once per run, by
`TranslationTask.prepare`, and saved as `tokenizer.model` in the run directory; every worker loads
that file, so all models of a run share one vocabulary (codistillation compares their distributions
token by token). Training is deterministic (one thread, fixed seed): the same corpus and vocabulary
size give the same file, so a resumed run, or a process that trains it again in memory, agrees.

Ids: 0 = <pad>, 1 = <unk>, 2 = <s> (BOS), 3 = </s> (EOS). Sources end with EOS; the decoder reads
BOS + target and predicts target + EOS.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ConfigError, UserError

TOKENIZER_FILE = "tokenizer.model"
PAD, UNK, BOS, EOS = 0, 1, 2, 3
TOKENIZER_SEED = 1234


def _spm():
    try:
        import sentencepiece
    except ImportError:
        raise UserError("translation needs sentencepiece: pip install 'codistill[translation]'") from None
    return sentencepiece


SPECIAL_PIECES = 4  # <pad> <unk> <s> </s>


def train_tokenizer(sentences: Iterable[str], vocab_size: int, model_type: str = "bpe",
                    setting: str = "translation.vocab_size") -> bytes:
    """A serialized SentencePiece model trained on `sentences`.

    `vocab_size` is an upper bound (`hard_vocab_limit` off): a corpus too small for it yields fewer
    pieces instead of an error. Every character of the corpus is covered (no <unk> on training text),
    so it must be at least the number of distinct characters plus the special pieces: less is a
    ConfigError naming `setting`, the field that gave `vocab_size`.
    """
    spm = _spm()
    spm.set_random_generator_seed(TOKENIZER_SEED)
    sentences = list(sentences)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            num_threads=1, hard_vocab_limit=False, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            max_sentence_length=16384, minloglevel=2)
    except RuntimeError as e:  # sentencepiece's INTERNAL check failures, e.g. fewer pieces than characters
        need = len(set().union(*map(set, sentences))) + SPECIAL_PIECES
        if vocab_size < need:
            raise ConfigError(f"{setting}={vocab_size} is less than the training text's {need - SPECIAL_PIECES} "
                              f"distinct characters plus {SPECIAL_PIECES} special pieces; use at least {need}") from None
        raise ConfigError(f"{setting}={vocab_size}: sentencepiece cannot train this vocabulary: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    return out.getvalue()


class Tokenizer:
    """Text <-> ids with a trained SentencePiece model."""

    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = _spm().SentencePieceProcessor(model_proto=model_proto)
        if self.sp.get_piece_size() <= SPECIAL_PIECES:  # an empty file parses as an empty model
            raise RuntimeError(f"a model of {self.sp.get_piece_size()} pieces")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            return cls(Path(path).read_bytes())
        except FileNotFoundError:
            raise UserError(f"tokenizer not found: {path}") from None
        except RuntimeError:  # sentencepiece's error for a file that is not a model
            raise UserError(f"{path} is damaged: not a SentencePiece model; delete it to rebuild it") from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer {path}: {e.strerror}") from None

    def save(self, path: str | Path) -> None:
        """Write the model atomically (a concurrent reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.proto)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Subword ids of each sentence (no BOS/EOS)."""
        return self.sp.encode(list(sentences))

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized text; pad, BOS and EOS are left out."""
        special = {PAD, BOS, EOS}
        return self.sp.decode([[int(i) for i in seq if int(i) not in special] for seq in ids])
