"""The reproduction suite: `codistill reproduce NAME... | all [--seeds K] [--quick] [--out DIR]`.

- `suite`: the experiments as data (a base of config overrides and a list of variants per finding);
- `runner`: one `train(...)` per (experiment, variant, seed), one appended row each, resumable;
- `results`: the rows (write, read, metrics, mean and std over seeds);
- `plots`: one PNG per experiment from its rows; `verdicts` and `report`: docs/results.md.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

from .suite import EXPERIMENTS, Experiment, Variant

DEFAULT_OUT = "results"
QUICK_OUT = "runs/reproduce-quick"


MAX_BUDGET = 1000.0  # a factor beyond this is a typo, not a longer run


def reproduce(names: list[str], seeds: int | None = None, quick: bool = False, out: str | None = None,
              budget: float = 1.0, report: bool = False, doc: str | None = None,
              variants: list[str] | None = None) -> int:
    """Run the named experiments (none with `report` alone), then draw their plots and write the
    report. Returns the exit status: 1 when a run failed (its row is missing; rerun to retry)."""
    from ..distributed import is_leader
    from ..errors import UserError
    from .report import write_report
    from .runner import Suite, select

    out = out or (QUICK_OUT if quick else DEFAULT_OUT)
    seeds = seeds if seeds is not None else (1 if quick else 3)
    if seeds <= 0:
        raise UserError(f"--seeds must be > 0, got {seeds}")
    if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET):  # NaN passes every `<` check
        raise UserError(f"--budget must be a number in (0, {MAX_BUDGET:g}] (a factor on every epoch-valued "
                        f"setting), got {budget}")
    failures = []
    if names or not report:
        experiments = select(names)
        suite = Suite(out, quick=quick, budget=budget, command=shlex.join(["codistill", *sys.argv[1:]]))
        written = suite.run(experiments, seeds, only=variants)
        failures = suite.failures
        if not is_leader():  # under torchrun: rank 0 alone reports
            return 1 if failures else 0
        print(f"reproduce: {written} new row(s) in {out}/", flush=True)
    if doc is None:
        doc = "docs/results.md" if out == DEFAULT_OUT and not quick else str(Path(out) / "results.md")
    path = write_report(out, doc, quick=quick, out_arg=out)
    print(f"reproduce: wrote {path} and the plots in {out}/", flush=True)
    if failures:
        print(f"reproduce: {len(failures)} run(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


__all__ = ["EXPERIMENTS", "Experiment", "Variant", "reproduce"]
