"""What `codistill compare` says about its own result: the budget rule on every arm, the pre-launch
warning for runs too short for their recipe, the compute per step relative to all-reduce, the cost
model's projections at three link rates, the default arms, and an import graph without loops."""

from __future__ import annotations

import json

import pytest

import codistill.cost_model as cm
from codistill.config import load_config, replace
from codistill.convergence import judge_arm, not_converged_line, short_run_warning

from test_import_graph import cycles, import_graph



# -- the budget rule on every arm ------------------------------------------------------------------

def test_arm_converges_only_when_every_model_has():
    flat = [[0, 0.5], [60, 0.901], [75, 0.9], [100, 0.902]]  # +0.2 points over the last quarter... from 75
    rising = [[0, 0.5], [75, 0.85], [100, 0.88]]  # +3 points
    one = judge_arm([flat], 100, "val/accuracy")
    assert one.changes == (pytest.approx(0.002),) and one.converged is False  # 0.2 points is not < 0.2
    flat[-1][1] = 0.9019
    assert judge_arm([flat], 100, "val/accuracy").converged is True
    both = judge_arm([flat, rising], 100, "val/accuracy")
    assert both.worst == pytest.approx(0.03) and both.converged is False
    assert both.cell() == "no (+3.00 pts)"
    assert judge_arm([flat], 100, "val/accuracy").cell() == "yes (+0.19 pts)"
    # No evaluation at or before 3/4 of the run: the rule cannot say, and does not say yes.
    late = judge_arm([flat, [[80, 0.7], [100, 0.8]]], 100, "val/accuracy")
    assert late.converged is None and late.cell() == "unknown"
    nll = judge_arm([[[0, 3.0], [75, 2.5], [100, 2.49]]], 100, "val/loss")  # fell 0.01 nats
    assert nll.converged is True and nll.cell() == "yes (NLL -0.010)"


def test_line_under_the_table_names_the_arms_that_had_not_converged():
    done = judge_arm([[[0, 0.5], [75, 0.9], [100, 0.9]]], 100, "val/accuracy")
    still = judge_arm([[[0, 0.5], [75, 0.6], [100, 0.66]]], 100, "val/accuracy")
    unknown = judge_arm([[[90, 0.6], [100, 0.66]]], 100, "val/accuracy")
    assert not_converged_line({"allreduce": done, "codistill": done}) is None
    line = not_converged_line({"allreduce": still, "codistill": done, "diloco": unknown})
    assert line.startswith("**Budget:** allreduce had not converged (validation accuracy still rising")
    assert "diloco could not be judged" in line and "codistill" not in line
    assert "measure this budget, not the methods" in line


