"""Offline (two-stage) distillation: codistill.exchange=frozen fills the teachers once from a finished
run's last checkpoint and never refreshes them; the student trains on the usual objective."""

from __future__ import annotations

import pytest
import torch

from codistill import checkpoint as ckpt
from codistill.cli import main
from codistill.errors import UserError
from codistill.losses import codistillation_loss

pytestmark = pytest.mark.timeout(120)


def _net(j: int) -> torch.nn.Module:
    """Model 0 big, model 1 small: a family of two sizes."""
    hidden = 16 if j == 0 else 4
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 5))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    from codistill.distributed import init_distributed, shutdown

    tmp = tmp_path_factory.mktemp("pg")
    init_distributed("gloo", threads=1, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
    yield tmp
    shutdown()


def _finished_run(root, states: dict[int, dict], step: int = 7, finished: bool = True):
    """A run directory as the trainer leaves it: the last checkpoint's model files and summary.json."""
    run = root / "big-alone"
    where = ckpt.step_dir(run, step)
    where.mkdir(parents=True)
    hashes = {f"model_{j}.pt": ckpt.save_file({"model": s}, where / f"model_{j}.pt") for j, s in states.items()}
    ckpt.commit(run, step, hashes, world_size=1)
    if finished:
        (run / "summary.json").write_text("{}\n")
    return run


def test_the_small_model_distills_from_the_finished_runs_big_model_frozen(single_process, tmp_path):
    import codistill as cd

    torch.manual_seed(5)
    big = _net(0).eval()
    run = _finished_run(tmp_path, {0: big.state_dict(), 1: _net(1).state_dict()})
    c = cd.Codistillation(_net, n_models=2, every=2, alpha=1.0, exchange="frozen", teacher_run=run,
                          model_index=1, seed=0)
    assert c.topo.model_index == 1 and list(c.teachers.modules) == [0]
    x, y = torch.randn(8, 4), torch.randint(5, (8,))
    optimizer = torch.optim.SGD(c.model.parameters(), lr=0.5)
    first = [p.detach().clone() for p in c.model.parameters()]
    with c.attach(optimizer):
        for _ in range(5):  # across two exchange periods: the teacher never changes
            teachers = c.teacher_logits(x)
            assert len(teachers) == 1 and torch.equal(teachers[0], big(x).detach())
            logits = c.model(x)
            losses = c.loss(logits, y, teachers)
            expected = codistillation_loss(logits.float(), [big(x).detach()], y, alpha=1.0)
            assert torch.equal(losses["distill"], expected["distill"]) and losses["distill"] > 0
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
    assert c.step == 5 and any(not torch.equal(a, b) for a, b in zip(first, c.model.parameters()))
    assert c.teachers.versions == {0: 7}  # the source step of the teacher's weights


def test_a_run_still_training_is_not_a_teacher(single_process, tmp_path):
    import codistill as cd

    run = _finished_run(tmp_path, {0: _net(0).state_dict()}, finished=False)
    with pytest.raises(UserError, match="not a finished run"):
        cd.Codistillation(_net, n_models=2, exchange="frozen", teacher_run=run, model_index=1)


@pytest.mark.parametrize("settings,fragment", [
    (["codistill.exchange=frozen", "codistill.model_index=1"], "needs codistill.teacher_run"),
    (["codistill.exchange=frozen", "codistill.teacher_run=/tmp"], "and codistill.model_index"),
])
def test_frozen_settings_are_one_line_errors(tmp_path, capsys, settings, fragment):
    args = ["train", "--set", "data.name=digits", "--set", "model.name=cnn_tiny"]
    for s in settings:
        args += ["--set", s]
    code = main([*args, "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    assert fragment in lines[0]
    assert not (tmp_path / "run").exists()
