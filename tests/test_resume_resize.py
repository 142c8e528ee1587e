"""`codistill train --resume RUN --nproc K'`: a sharded run checkpointed at 2 x 2 continues at 2 x 1
from the command line, each worker taking twice the batch so the model batch is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mp_helpers import run_workers
from test_fsdp import _twins

pytestmark = pytest.mark.timeout(600)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_tiny.yaml"


def _exported(run: Path, model: int) -> dict:
    from safetensors.torch import load_file

    from codistill.cli import main

    out = run / f"m{model}.safetensors"
    assert main(["export", str(run), "--model", str(model), "--out", str(out)]) == 0
    return load_file(str(out))


def test_cli_resumes_a_sharded_run_at_another_number_of_workers(tmp_path, capsys):
    """A sharded 2 x 2 run interrupted after its step-4 checkpoint, resumed 2 x 1 with --nproc 2:
    the uninterrupted 2 x 2 run's weights up to reduction order. A model batch that does not split
    over the new workers, and a DDP run at another --nproc, are one-line errors."""
    from codistill.cli import main
    from codistill.config import dump_yaml, load_config, replace, to_dict
    from codistill.run_log import write_run_marker

    # An MLP: BatchNorm's statistics over 16 or 32 examples would differ, so only a model without it can match.
    sets = ["train.parallel=fsdp", "model.name=mlp", "train.steps=8", "train.checkpoint_every=4",
            "train.eval_every=8", "codistill.exchange_every=3", "train.progress=false", "dist.threads=1",
            "train.trackers=[]"]
    cfg = load_config(CONFIG, sets)
    # The uninterrupted twin trains with DDP (the same weights up to reduction order; its checkpoint
    # is DDP's, refused below at another --nproc). The sharded run stops at its step-4 checkpoint, as
    # an interrupted one does; its directory then holds what `codistill train` writes.
    whole, cut = replace(cfg, train__parallel="ddp"), replace(cfg, train__steps=4)
    run_workers(_twins, 4, tmp_path, ([whole, cut], str(tmp_path / "run")), timeout=500)
    whole_dir, resumed = tmp_path / "run/0", tmp_path / "run/1"
    for directory, config in ((whole_dir, whole), (resumed, cfg)):
        (directory / "config.yaml").write_text(dump_yaml(config))
        write_run_marker(directory, config=to_dict(config))
    (resumed / "summary.json").unlink()  # not finished: 8 steps are configured
    capsys.readouterr()

    assert main(["train", "--resume", str(resumed), "--nproc", "6"]) == 2  # 3 workers per model: 32 / 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model batch of 32" in err[0] and "3 worker(s) per model" in err[0], err
    assert main(["train", "--resume", str(whole_dir), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.parallel=ddp" in err[0] and "--nproc 2" in err[0], err

    assert main(["train", "--resume", str(resumed), "--nproc", "2"]) == 0
    for model in (0, 1):
        a, b = _exported(whole_dir, model), _exported(resumed, model)
        for k, v in a.items():
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)
