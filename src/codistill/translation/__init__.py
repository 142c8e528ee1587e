"""Translation: Transformer models trained by the same trainer, through `TranslationTask`.

    sword.py      SWORD zText Bible modules -> verse texts
    corpus.py     aligned corpora; registers the datasets `bible_en_es` and `parallel_text`
    tokenizer.py  shared SentencePiece vocabulary, trained once per run into the run directory
    task.py       TranslationTask: token batching, forward, NLL / accuracy / BLEU evaluation
The models are `codistill.models.transformer` (transformer_tiny, _base, _big).

The datasets `bible_en_es` and `parallel_text` are registered in `codistill.data.parallel` with
`task = "translation"`; `codistill.tasks.task_class` imports this package, which registers
`TranslationTask` in `codistill.tasks.TASKS`.
"""

from __future__ import annotations

from ..models import transformer  # noqa: F401  (registers the transformer presets)
from .corpus import Bitext, ParallelCorpus, read_aligned
from .sword import read_verses, strip_osis


def register_task() -> None:
    """Make `codistill.tasks.TASKS["translation"]` the TranslationTask (idempotent)."""
    from ..tasks import TASKS
    from .task import TranslationTask

    TASKS.setdefault("translation", TranslationTask)


def __getattr__(name: str):
    if name == "TranslationTask":  # lazy: it imports the trainer-side modules
        from .task import TranslationTask

        return TranslationTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_task()

__all__ = ["Bitext", "ParallelCorpus", "TranslationTask", "read_aligned", "read_verses", "register_task",
           "strip_osis"]
