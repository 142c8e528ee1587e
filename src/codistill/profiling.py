"""`train.profile: [start, stop]`: a torch.profiler trace of steps start .. stop-1 into the run
directory, profile/rank_<r>.pt.trace.json (Chrome trace format: TensorBoard's profiler plugin and
Perfetto open it). Every rank records its own trace."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    def __init__(self, window: list[int] | None, run_dir: Path | None, rank: int, device: torch.device):
        self.start, self.stop = window if window is not None and run_dir is not None else (None, None)
        self.path = Path(run_dir) / "profile" / f"rank_{rank}.pt.trace.json" if run_dir is not None else None
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = None

    def before_step(self, step: int) -> None:
        """Call before step `step` (completed updates so far) is taken."""
        if self.start is not None and self.prof is None and self.start <= step < self.stop:
            self.prof = profile(activities=self.activities, record_shapes=True, with_stack=False)
            self.prof.start()

    def after_step(self, step: int, last: bool = False) -> None:
        """Call after the step; `step` now counts it. The trace is written at `stop` or at the last step."""
        if self.prof is None or (step < self.stop and not last):
            return
        self.prof.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.path)  # a reader never sees half a trace
        self.prof = None
