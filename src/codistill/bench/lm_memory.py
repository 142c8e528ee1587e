"""Peak memory per worker of language-model codistillation: n = 1 (all-reduce), 2 and 4 models.

The teachers' logits are batch x context x vocabulary floats, one tensor per teacher, so the
memory that codistillation adds grows with n - 1. Each row is one real run of the library's
`Trainer` on 4 local workers (`configs/lm_tiny.yaml`, `bible_web`, the same tokens per worker),
and reads `peak_memory_mib` from its summary: the highest peak over the workers (on CPU the
process's resident set, torch's own libraries included, so the differences between rows are what
the models and teachers add). Beside it, the formula for the teachers' logits of one step:
(n - 1) x tokens per worker x vocabulary x 4 bytes.

The distillation term itself does not grow with n: the mean KL to the n - 1 teachers is computed
against their mean probability (losses.py), so the student's softmax and the gradient are held once.
"""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from .common import Result, machine_info, markdown_table
from .local import run_local

WORLD = 4


def run(quick: bool = False, out: Path = Path("runs/bench")) -> Result:
    steps = 4 if quick else 20
    sets = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.log_every={steps}", "train.progress=false",
            "dist.threads=1", "lm.sample_tokens=8", "data.eval_batch_size=1024"]
    if quick:
        sets += ["lm.vocab_size=1000", "lm.context=64", "data.batch_size=256"]
    path = Path(__file__).resolve().parents[1] / "configs" / "lm_tiny.yaml"
    runs = [(f"n{n}", load_config(path, [*sets, f"codistill.n_models={n}"])) for n in (1, 2, 4)]
    # One start of the workers per run: a process's peak resident set only ever grows, so runs
    # sharing the processes would each report the largest so far.
    summaries = {name: run_local([(name, c)], WORLD, Path(out) / "lm_memory_runs")[name] for name, c in runs}
    cfg = runs[0][1]
    tokens, vocab = cfg.data.batch_size, cfg.lm.vocab_size
    base = summaries["n1"]["peak_memory_mib"]
    rows, records = [], []
    for name, c in runs:
        s, n = summaries[name], c.codistill.n_models
        logits_mib = (n - 1) * tokens * vocab * 4 / 2**20
        rows.append([n, f"{n} x {WORLD // n}", f"{s['peak_memory_mib']:.0f}", f"{s['peak_memory_mib'] - base:+.0f}",
                     f"{logits_mib:.1f}", s["peak_memory_kind"]])
        records.append({"n_models": n, "replicas": WORLD // n, "peak_memory_mib": s["peak_memory_mib"],
                        "over_allreduce_mib": s["peak_memory_mib"] - base, "teacher_logits_mib": logits_mib,
                        "kind": s["peak_memory_kind"], "steps": s["steps"]})
    table = markdown_table(["n", "models x workers", "peak per worker (MiB)", "vs all-reduce (MiB)",
                            "teachers' logits per step (MiB, formula)", "measured as"], rows)
    notes = [f"`gpt_tiny` on `bible_web`, {WORLD} local workers, {tokens} tokens per worker per step "
             f"(context {cfg.lm.context}), vocabulary {vocab}, {steps} steps per run.",
             "peak per worker = the highest `peak_memory_mib` over the run's workers (summary.json); on CPU "
             "the process's resident set, which includes torch itself: compare rows, not absolute values.",
             "With n models over the same workers each model has fewer replicas, and every worker also holds "
             "n - 1 teachers (weights and logits)."]
    return Result(name="lm_memory", title="Peak memory per worker, language-model codistillation",
                  command=f"codistill bench lm_memory{' --quick' if quick else ''}", table=table, notes=notes,
                  data={"runs": records, "world": WORLD, "tokens_per_worker": tokens, "vocab": vocab},
                  machine=machine_info())
