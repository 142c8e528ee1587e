"""What a finished run's metrics.jsonl says over time: its evaluations on the training clock, and
its validation curves. Read by `codistill compare`, the benchmarks and the cost model's inputs."""

from __future__ import annotations

from pathlib import Path

from .run_log import read_jsonl


def training_clock(run_dir: Path, model: int = 0) -> list[dict]:
    """Model `model`'s evaluations with the training clock, with and without the time spent evaluating.

    metrics.jsonl's "time" runs from the start barrier and includes evaluations; an evaluation lasts
    from its `eval_start` (after the barrier that lets every worker catch up: waiting for a slower
    peer is training time) to its validation row, so its duration is known and can be taken out:
    evaluating is measuring, not training, and its cost differs between the arms (a model's
    evaluation is split over its own workers only). Rows written before `eval_start` existed count
    from the training row of the same step instead.
    """
    rows = read_jsonl(Path(run_dir) / f"model_{model}" / "metrics.jsonl")
    train_time = {r["step"]: r["time"] for r in rows if "train/loss" in r}
    evals, spent = [], 0.0
    for r in rows:
        if "val/accuracy" in r:
            spent += r["time"] - r.get("eval_start", train_time.get(r["step"], r["time"]))
            evals.append({"step": r["step"], "accuracy": r["val/accuracy"], "time": r["time"],
                          "time_without_eval": r["time"] - spent})
    return evals


def first_reaching(evals: list[dict], target: float) -> dict | None:
    return next((e for e in evals if e["accuracy"] >= target), None)


def validation_curve(run_dir: Path, model: int, metric: str) -> list[list[float]]:
    """[[step, value], ...] of `metric` ("val/accuracy" or "val/loss") from model `model`'s log."""
    rows = read_jsonl(Path(run_dir) / f"model_{model}" / "metrics.jsonl")
    return [[r["step"], r[metric]] for r in rows if r.get(metric) is not None]


def compute_seconds_per_step(run_dir: Path, model: int = 0) -> float | None:
    """Model `model`'s training clock per step without evaluations and without the time blocked in
    its exchange or outer step: its own forward, backward and optimizer step, its teachers'
    forwards and the gradient all-reduce inside its model group. None without an evaluation."""
    rows = read_jsonl(Path(run_dir) / f"model_{model}" / "metrics.jsonl")
    evals = training_clock(run_dir, model)
    if not evals or not evals[-1]["step"]:
        return None
    last = evals[-1]
    blocked = max((r.get("exchange_blocked_s", 0.0) for r in rows
                   if "train/loss" in r and r["step"] <= last["step"]), default=0.0)
    return max(last["time_without_eval"] - blocked, 0.0) / last["step"]
