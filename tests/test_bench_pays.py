"""Quick modes of `bench sweep` and `bench straggler`: the machinery works and produces its tables.

Like test_bench_quick.py's slow-network test, they need root and iproute2 (network namespaces) and,
for the straggler, a cgroup cpu controller; CI runs as root, so a missing privilege is a failure
saying what is missing, never a silent skip. They check the tables, not the speeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from codistill.bench.straggler import cgroup_version


@pytest.fixture(autouse=True)
def _needs_root_and_iproute2():
    if os.geteuid() != 0:
        pytest.fail("these benchmarks create network namespaces: run the tests as root (CI does)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install the Debian package iproute2")


def bench(name, out, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "codistill.cli", "bench", name, "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cdbench0" not in listed and "cdbench1" not in listed  # namespaces removed
    return proc, json.loads((out / f"{name}.json").read_text())


def test_sweep_quick(tmp_path):
    proc, result = bench("sweep", tmp_path)
    assert "| profile | link | arm | models x workers | updates | s/step | predicted s/step |" in proc.stdout
    runs = result["data"]["runs"]
    assert {(r["arm"], r["calibration"]) for r in runs} == {(a, c) for a in ("allreduce", "codistill", "diloco")
                                                             for c in (True, False)}
    assert len({r["steps"] for r in runs}) == 1  # matched updates
    shaped = [r for r in runs if not r["calibration"]]
    assert all(r["predicted_s_per_step"] > r["compute_s"] >= 0 for r in shaped)  # the link adds time
    ar = next(r for r in shaped if r["arm"] == "allreduce")
    cd = next(r for r in shaped if r["arm"] == "codistill")
    assert ar["link_bytes_per_step"] > cd["link_bytes_per_step"] > 0  # the veth saw the exchange, less traffic
    assert ar["predicted_link_bytes_per_step"] > cd["predicted_link_bytes_per_step"] > 0
    diloco = next(r for r in shaped if r["arm"] == "diloco")  # an outer step every H: bytes of its order
    assert ar["link_bytes_per_step"] > diloco["link_bytes_per_step"] > 0
    assert diloco["predicted_s_per_step"] > diloco["compute_s"]
    assert result["data"]["median_error_s_per_step"] is not None
    assert "median absolute error of the cost model" in proc.stdout
    assert (tmp_path / "sweep_time_to_target.png").stat().st_size > 0
    # A rerun into the same directory resumes from the recorded cells: nothing is trained again.
    again, resumed = bench("sweep", tmp_path)
    assert f"{len(runs)} cells already measured" in again.stdout and "s/step (predicted" not in again.stdout
    assert [r["s_per_step"] for r in resumed["data"]["runs"]] == [r["s_per_step"] for r in runs]


def test_report_without_results_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "codistill.bench.sweep", "--report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("(the benchmark's output directory holds it)")
    assert "no sweep.json there" in proc.stderr


def test_straggler_quick(tmp_path):
    version = cgroup_version()
    proc, result = bench("straggler", tmp_path)
    assert "| arm | machines | CPUs machine 0 / 1 |" in proc.stdout
    runs = result["data"]["runs"]
    assert result["data"]["cgroup_version"] == version
    assert {(r["arm"], r["condition"]) for r in runs} == {
        (a, c) for a in ("allreduce", "groups") for c in ("even", "machine 1 at half speed")}
    slow = next(r for r in runs if r["condition"] != "even")
    assert slow["cores"][1] == slow["cores"][0] / 2
    groups = [r for r in runs if r["arm"] == "groups"]
    assert all(len(r["s_per_step"]) == 2 for r in groups)  # two independent jobs, one per machine
    launched = json.loads((tmp_path / "straggler" / "r0" / "straggler" / "groups" / "groups.json").read_text())
    assert [g["status"] for g in launched["groups"]] == ["finished", "finished"]  # through the launcher
    left = [name for name in ("codistill_machine0", "codistill_machine1")
            if os.path.isdir(f"/sys/fs/cgroup/cpu/{name}") or os.path.isdir(f"/sys/fs/cgroup/{name}")]
    assert left == []  # the cgroups were removed


def test_hierarchical_check_compares_link_bytes_and_training():
    from codistill.bench.sweep import hierarchical_check

    def cell(arm, link, predicted, losses):
        return {"profile": "cnn", "arm": arm, "calibration": True, "replicas": 2, "link_bytes_per_step": link,
                "predicted_link_bytes_per_step": predicted, "val_losses": losses}

    same = hierarchical_check([cell("codistill", 1000.0, 800.0, [0.5, 0.6]),
                               cell("codistill_flat", 1900.0, 1600.0, [0.5, 0.6])])
    assert same[0]["saved_bytes_per_step"] == 900.0 and same[0]["predicted_saved_bytes_per_step"] == 800.0
    assert same[0]["identical_training"] and "identical (every validation loss equal)" in same[0]["note"]
    differ = hierarchical_check([cell("codistill", 1000.0, 800.0, [0.5, 0.6]),
                                 cell("codistill_flat", 1900.0, 1600.0, [0.5, 0.61])])
    assert not differ[0]["identical_training"] and "NOT identical" in differ[0]["note"]
    assert hierarchical_check([cell("codistill", 1000.0, 800.0, [0.5])]) == []  # no flat cell: nothing to say


def test_time_to_target_uses_a_level_every_arm_reaches():
    from codistill.bench.sweep import retarget

    def cell(arm, calibration, accs, step_s):
        evals = [{"step": 10 * (i + 1), "accuracy": a, "time_without_eval": 10 * (i + 1) * step_s}
                 for i, a in enumerate(accs)]
        return {"profile": "cnn", "arm": arm, "calibration": calibration, "evals": evals,
                "predicted_s_per_step": None if calibration else step_s}

    records = [cell("allreduce", True, [0.6, 0.76, 0.8], 0.2), cell("codistill", True, [0.5, 0.7, 0.737], 0.2),
               cell("allreduce", False, [0.6, 0.76, 0.8], 1.0), cell("codistill", False, [0.5, 0.7, 0.737], 0.25)]
    retarget(records, 0.75)
    assert {r["target"] for r in records} == {0.735}  # codistillation's best, rounded down to 0.5 points
    slow_ar, slow_cd = records[2], records[3]
    assert (slow_ar["step_at_target"], slow_ar["time_to_target"]) == (20, 20.0)
    assert (slow_cd["step_at_target"], slow_cd["time_to_target"]) == (30, 7.5)
    assert slow_cd["predicted_time_to_target"] == 7.5
    retarget(records, 0.7)  # reached by both: the configured target stays
    assert {r["target"] for r in records} == {0.7}


def test_straggler_times_use_a_level_every_arm_reaches_without_the_straggler():
    from codistill.bench.straggler import retarget

    def evals(accs, step_s):
        return [{"step": 10 * (i + 1), "accuracy": a, "time_without_eval": 10 * (i + 1) * step_s}
                for i, a in enumerate(accs)]

    records = [{"arm": "allreduce", "condition": "even", "evals": [evals([0.7, 0.8], 0.1)]},
               {"arm": "codistill_storage", "condition": "even", "evals": [evals([0.6, 0.72], 0.1),
                                                                          evals([0.6, 0.7], 0.1)]},
               {"arm": "codistill_storage", "condition": "slow", "evals": [evals([0.6, 0.73], 0.11),
                                                                          evals([0.5, 0.6], 0.2)]}]
    retarget(records, 0.75)
    assert {r["target"] for r in records} == {0.72}
    assert records[0]["step_at_target"] == [20]
    assert records[2]["time_to_target"] == [20 * 0.11, None]  # model 1 on the slow machine: not reached


def test_straggler_rows_are_medians_over_complete_repeats():
    """Each row is the median of its repeats; the ratio is median with over median without the
    straggler; an unfinished repeat (a long run stopped early) is left out, and said so."""
    from codistill.bench.straggler import _result, retarget, settings

    def record(arm, condition, repeat, step_s):
        evals = [[{"step": 10 * (i + 1), "accuracy": a, "time_without_eval": 10 * (i + 1) * step_s}
                  for i, a in enumerate([0.6, 0.8])] for _ in range(2)]
        return {"arm": arm, "condition": condition, "repeat": repeat, "cores": [1, 1 if condition == "even" else 0.5],
                "s_per_step": [step_s, step_s], "final_val_accuracy": [0.8, 0.8], "evals": evals, "load_1min": 3.0}

    records = []
    for repeat, (even_s, slow_s) in enumerate([(0.10, 0.104), (0.12, 0.11), (0.11, 0.2)]):
        records += [record("groups", "even", repeat, even_s), record("groups", "slow", repeat, slow_s)]
    records.append(record("groups", "even", 3, 1.0))  # repeat 3 stopped before its straggler run
    result = _result(False, settings(False), retarget(records, 0.75), 1)
    even_row, slow_row = result.table.splitlines()[2:]
    assert "| 0.110 / 0.110 |" in even_row and "| 0.110 / 0.110 |" in slow_row  # medians of 3, repeat 3 left out
    assert "| 1.00 |" in slow_row  # time to target: median 2.2 s with, 2.2 s without
    assert any("1.00x its time without (target: at most 1.05x: met); per repeat" in n and "1.04, 0.92, 1.82" in n
               for n in result.notes)
    assert "partial: the runs of an unfinished repeat are left out" in result.notes
    assert len(result.data["runs"]) == 7  # every run kept for --report
