"""Language modeling: decoder-only Transformers trained by the same trainer, through `LMTask`.

    corpus.py  running-text corpora (`bible_web`, `text_files`) and their train/valid/test lines
    task.py    LMTask: tokenizer + memory-mapped token cache, fixed-length blocks, forward,
               NLL / perplexity / ensemble evaluation, the end-of-run sample
The models are `codistill.models.gpt` (gpt_tiny, gpt2_small). Importing this package registers the
text corpora with their task (`codistill.tasks` imports it).
"""

from __future__ import annotations

from ..data import register_dataset
from .corpus import load_bible_web, load_text_files
from .task import LMTask

# The World English Bible (about 900k words) from the Debian SWORD module sword-text-web, split into
# train / valid / test by contiguous blocks of verses.
register_dataset("bible_web", load_bible_web, task=LMTask)
# Your own UTF-8 text in data.root: train.txt / valid.txt / test.txt, or one file split by lines.
register_dataset("text_files", load_text_files, task=LMTask)

__all__ = ["LMTask"]
