"""Result rows: one JSON line per finished run in `<out>/<experiment>.jsonl`, and what is read back.

A row holds the run's key config values and summary numbers (per-model lists, model 0 first), so
plots and the report never open a run directory. Rows are appended, one write of one line, then
flushed and fsynced: an interrupted suite leaves whole rows behind and resumes after them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..seeds import DERIVATION

# The distillation loss too: whether the models still pull apart (or together) at the end of a run.
CURVE_KEYS = ("train/task_loss", "train/distill_loss", "val/accuracy", "val/loss", "param_distance")
CURVE_POINTS = 60


def results_file(out: str | Path, experiment: str) -> Path:
    return Path(out) / f"{experiment}.jsonl"


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line durably (a torn last line from a crash is closed off first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=False) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict]:
    """The rows of one results file; a torn line (an interrupted write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def row_key(row: dict) -> tuple[str, str, int]:
    return row["experiment"], row["variant"], row["seed"]


# ---------------------------------------------------------------------------------------------
# Building a row


def config_values(cfg: Config, world: int) -> dict:
    """The config values a reader needs to know what a row measured."""
    from ..schedules import scaled_lr

    n = cfg.codistill.n_models
    replicas = world // n
    model_batch = cfg.data.batch_size * replicas
    s = cfg.schedule
    return {
        "data": cfg.data.name, "fraction": cfg.data.fraction, "model": cfg.model.name,
        "model_options": dict(cfg.model.options), "n_models": n, "world_size": world, "replicas": replicas,
        "batch_per_worker": cfg.data.batch_size, "model_batch": model_batch, "epochs": cfg.train.epochs,
        "steps": cfg.train.steps, "optimizer": cfg.optim.name, "lr": cfg.optim.lr,
        "peak_lr": scaled_lr(cfg.optim.lr, model_batch, s.reference_batch, s.scale_lr),
        "weight_decay": cfg.optim.weight_decay, "schedule": s.name, "milestones": list(s.milestones),
        "warmup_epochs": s.warmup_epochs, "exchange_every": cfg.codistill.exchange_every if n > 1 else None,
        "method": cfg.codistill.method if n > 1 else None,
        "alpha": cfg.codistill.alpha if n > 1 else None, "distill_loss": cfg.codistill.loss if n > 1 else None,
        "label_smoothing": cfg.train.label_smoothing, "train_seed": cfg.train.seed,
        "model_seeds": DERIVATION,  # rows without it seeded model i with train_seed + i
    }


def summary_values(summary: dict) -> dict:
    """The numbers of a run's summary.json that rows keep (lists: one value per model)."""
    models = summary["models"]

    def per_model(key):
        values = [m.get(key) for m in models]
        return values if any(v is not None for v in values) else None

    return {
        "val_accuracy": per_model("val_accuracy"), "test_accuracy": per_model("test_accuracy"),
        "val_loss": per_model("val_loss"), "test_loss": per_model("test_loss"),
        "test_bleu": per_model("test_bleu"), "train_loss": per_model("train_loss"),
        "param_distance": per_model("param_distance"),
        "ensemble_val_accuracy": summary.get("ensemble_val_accuracy"),
        "ensemble_test_accuracy": summary.get("ensemble_test_accuracy"),
        "ensemble_val_loss": summary.get("ensemble_val_loss"),
        "ensemble_test_loss": summary.get("ensemble_test_loss"),
        "ensemble_test_bleu": summary.get("ensemble_test_bleu"),
        "val_disagreement": summary.get("val_disagreement"), "test_disagreement": summary.get("test_disagreement"),
        "bytes_allreduce": summary["bytes_per_worker"]["allreduce"],
        "bytes_exchange": summary["bytes_per_worker"]["exchange"],
        "wall_seconds": summary["wall_seconds"], "steps": summary["steps"],
        "steps_per_epoch": summary["steps_per_epoch"], "epochs_run": summary["epochs"],
    }


def read_curve(run_dir: str | Path, model: int = 0) -> dict | None:
    """Model `model`'s training curves from its metrics.jsonl, thinned to about CURVE_POINTS points
    per key: {key: [[step, value], ...]}."""
    path = Path(run_dir) / f"model_{model}" / "metrics.jsonl"
    if not path.is_file():
        return None
    curves = {key: [] for key in CURVE_KEYS}
    for row in read_rows(path):
        for key in CURVE_KEYS:
            if row.get(key) is not None:
                curves[key].append([row["step"], row[key]])
    for key, points in curves.items():
        stride = max(1, math.ceil(len(points) / CURVE_POINTS))
        curves[key] = points[::stride] + ([points[-1]] if points and (len(points) - 1) % stride else [])
    return curves


# ---------------------------------------------------------------------------------------------
# Reading numbers back


def _first(key):
    return lambda r: r[key][0] if r.get(key) else None


def _mean(key):
    return lambda r: statistics.fmean(r[key]) if r.get(key) else None


def _percent(fn):
    return lambda r: None if fn(r) is None else 100 * fn(r)


def _ensemble(key):
    return lambda r: r.get(key) if r["config"]["n_models"] > 1 else None


def _ens_gain(r):
    if r["config"]["n_models"] < 2 or r.get("ensemble_test_accuracy") is None:
        return None
    return 100 * (r["ensemble_test_accuracy"] - statistics.fmean(r["test_accuracy"]))


def _agreement(r):
    d = r.get("test_disagreement")
    return None if r["config"]["n_models"] < 2 or d is None else 100 * (1 - d)


@dataclass(frozen=True)
class Metric:
    header: str
    value: object  # row -> float | None
    digits: int
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {
    "val_acc0": Metric("val acc, model 0 (%)", _percent(_first("val_accuracy")), 2),
    "test_acc0": Metric("test acc, model 0 (%)", _percent(_first("test_accuracy")), 2),
    "test_acc1": Metric("test acc, model 1 (%)", _percent(lambda r: r["test_accuracy"][1]
                                                       if len(r.get("test_accuracy") or []) > 1 else None), 2),
    # A big and a small model (Family): model 0 is the big one; the last is the small one, the only
    # model of a run distilled offline from a frozen teacher (which trains that model alone).
    "test_acc_big": Metric("test acc, big model (%)", _percent(lambda r: r["test_accuracy"][0]
                                                              if len(r.get("test_accuracy") or []) > 1 else None), 2),
    "test_acc_small": Metric("test acc, small model (%)", _percent(lambda r: r["test_accuracy"][-1]
                                                                  if r.get("test_accuracy") else None), 2),
    "ens_pair_acc": Metric("ensemble of the pair, test acc (%)",
                           _percent(lambda r: r.get("ensemble_test_accuracy")
                                    if len(r.get("test_accuracy") or []) > 1 else None), 2),
    "exchange_mb": Metric("inter-group MB sent per worker", lambda r: r["bytes_exchange"] / 1e6
                          if r.get("bytes_exchange") is not None else None, 2, False),
    "test_acc_mean": Metric("test acc, mean of models (%)", _percent(_mean("test_accuracy")), 2),
    "ens_test_acc": Metric("ensemble test acc (%)", _percent(_ensemble("ensemble_test_accuracy")), 2),
    "ens_gain": Metric("ensemble gain over mean model (points)", _ens_gain, 2),
    "agreement": Metric("test agreement (%)", _agreement, 2),
    "train_loss": Metric("train loss (mean of models)", _mean("train_loss"), 4, False),
    "param_distance": Metric("||theta - theta_0|| (mean)", _mean("param_distance"), 2, False),
    "val_loss0": Metric("val NLL, model 0", _first("val_loss"), 4, False),
    "test_loss0": Metric("test NLL, model 0", _first("test_loss"), 4, False),
    "val_ppl0": Metric("val perplexity, model 0", lambda r: math.exp(r["val_loss"][0]) if r.get("val_loss") else None,
                       2, False),
    "test_bleu0": Metric("test BLEU, model 0", _first("test_bleu"), 2),
    "val_loss_mean": Metric("val NLL, mean of models", _mean("val_loss"), 4, False),
    "test_bleu_mean": Metric("test BLEU, mean of models", _mean("test_bleu"), 2),
    "ens_val_loss": Metric("ensemble val NLL", _ensemble("ensemble_val_loss"), 4, False),
    "ens_test_loss": Metric("ensemble test NLL", _ensemble("ensemble_test_loss"), 4, False),
    "ens_test_bleu": Metric("ensemble test BLEU", _ensemble("ensemble_test_bleu"), 2),
    "wall": Metric("training wall (s)", lambda r: r.get("wall_seconds"), 0, False),
    "compute_ms": Metric("compute per step, model 0 (ms)", lambda r: 1e3 * r["compute_s_per_step"]
                         if r.get("compute_s_per_step") is not None else None, 1, False),
    "steps": Metric("steps", lambda r: r.get("steps"), 0),
}


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, sample standard deviation (None for one seed), count."""

    mean: float
    std: float | None
    n: int

    def fmt(self, digits: int) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: list[float]) -> Stat | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def aggregate(rows: list[dict], metric: str) -> dict[str, Stat]:
    """{variant: Stat of `metric` over the variant's seeds}."""
    fn = METRICS[metric].value
    by_variant: dict[str, list] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(fn(row))
    return {v: s for v, vals in by_variant.items() if (s := stat(vals)) is not None}
