"""Pre-launch warnings: untrained teachers (T >= S) and comparisons too short to mean anything."""

from __future__ import annotations

from mp_helpers import digits_config

from codistill.arms import arm_configs
from codistill.config import replace
from codistill.prelaunch import MIN_PERIODS, untrained_teacher_warning, warn_before_launch


def test_warns_when_teachers_never_hold_trained_weights():
    cfg = replace(digits_config(), codistill__exchange_every=50)
    message = untrained_teacher_warning(cfg, 42)  # the user data set: 42 updates, T = 50
    assert "never hold trained weights" in message and "alpha_steps=50" in message
    assert "never hold" in untrained_teacher_warning(cfg, 50)


def test_threshold_is_four_exchange_periods():
    cfg = replace(digits_config(), codistill__exchange_every=50)
    assert MIN_PERIODS == 4
    message = untrained_teacher_warning(cfg, 199)
    assert "fewer than 4 exchange periods" in message and "(25% of the run)" in message
    assert "trained in only 3 exchange(s)" in message
    assert untrained_teacher_warning(cfg, 200) is None


def test_no_warning_without_distillation():
    cfg = replace(digits_config(), codistill__exchange_every=50)
    for quiet in (replace(cfg, codistill__alpha=0.0), replace(cfg, codistill__n_models=1),
                  replace(cfg, codistill__method="diloco")):
        assert untrained_teacher_warning(quiet, 10) is None


def test_compare_warns_once_before_any_arm(capsys):
    cfg = replace(digits_config(), codistill__exchange_every=50, train__steps=30, codistill__alpha_steps=None,
                  compare__arms=["allreduce", "codistill", "diloco"])  # alpha_steps: no warning that it does nothing
    assert warn_before_launch([c for _, c in arm_configs(cfg, 4)], 4) is not None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("codistill: warning: codistill.exchange_every=50 >= the run's 30")
    long_enough = replace(cfg, codistill__exchange_every=5)
    assert warn_before_launch([c for _, c in arm_configs(long_enough, 4)], 4) is None
    assert capsys.readouterr().err == ""


def test_epoch_valued_runs_count_their_steps(capsys):
    # digits has no test split: with the test and validation splits carved out, about 1,280 training
    # images remain; at batch 16 x 2 replicas that is 40 steps per epoch, so 1.5 epochs = 60 updates.
    cfg = replace(digits_config(), codistill__exchange_every=60, train__epochs=1.5)
    assert "the run's 60 updates" in warn_before_launch([cfg], 4)


def test_default_distills_from_the_first_exchange_of_trained_weights():
    from codistill.config import load_config
    from codistill.recipe import build_schedules

    cfg = load_config(None, ["codistill.exchange_every=30"])
    assert (cfg.codistill.alpha_schedule, cfg.codistill.alpha_steps) == ("burnin", None)
    alpha = build_schedules(cfg, steps_per_epoch=100, model_batch=cfg.data.batch_size).alpha
    assert [alpha(s) for s in (0, 29, 30, 99)] == [0.0, 0.0, cfg.codistill.alpha, cfg.codistill.alpha]
    explicit = build_schedules(replace(cfg, codistill__alpha_steps=5), 100, cfg.data.batch_size).alpha
    assert (explicit(4), explicit(5)) == (0.0, cfg.codistill.alpha)
    # Asynchronous exchange: step 30's weights are swapped in at step 30 + D; until then the teachers
    # still hold step 0's random initializations.
    delayed = build_schedules(replace(cfg, codistill__exchange_delay=10), 100, cfg.data.batch_size).alpha
    assert (delayed(39), delayed(40)) == (0.0, cfg.codistill.alpha)


def test_default_burnin_warns_that_short_runs_barely_distill():
    cfg = replace(digits_config(), codistill__exchange_every=50, codistill__alpha_schedule="burnin",
                  codistill__alpha_steps=None)
    message = untrained_teacher_warning(cfg, 42)
    assert "no step distills" in message and "alpha_schedule=burnin codistill.alpha_steps" not in message
    message = untrained_teacher_warning(cfg, 199)
    assert "fewer than 4 exchange periods" in message and "149 distilling steps" in message
    assert untrained_teacher_warning(cfg, 200) is None
