"""Every benchmark's quick mode runs through the real command line and produces its table.

These check that the benchmarks work, not the speeds they measure (the targets live in the
benchmarks' own output, docs/performance.md). The slow-network benchmark needs root and iproute2:
it creates network namespaces. CI runs as root, so a missing privilege or tool is a failure with a
message saying what is missing, never a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HEADERS = {
    "step_overhead": "| model | n | own step (ms) | teacher fwd (ms) | floor (ms) | codistill step (ms) | efficiency |",
    "bytes": "| W | mode | models x workers | real run | all-reduce B/step: counted / formula |",
    "slow_network": "| link | arm | models x workers | updates | s/step |",
    "stall": "| exchange_delay D | steps | exchanges | blocked, whole run | blocked, steady state |",
    "torchft_diloco": "| implementation | final test acc per seed (%) | mean ± std (%) | wall (s) |",
}


def bench(name: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "codistill.cli", "bench", name, "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def check_table(name: str, proc: subprocess.CompletedProcess, out: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert HEADERS[name] in proc.stdout, proc.stdout[-3000:]
    md = (out / f"{name}.md").read_text()
    assert HEADERS[name] in md and "Machine: " in md and "Command: `codistill bench" in md
    result = json.loads((out / f"{name}.json").read_text())
    assert result["name"] == name and result["machine"]["nproc"] >= 1
    return result


def test_step_overhead_quick(tmp_path):
    import statistics

    result = check_table("step_overhead", bench("step_overhead", tmp_path, 240), tmp_path)
    md = (tmp_path / "step_overhead.md").read_text()
    for name, r in result["data"]["results"].items():
        assert set(r["efficiency"]) == {"2", "4"}
        med = r["median_s"]
        for n, e in r["efficiency"].items():
            per_repeat = r["efficiency_per_repeat"][n]
            assert len(per_repeat) == 3 and e == statistics.median(per_repeat)  # quick: 3 repeats
            assert f"| {name} | {n} |" in md and f"{e:.3f}" in md  # the table shows what was measured
        # The measured step really ran the teachers: n - 1 teacher forwards per step, counted (a check of
        # what was timed, not of a speed target).
        assert r["teacher_forwards_per_step"] == {"2": 1, "4": 3}
        assert all(v > 0 for v in med.values())
    # The teacher-cost table: every cheaper-teacher setting timed against the all-reduce step, and each
    # setting's timed block really ran the teachers as often as it says (counted with hooks).
    cost = result["data"]["teacher_cost"]["cnn_tiny"]
    forwards = cost["teacher_forwards_per_block"]
    assert forwards["allreduce"] == 0 and forwards["teacher_every 2"] == 2 and forwards["teacher_every 4"] == 1
    assert forwards["fp32, full batch, every step (paper)"] == 4 and forwards["distill_fraction 0.25"] == 4
    assert "teacher_topk 32" not in cost["ratio"]  # language models only
    for name, ratio in cost["ratio"].items():
        assert ratio == statistics.median(cost["ratio_per_repeat"][name]) > 0
        assert f"| cnn_tiny | {name} |" in md and f"{ratio:.2f}" in md


def test_bytes_quick_counters_agree_with_formulas(tmp_path):
    result = check_table("bytes", bench("bytes", tmp_path, 240), tmp_path)
    runs = result["data"]["runs"]
    assert {(r["world"], r["n_models"]) for r in runs} == {(2, 1), (2, 2)}
    assert result["data"]["agree"] and all(r["agree"] for r in runs)  # exact, not a speed


def test_stall_quick(tmp_path):
    result = check_table("stall", bench("stall", tmp_path, 240), tmp_path)
    delays = [r["delay"] for r in result["data"]["runs"]]
    assert delays[0] == 0 and len(delays) >= 2
    assert all(0 <= r["whole_run"] < 1 for r in result["data"]["runs"])


def test_torchft_diloco_quick_agrees_bit_for_bit(tmp_path):
    # torchft's lighthouse, managers and DiLoCo against our OuterSync: same model, data and seeds.
    result = check_table("torchft_diloco", bench("torchft_diloco", tmp_path, 400), tmp_path)
    assert result["data"]["error"] is None
    assert result["data"]["max_param_diff"] == [0.0]
    ours, theirs = (result["data"]["runs"][impl]["0"]["curve"] for impl in ("ours", "torchft"))
    assert ours == theirs and len(ours) == 4  # one point per outer step (40 steps, H = 10)


def test_training_clock_counts_waiting_for_a_peer_as_training(tmp_path):
    from codistill.curves import training_clock

    rows = [{"step": 10, "train/loss": 1.0, "time": 1.0},
            {"step": 10, "val/accuracy": 0.5, "eval_start": 4.0, "time": 5.0},  # waited 3 s for a slow peer
            {"step": 20, "train/loss": 0.9, "time": 6.0},
            {"step": 20, "val/accuracy": 0.6, "time": 6.5}]  # a row from before eval_start existed
    (tmp_path / "model_0").mkdir()
    (tmp_path / "model_0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = training_clock(tmp_path)
    assert [e["time_without_eval"] for e in evals] == [4.0, 5.0]  # evaluations cost 1 s and 0.5 s


def test_slow_network_quick(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("bench slow_network creates network namespaces: run the tests as root (CI does)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian package iproute2")
    result = check_table("slow_network", bench("slow_network", tmp_path, 300), tmp_path)
    runs = result["data"]["runs"]
    assert {r["arm"] for r in runs} == {"allreduce", "codistill"}
    assert len({r["steps"] for r in runs}) == 1  # matched updates
    assert all(r["link_bytes"] > 0 for r in runs)  # traffic really crossed the emulated link
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cdbench0" not in listed and "cdbench1" not in listed  # the benchmark removed its namespaces


def test_gpu_resnet50_script(tmp_path):
    import torch

    script = [sys.executable, "-m", "codistill.bench.gpu_resnet50"]
    if not torch.cuda.is_available():  # says why nothing was measured, and fails the command
        proc = subprocess.run(script, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert "no CUDA device is visible" in proc.stderr and "nothing was measured" in proc.stderr
    tiny = ["--model", "resnet8", "--image-size", "32", "--classes", "10", "--batch", "4", "--repeats", "2",
            "--iters", "1", "--warmup", "1"]
    # The script's logic at toy size (on CPU: a gloo dry run, never written into the doc).
    proc = subprocess.run([*script, *tiny, "--allow-cpu", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | device | W | n x workers |" in proc.stdout
    result = json.loads((tmp_path / "gpu_resnet50.json").read_text())
    med = result["median_s"]
    for variant, rate in result["images_per_s"].items():  # throughput is the batch over the median step
        assert rate == pytest.approx(result["batch"] / med[variant], rel=1e-12)
    n = result["n_models"]
    best = min(med["codistill"], med.get("codistill_stream", float("inf")))
    assert result["efficiency_stream"] == pytest.approx((med["own"] + (n - 1) * med["teacher"]) / best, rel=1e-12)
