"""Re-score a finished translation run: BLEU of each model and of their ensemble on any number of
test sentences, from the run's last checkpoint, in one process.

    .venv/bin/python scripts/ensemble_bleu.py RUN_DIR [--sentences N]   # default: the whole test set

The models decode in step in one thread each; every step their probabilities meet at a barrier and
each thread continues with the log of their mean, as `translation.task.ensemble_log_probs` does
across processes. With N = the run's `translation.bleu_sentences` it reproduces the run's summary,
an independent check of the distributed decoding (results/notes.md, F5).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import sacrebleu
import torch

from codistill.checkpoint import load_entry, read_latest
from codistill.config import load_config
from codistill.errors import UserError
from codistill.tasks import make_task, task_class
from codistill.translation.task import TranslationTask


def fail(message: str) -> None:
    """Bad input: one line and exit status 2, as the `codistill` command does."""
    print(f"ensemble_bleu: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a translation run directory with checkpoints")
    p.add_argument("--sentences", type=int, help="score the first N test sentences (default: all)")
    args = p.parse_args()
    if args.sentences is not None and args.sentences <= 0:
        fail(f"--sentences must be > 0, got {args.sentences}")
    manifest = read_latest(args.run) if (args.run / "config.yaml").is_file() else None
    if manifest is None:
        fail(f"{args.run} is not a run directory with a checkpoint")
    cfg = load_config(args.run / "config.yaml", [])
    if task_class(cfg) is not TranslationTask:
        fail(f"{args.run} is not a translation run (data.name={cfg.data.name})")
    torch.set_num_threads(1)
    task = make_task(cfg, torch.device("cpu"), args.run)
    models = []
    for i, name in enumerate(cfg.model_names()):  # one name per model: architectures may differ
        model = task.build_model(name)
        entry = load_entry(args.run, manifest, f"model_{i}.pt")
        try:
            model.load_state_dict(entry["model"])
        except (KeyError, TypeError, RuntimeError) as e:  # weights of another model or config
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fail(f"{args.run}: checkpoint model_{i}.pt does not fit model {name!r} of its config.yaml: "
                 f"{first[:200]}")
        models.append(model.eval())
    test, refs = task.encoded("test"), task.corpus.test.tgt
    indices = list(range(min(args.sentences or len(refs), len(refs))))
    one_worker = SimpleNamespace(replica_index=0, replicas=1)

    def bleu(translations: dict[int, str]) -> float:
        return sacrebleu.corpus_bleu([translations[i] for i in indices], [[refs[i] for i in indices]]).score

    own = []
    for model in models:
        with torch.no_grad():
            own.append(bleu(task.translate(model, test, indices, one_worker)))
    n = len(models)
    barrier, probs, out = threading.Barrier(n), [None] * n, [None] * n

    def decode(k: int) -> None:
        def combine(logp: torch.Tensor) -> torch.Tensor:
            probs[k] = logp.exp()
            barrier.wait()  # every model's probabilities are in
            mean = (sum(probs) / n).log()
            barrier.wait()  # every model has read them before the next step overwrites
            return mean

        with torch.no_grad():
            out[k] = task.translate(models[k], test, indices, one_worker, combine)

    threads = [threading.Thread(target=decode, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o == out[0] for o in out), "the models' threads left step"
    print(f"{len(indices)} test sentences: BLEU " + ", ".join(f"model {i} {s:.2f}" for i, s in enumerate(own))
          + (f"; ensemble {bleu(out[0]):.2f}" if n > 1 else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # a damaged config.yaml, manifest, checkpoint file or tokenizer of the run
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
