"""Plots read finished runs' metrics.jsonl files only; nothing here runs during training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .run_log import read_jsonl  # noqa: E402

CURVES = {
    "train_loss.png": ("train/task_loss", "training loss (task)"),
    "val_accuracy.png": ("val/accuracy", "validation accuracy"),
    "param_distance.png": ("param_distance", "||theta_t - theta_0||"),
    "val_perplexity.png": ("val/perplexity", "validation perplexity"),
}
ONLY_IF_LOGGED = {"val_perplexity.png"}  # sequence tasks log it; image runs get no empty plot


def series(metrics_file: Path, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in read_jsonl(metrics_file) if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_lines(out: Path, lines: list[tuple[str, Path]]) -> list[Path]:
    """One PNG per curve in `out`, one line per (label, metrics.jsonl) that exists."""
    written = []
    for filename, (key, label) in CURVES.items():
        curves = {name: series(path, key) for name, path in lines if path.is_file()}
        if filename in ONLY_IF_LOGGED and not any(steps for steps, _ in curves.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(out / filename)
    return written


def plot_compare(out: str | Path, arms: list[str], model: int = 0) -> list[Path]:
    """One PNG per curve, one line per arm (model `model` of each arm)."""
    out = Path(out)
    return plot_lines(out, [(arm, out / arm / f"model_{model}" / "metrics.jsonl") for arm in arms])


def plot_run(run_dir: str | Path, models: list[int]) -> list[Path]:
    """The curves of one `codistill train` run beside its summary.json, one line per model."""
    run_dir = Path(run_dir)
    return plot_lines(run_dir, [(f"model {m}", run_dir / f"model_{m}" / "metrics.jsonl") for m in models])
