"""Offline (two-stage) distillation through the same component: the teachers are the other models
of a finished run, loaded once from its last checkpoint and never refreshed.

The standard way to give a small model a big model's knowledge (Hinton et al. 2015) is to train the
big model first, then distill the small one from it, frozen. With codistill.exchange=frozen this job
trains model `model_index` alone (one model per job, as with the storage exchange) and every other
model of `teacher_run` is a teacher holding that run's weights and BatchNorm statistics at its last
step; the distillation loss, teacher mode and cheaper-teacher settings are codistillation's own.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_entry, read_latest
from .errors import UserError
from .exchange import NoExchange, Teachers


class FrozenTeachers(NoExchange):
    """NoExchange's protocol (nothing to exchange, no state: the teachers come from teacher_run again
    on resume), with the teachers filled once, here."""

    def __init__(self, teachers: Teachers, teacher_run: str | Path):
        run = Path(teacher_run)
        # Only a finished run: a checkpoint of a run still training is not "the trained big model".
        if not (run / "summary.json").is_file():
            raise UserError(f"codistill.teacher_run {run} is not a finished run (no summary.json)")
        manifest = read_latest(run)
        if manifest is None:
            raise UserError(f"codistill.teacher_run {run} has no checkpoint")
        for j, module in teachers.modules.items():
            # In place: each teacher's tensors are views into its flat buffers (exchange.Teachers).
            module.load_state_dict(load_entry(run, manifest, f"model_{j}.pt")["model"])
        teachers.mark_received(manifest["step"])  # trained weights: burn-in's check lets them teach