def test_compare_judges_each_model_from_its_log(tmp_path):
    from codistill.compare import arm_convergence

    for m, accs in enumerate([(0.5, 0.8, 0.8), (0.5, 0.7, 0.75)]):
        (tmp_path / f"model_{m}").mkdir()
        rows = [{"step": 10, "train/loss": 1.0, "time": 1.0}] + [
            {"step": s, "val/accuracy": a, "val/loss": 1.0, "time": 2.0} for s, a in zip((10, 30, 40), accs)]
        (tmp_path / f"model_{m}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"steps": 40, "models": [{"index": 0}, {"index": 1}]}
    verdict = arm_convergence(tmp_path, summary, "val/accuracy")
    assert verdict.changes == (pytest.approx(0.0), pytest.approx(0.05)) and verdict.converged is False


# -- the pre-launch warning ------------------------------------------------------------------------

def test_short_run_warning_for_the_recipe():
    cfg = load_config(None, [])  # the default recipe: goyal, two milestones, three LR stages
    # The case: 42 updates of the default recipe (8,000 MNIST images)
    line = short_run_warning(cfg, 42)
    assert line.startswith("the comparison runs 42 updates, fewer than 300 for this recipe "
                           "(100 per learning-rate stage x 3 stages)")
    assert short_run_warning(cfg, 299) is not None and short_run_warning(cfg, 300) is None
    assert short_run_warning(cfg, 315) is None  # the default compare (1.5 epochs of Fashion-MNIST)
    cosine = replace(cfg, schedule__name="cosine")
    assert "100 for a one-stage cosine schedule" in short_run_warning(cosine, 99)
    assert short_run_warning(cosine, 100) is None


def test_the_default_recipe_on_a_small_dataset_warns_before_launch():
    from codistill.arms import arm_configs

    cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny"])  # about 1,300 training images
    steps = max(c.train.steps for _, c in arm_configs(cfg, 4))
    assert 5 <= steps <= 10  # 1.5 epochs of 4 x 64 images per update
    assert short_run_warning(cfg, steps).startswith(f"the comparison runs {steps} updates, fewer than 300")


# -- compute per step and the projections ----------------------------------------------------------

def test_compute_per_step_leaves_out_evaluations_and_exchange_waits(tmp_path):
    from codistill.curves import compute_seconds_per_step

    rows = [{"step": 10, "train/loss": 1.0, "exchange_blocked_s": 0.2, "time": 1.0},
            {"step": 10, "val/accuracy": 0.5, "eval_start": 1.0, "time": 1.5},
            {"step": 20, "train/loss": 0.9, "exchange_blocked_s": 0.3, "time": 2.5},
            {"step": 20, "val/accuracy": 0.6, "eval_start": 2.5, "time": 3.0}]
    (tmp_path / "model_0").mkdir()
    (tmp_path / "model_0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compute_seconds_per_step(tmp_path) == pytest.approx((3.0 - 1.0 - 0.3) / 20)


def _summary(mode, n, exchange, exchanges, every=50):
    return {"mode": mode, "n_models": n, "world_size": 4, "replicas": 4 // n, "steps": 100,
            "exchanges": exchanges, "exchange": "collective", "exchange_every": every,
            "bytes_per_worker": {"allreduce": 100 * 1.5e6 if n == 1 else 0.0, "exchange": exchange},
            "models": [{"val_accuracy": 0.9}]}


AR = _summary("allreduce", 1, 0.0, 0)  # G = 1 MB over W = 4: 1.5 MB per ring edge per step
CD = _summary("codistill", 2, 2e6, 2)  # S = 1 MB, exchanged at steps 0 and 50
# P = 1 MB: group 0's 2 workers broadcast it at the start (mean 0.5 MB), then 1 MB per worker per
# outer step at 50 and at the end: mean 2.5 MB over 3 counted exchanges.
DILOCO = _summary("diloco", 2, 2.5e6, 3)
EVALS = {"allreduce": [(50, 0.85), (100, 0.9)], "codistill": [(50, 0.91), (100, 0.88)],
         "diloco": [(50, 0.88), (100, 0.87)]}
COMPUTE = {"allreduce": 0.1, "codistill": 0.12, "diloco": 0.11}


def _projected(rate):
    link = cm.Link(rate, wire_overhead=1.0)
    out = []
    for name, summary in (("allreduce", AR), ("codistill", CD), ("diloco", DILOCO)):
        evals = [{"step": s, "accuracy": a, "time_without_eval": s * 0.2} for s, a in EVALS[name]]
        out.append(cm.project_arm(name, summary, evals, 0.9 - 0.005, link, groups=2, compute_s=COMPUTE[name]))
    return out


def test_outer_sync_arms_are_projected_with_their_own_formula():
    diloco = _projected(8e6)[2]  # 1 MB/s
    # start: 2 workers x 1 MB into machine 1; two outer all-reduces of 2 x 1 MB each: 6 MB over 100 steps
    assert diloco["s_per_step"] == pytest.approx(0.11 + 6.0 / 100)
    assert diloco["steps_to_target"] is None and (diloco["best_accuracy"], diloco["best_step"]) == (0.88, 50)


def test_projections_at_three_rates_under_the_table():
    from codistill.compare import PROJECTED_RATES, projections_table

    assert PROJECTED_RATES == (1e9, 1e8, 1e7)
    projections = [{"bits_per_s": rate, "arms": _projected(rate)} for rate in PROJECTED_RATES]
    text = projections_table(projections, {"name": "allreduce", "summary": AR}).splitlines()
    assert text[0].startswith("Projected time to 89.50% validation accuracy (the allreduce arm's final 90.00%")
    assert text[2] == "| arm | compute s/step (measured) | step at target | 1 Gbit/s | 100 Mbit/s | 10 Mbit/s |"
    # all-reduce: 0.1 s + 1.5 MB per step over the link, 100 steps; codistillation: 0.12 s + 2 MB
    # every 50 steps, 50 steps (its first evaluation at the target)
    assert text[4] == "| allreduce | 0.100 | 100 | 11.2 s | 22.0 s | 130 s |"
    assert text[5] == ("| codistill | 0.120 | 50 | 6.0 s (1.86x) | 6.2 s (3.57x) | 7.6 s (17.11x) |")
    assert text[6] == ("| diloco | 0.110 | not reached (best 88.00% at step 50) | not reached | not reached | "
                       "not reached |")


# -- the default arms ------------------------------------------------------------------------------

def test_default_arms_are_allreduce_codistillation_diloco_and_local_sgd():
    from codistill.arms import arm_configs, without_outer_sync_for_mixed_models

    cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny"])
    assert cfg.compare.arms == ["allreduce", "codistill", "diloco", "localsgd"]
    arms = dict(arm_configs(cfg, 4))
    assert list(arms) == ["allreduce", "codistill", "diloco", "localsgd"]
    assert [arms[a].codistill.method for a in ("codistill", "diloco", "localsgd")] == ["distill", "diloco", "localsgd"]
    regularized = replace(cfg, compare__arms=["allreduce", "codistill", "codistill_regularized"])  # opt-in
    assert [name for name, _ in arm_configs(regularized, 4)][-1] == "codistill_regularized"
    assert without_outer_sync_for_mixed_models(cfg) == (cfg, None)
    mixed = replace(cfg, model__name=["cnn_tiny", "mlp"])
    kept, message = without_outer_sync_for_mixed_models(mixed)
    assert kept.compare.arms == ["allreduce", "codistill"]
    assert message.startswith("leaving out diloco, localsgd: they average parameters")


# -- layers import only downward -------------------------------------------------------------------

def test_compare_and_the_benchmarks_import_only_downward():
    graph = import_graph()
    assert "codistill.bench.slow_network" not in graph["codistill.compare"]
    for module in ("codistill.compare", "codistill.arms", "codistill.curves", "codistill.convergence",
                   "codistill.bench.slow_network", "codistill.bench.sweep", "codistill.experiments.budget"):
        assert not any(module in loop for loop in cycles(graph)), module
    # The benchmarks and the suite take the matched arms from below compare, not from it.
    users = [m for m, edges in graph.items() if "codistill.compare" in edges]
    assert sorted(users) == ["codistill.cli"], users


def test_compare_report_from_finished_arms(tmp_path):
    """The text `compare` prints after its arms ran, from their summaries and logs alone."""
    from codistill.compare import judge_and_project

    cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny", "compare.arms=[allreduce, codistill]"])
    curves = {"allreduce": [(50, 0.85), (75, 0.9), (100, 0.9)], "codistill": [(50, 0.8), (75, 0.85), (100, 0.88)]}
    results = []
    for name, summary in (("allreduce", AR), ("codistill", CD)):
        summary = {**summary, "models": [{"index": 0, "val_accuracy": curves[name][-1][1], "test_accuracy": 0.9,
                                          "train_loss": 0.5, "param_distance": 1.0}],
                   "ensemble_val_accuracy": 0.9, "wall_seconds": 12.0}
        rows = []
        for step, acc in curves[name]:
            blocked = 0.5 if name == "codistill" else 0.0
            rows += [{"step": step, "train/loss": 1.0, "exchange_blocked_s": blocked, "time": step * 0.1},
                     {"step": step, "val/accuracy": acc, "eval_start": step * 0.1, "time": step * 0.1}]
        (tmp_path / name / "model_0").mkdir(parents=True)
        (tmp_path / name / "model_0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results.append({"name": name, "summary": summary})
    report, text = judge_and_project(results, {"allreduce": cfg, "codistill": cfg}, tmp_path, "val/accuracy", None)
    lines = text.splitlines()
    assert lines[2].endswith("| 12 | 1.00x | yes (+0.00 pts) |")  # 10 s of training over 100 steps
    assert lines[3].endswith("| 12 | 0.95x | no (+3.00 pts) |")  # 0.5 s of it waiting for the exchange
    assert lines[5].startswith("**Budget:** codistill had not converged")
    assert "| arm | compute s/step (measured) | step at target | 1 Gbit/s | 100 Mbit/s | 10 Mbit/s |" in lines
    assert [p["bits_per_s"] for p in report["projections"]] == [1e9, 1e8, 1e7] and "link" not in report
    assert report["arms"][1]["convergence"] == {"metric": "val/accuracy", "changes": [pytest.approx(0.03)],
                                                "converged": False}
