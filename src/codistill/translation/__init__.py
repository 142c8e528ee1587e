"""Translation: Transformer models trained by the same trainer, through `TranslationTask`.

    tokenizer.py  shared SentencePiece vocabulary, trained once per run into the run directory
    task.py       TranslationTask: token batching, forward, NLL / accuracy / BLEU evaluation
The corpora are data code (`codistill.data.corpus`, `codistill.data.sword`); the models are
`codistill.models.transformer` (transformer_tiny, _base, _big). Importing this package registers
the translation datasets with their task (`codistill.tasks` imports it).
"""

from __future__ import annotations

from ..data import register_dataset
from ..data.corpus import load_bible, load_parallel_text
from .task import TranslationTask

# KJV English -> Reina-Valera 1909 Spanish (about 30,000 verse pairs), from the Debian SWORD modules
# sword-text-kjv and sword-text-sparv (or a directory holding both modules).
register_dataset("bible_en_es", load_bible, task=TranslationTask)
# Your aligned text files in data.root: train/valid/test .src/.tgt.
register_dataset("parallel_text", load_parallel_text, task=TranslationTask)

__all__ = ["TranslationTask"]
