"""A tracked run through the command line: accumulation, clipping, fp16, the log line's speed, memory
and gradient norm, MLflow (read back with its own client) and wandb offline, the profiler trace,
fp16 resume with the scaler's state; and the one-line errors for bad knob values."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codistill.cli import main

pytestmark = pytest.mark.timeout(600)

BASE = ["--set", "data.name=digits", "--set", "model.name=mlp_tiny", "--set", "train.progress=false",
        "--set", "data.batch_size=16", "--set", "train.log_every=2", "--set", "train.eval_every=6",
        "--set", "train.steps=12", "--set", "train.checkpoint_every=5", "--set", "train.accumulate=2",
        "--set", "optim.clip_norm=1.0", "--set", "train.precision=fp16", "--set", "codistill.exchange_every=3",
        "--nproc", "2"]
LOGGED = ("grad_norm", "samples_per_s_per_worker", "peak_memory_mib", "exchange_blocked_s")


def run(*args, env=None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=500, env=full_env)


def train_rows(run_dir: Path, model: int) -> list[dict]:
    lines = (run_dir / f"model_{model}" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "train/loss" in row]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = run("train", *BASE, "--set", "train.trackers=[tensorboard,mlflow,wandb]", "--set", "train.profile=[2,4]",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_log_line_has_grad_norm_throughput_and_peak_memory(tracked):
    for model in (0, 1):
        rows = train_rows(tracked, model)
        assert [r["step"] for r in rows] == list(range(2, 13, 2))
        for r in rows:
            assert all(isinstance(r[k], float) and r[k] >= 0 for k in LOGGED), r
            assert r["grad_norm"] > 0 and r["samples_per_s_per_worker"] > 0 and r["peak_memory_mib"] > 0
            assert r["grad_norm_max"] >= r["grad_norm"]
            assert r["mfu"] is None and r["tflops_per_worker"] is None  # an MLP has no FLOP count


def test_mlflow_store_holds_the_values_of_metrics_jsonl(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'mlflow.db'}")
    for model in (0, 1):
        run_id = (tracked / f"model_{model}" / "mlflow_run_id").read_text().strip()
        run = client.get_run(run_id)
        assert run.info.run_name == f"run/model_{model}" and run.info.status == "FINISHED"
        assert run.data.params["train.accumulate"] == "2" and run.data.params["train.precision"] == "fp16"
        rows = train_rows(tracked, model)
        for key in (*LOGGED, "train/loss"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert history == [(r["step"], r[key]) for r in rows], key


def test_wandb_offline_run_holds_the_logged_values(tracked):
    rows = train_rows(tracked, 0)
    run_id = (tracked / "model_0" / "wandb_run_id").read_text().strip()
    (data,) = glob.glob(str(tracked / "model_0" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = Path(data).read_bytes()  # wandb's protobuf records hold each value as its JSON text
    for r in rows:
        assert json.dumps(r["grad_norm"]).encode() in records


def test_profiler_trace_is_written_for_the_asked_steps(tracked):
    for rank in (0, 1):
        trace = json.loads((tracked / "profile" / f"rank_{rank}.pt.trace.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("Optimizer.step" in n for n in names)  # two steps were recorded
        assert sum("Optimizer.step" in e.get("name", "") and e.get("ph") == "X"
                   for e in trace["traceEvents"]) >= 2


def test_fp16_resume_restores_the_loss_scale_bitwise(tracked, tmp_path):
    from codistill.checkpoint import latest_model_states

    from mlflow.tracking import MlflowClient

    crashed = tmp_path / "crashed"
    proc = run("train", *BASE, "--set", "train.trackers=[mlflow]", "--out", str(crashed),
               env={"CODISTILL_FAULT": "kill@1:7"})
    assert proc.returncode != 0
    logged_before_crash = [r["step"] for r in train_rows(crashed, 0)]
    proc = run("train", "--resume", str(crashed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, resumed = latest_model_states(tracked), latest_model_states(crashed)
    for name in whole:
        assert whole[name]["scaler"] == resumed[name]["scaler"]
        for key, tensor in whole[name]["model"].items():
            assert torch.equal(tensor, resumed[name]["model"][key]), (name, key)
    # The resume replayed step 6 (logged before the crash, after the step-5 checkpoint): MLflow got it once.
    assert 6 in logged_before_crash
    client = MlflowClient(tracking_uri=f"sqlite:///{crashed / 'mlflow.db'}")
    for model in (0, 1):
        run_id = (crashed / f"model_{model}" / "mlflow_run_id").read_text().strip()
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
        assert history == [(r["step"], r["train/loss"]) for r in train_rows(crashed, model)]


@pytest.mark.parametrize("setting, message", [
    ("train.accumulate=0", "train.accumulate must be >= 1"),
    ("optim.clip_norm=-1", "optim.clip_norm must be > 0"),
    ("train.precision=fp8", "train.precision must be one of fp32, bf16, fp16"),
    ("train.trackers=[tensorboard,neptune]", "train.trackers: unknown tracker 'neptune'"),
    ("train.profile=[5,5]", "train.profile must be [start, stop]"),
    ("train.amp=true", "train.amp=true means train.precision=bf16"),
])
def test_bad_knob_values_give_one_line_before_anything_is_created(tmp_path, capsys, setting, message):
    out = tmp_path / "never"
    extra = ["--set", "train.precision=fp16"] if setting == "train.amp=true" else []
    assert main(["train", "--set", "data.name=digits", *extra, "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("codistill: error: ") and message in err[0], err
    assert not out.exists()


def test_a_tracker_not_installed_names_the_extra(monkeypatch):
    import importlib.util

    from codistill.errors import ConfigError
    from codistill.trackers import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow, which is not installed; pip install 'codistill\[trackers\]'"):
        check_trackers(["tensorboard", "mlflow"])
