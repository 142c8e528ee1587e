"""Language modeling: decoder-only Transformers trained by the same trainer, through `LMTask`.

    corpus.py  running-text corpora (`bible_web`, `text_files`) and their train/valid/test lines
    task.py    LMTask: tokenizer + memory-mapped token cache, fixed-length blocks, forward,
               NLL / perplexity / ensemble evaluation, the end-of-run sample
The models are `codistill.models.gpt` (gpt_tiny, gpt2_small); the datasets are registered in
`codistill.data.text` with `task = "lm"`.

Registration glue (the one place to change when tasks register explicitly): `codistill.tasks.task_class`
imports this package, which puts `LMTask` in `codistill.tasks.TASKS["lm"]`.
"""

from __future__ import annotations


def register_task() -> None:
    from ..tasks import TASKS
    from .task import LMTask

    TASKS.setdefault("lm", LMTask)


register_task()
