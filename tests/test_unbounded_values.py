"""Values that cannot finish are refused, and optional extras never cost a run its summary
(issue 31, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codistill.cli import main
from mp_helpers import run_workers
from test_lm import lm_config, write_text

pytestmark = pytest.mark.timeout(300)

DIGITS = ["--config", str(Path(__file__).resolve().parents[1] / "configs/digits_tiny.yaml")]


@pytest.mark.parametrize("setting, fragment", [
    ("lm.sample_tokens=100000000", "lm.sample_tokens must be at most 10000"),
    ("lm.sample_tokens=10001", "lm.sample_tokens must be at most 10000"),
    ("translation.beam=1000000", "translation.beam must be at most 100"),
])
def test_a_value_that_cannot_finish_is_one_line_before_anything_is_made(tmp_path, capsys, setting, fragment):
    code = main(["train", *DIGITS, "--set", setting, "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_the_largest_allowed_sample_is_accepted():
    from codistill.config import load_config

    assert load_config(None, ["lm.sample_tokens=10000", "translation.beam=100"]).lm.sample_tokens == 10000


def _worker(rank, world, cfg, run_dir):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    trainer = Trainer(cfg, DistContext(rank, world, rank, "gloo", torch.device("cpu")), run_dir)
    seen = {}

    def sample(model):  # stands for a sample that never ends: what is on disk when it starts?
        seen["summary_on_disk"] = (Path(run_dir) / "summary.json").is_file()
        raise KeyboardInterrupt  # the user gives up on it

    trainer.task.write_sample = sample
    try:
        trainer.fit()
    except KeyboardInterrupt:
        seen["interrupted"] = True
    return seen


def test_the_summary_is_on_disk_before_the_sample_starts(tmp_path):
    root = write_text(tmp_path / "text", lines=400)
    cfg = lm_config(root, tmp_path / "cache", "codistill.n_models=1", "train.steps=2")
    run = tmp_path / "run"
    from codistill.lm.task import LMTask

    LMTask.prepare(cfg, run)
    (seen,) = run_workers(_worker, 1, tmp_path, (cfg, str(run)), timeout=200)
    assert seen == {"summary_on_disk": True, "interrupted": True}
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
