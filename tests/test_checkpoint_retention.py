"""Checkpoint retention: the newest KEEP checkpoints by step number stay, whatever their names."""

from __future__ import annotations

import json

from codistill import checkpoint as ckpt


def test_retention_orders_by_step_number_past_a_million(tmp_path):
    # step_{:06d} grows a seventh digit at 1,000,000: as text, "step_1000000" < "step_999500".
    for step in (999_000, 999_500, 1_000_000):
        ckpt.step_dir(tmp_path, step).mkdir(parents=True)
        ckpt.commit(tmp_path, step, {}, world_size=1)
        latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
        assert latest["step"] == step
        assert (tmp_path / "checkpoints" / latest["dir"]).is_dir()  # never a manifest of a deleted folder
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_1000000", "step_999500"]  # the two newest (ckpt.KEEP == 2)
