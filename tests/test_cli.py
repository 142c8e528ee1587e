"""The real command line: bad input, the README example under torchrun, and a compare smoke run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false"]


def codistill(*args, timeout=300, cwd=None, start_method=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if start_method:  # the suite forks its workers from a fork server (conftest.py); users spawn them
        env["CODISTILL_START_METHOD"] = start_method
    return subprocess.run([sys.executable, "-m", "codistill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("codistill: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--set", "optim.lrr=1"], ["unknown config key optim.lrr"]),
    (["--set", "optim.lr=fast"], ["optim.lr must be float"]),
    (["--nproc", "3"], ["world size 3 is not divisible by codistill.n_models=2"]),
    (["--set", "codistill.exchange_every=0"], ["codistill.exchange_every must be > 0"]),
    (["--set", "codistill.alpha=-0.5"], ["codistill.alpha must be >= 0"]),
    (["--set", "model.name=vgg"], ["unknown model 'vgg'", "allowed:"]),
    (["--set", "data.name=svhn"], ["unknown dataset 'svhn'", "allowed:"]),
    (["--set", "data.name=fashion_mnist", "--set", "data.root=/nonexistent/fmnist"], ["/nonexistent/fmnist"]),
    (["--config", "/nonexistent/c.yaml"], ["config file not found: /nonexistent/c.yaml"]),
    (["--nproc", "0"], ["--nproc must be > 0"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragments):
    from codistill.cli import main

    # In-process for speed; test_bad_input_exit_status_of_the_real_process covers the process itself.
    code = main(["train", *DIGITS, *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), *fragments)
    assert not (tmp_path / "run").exists()


def test_bad_input_exit_status_of_the_real_process(tmp_path):
    proc = codistill("train", *DIGITS, "--set", "codistill.n_models=3", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "world size 4 is not divisible by codistill.n_models=3")


def test_torchrun_worker_exit_keeps_status_output_and_exit_handlers(tmp_path):
    # Under torchrun's agent the command ends without the interpreter's teardown (gloo's threads can
    # abort a finished worker): its exit status, its buffered output and the exit handlers stay.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "test"}
    bad = subprocess.run([sys.executable, "-m", "codistill.cli", "train", *DIGITS, "--set", "codistill.n_models=3",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(bad, "world size 4 is not divisible by codistill.n_models=3")
    # An object torn down with the interpreter says so: only the standalone process gets there.
    script = ("import sys; from codistill import cli\n"
              "class Teardown:\n    def __del__(self): print('teardown')\n"
              "t = Teardown(); sys.argv = ['codistill', 'config', '--set', 'optim.lr=0.123']; cli.entry()")
    as_worker, standalone = (subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                            timeout=120, env=e) for e in (env, None))
    assert as_worker.returncode == standalone.returncode == 0
    assert standalone.stdout == as_worker.stdout + "teardown\n"  # all the config, flushed, and no teardown
    assert "lr: 0.123" in as_worker.stdout
    handler = ("import atexit, sys; atexit.register(lambda: open(sys.argv[1], 'w').write('ran')); "
               "print('buffered', end=''); from codistill.distributed import exit_skipping_teardown; "
               "exit_skipping_teardown(3)")
    marker = tmp_path / "handler"
    proc = subprocess.run([sys.executable, "-c", handler, str(marker)], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, marker.read_text()) == (3, "buffered", "ran")


def test_missing_data_file_names_the_file(tmp_path, capsys):
    from codistill.cli import main

    root = tmp_path / "fmnist"
    root.mkdir()
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"")
    code = main(["train", *DIGITS, "--set", "data.name=fashion_mnist", "--set", f"data.root={root}",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), str(root / "train-images-idx3-ubyte.gz"))


def test_existing_run_directory_is_never_overwritten_without_flag(tmp_path, capsys):
    from codistill.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    for command in ("train", "compare"):
        code = main([command, *DIGITS, "--out", str(run)])
        err = capsys.readouterr().err
        assert_one_line_error(subprocess.CompletedProcess([], code, "", err), "already exists", "--overwrite")
        assert (run / "precious.txt").read_text() == "keep me"


def test_train_writes_run_directory(tmp_path):
    run = tmp_path / "run"
    # A relative --out (like the default runs/...) must work: the rendezvous file needs an absolute path.
    proc = codistill("train", *DIGITS, "--set", "train.steps=12", "--set", "train.log_every=4",
                     "--nproc", "4", "--out", "run", cwd=tmp_path, start_method="spawn")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "codistill" and summary["n_models"] == 2 and summary["world_size"] == 4
    assert summary["steps"] == 12 and len(summary["models"]) == 2
    for key in ("val_accuracy", "val_loss", "train_loss", "param_distance"):
        assert all(isinstance(m[key], float) for m in summary["models"])
    assert summary["bytes_per_worker"]["allreduce"] > 0 and summary["bytes_per_worker"]["exchange"] > 0
    assert (run / "config.yaml").is_file()
    for m in (0, 1):
        rows = [json.loads(line) for line in (run / f"model_{m}" / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "train/loss" in r]
        assert [r["step"] for r in train_rows] == [4, 8, 12]
        assert {"train/task_loss", "train/distill_loss", "lr", "weight_decay", "alpha", "staleness",
                "bytes/allreduce", "bytes/exchange", "samples_per_s", "param_distance"} <= train_rows[0].keys()
        assert any("val/ensemble_accuracy" in r and "val/disagreement" in r for r in rows)
        train_time = {r["step"]: r["time"] for r in train_rows}
        for r in (r for r in rows if "val/accuracy" in r):  # evaluation starts after the last training row
            assert train_time.get(r["step"], 0.0) <= r["eval_start"] <= r["time"]
        assert list((run / f"model_{m}" / "tensorboard").iterdir())
    # Rerunning with --overwrite replaces the directory.
    proc = codistill("train", *DIGITS, "--set", "train.steps=2", "--nproc", "2", "--out", str(run), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: own-loop -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its own-loop example"
    return match.group(1)


def test_readme_own_loop_example_changes_at_most_five_lines_of_a_ddp_loop():
    code = readme_example()
    marked = [line for line in code.splitlines() if "# codistill" in line]
    assert 1 <= len(marked) <= 5, marked
    # Nothing but the component: no hand-built topology, teachers, exchanger or loss.
    for part in ("build_topology", "Teachers", "Exchanger", "codistillation_loss", "DistributedDataParallel"):
        assert part not in code, part


def test_readme_own_loop_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "own_loop.py"
    script.write_text(readme_example())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = re.findall(r"rank (\d) model (\d): distill ([\d.]+) accuracy ([\d.]+)", proc.stdout)
    assert sorted(int(r[0]) for r in results) == [0, 1, 2, 3]
    for rank, model, distill, accuracy in results:
        assert int(model) == int(rank) // 2
        assert float(accuracy) > 0.8  # learned (chance is 0.1)
        assert float(distill) > 0  # the models really distilled toward each other


def test_compare_smoke_on_digits(tmp_path):
    out = tmp_path / "cmp"
    # 4 epochs (80 updates): every arm's models already pass the bar below by 20 points or more.
    proc = codistill("compare", *DIGITS, "--set", "train.epochs=4", "--set", "data.batch_size=16",
                     "--set", "schedule.milestones=[2.5, 3.5]", "--set", "schedule.warmup_epochs=0",
                     "--set", "codistill.exchange_every=10", "--nproc", "4", "--out", str(out),
                     "--set", "compare.arms=[allreduce, codistill, codistill_regularized, diloco, localsgd]",
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("compare.md", "compare.json", "train_loss.png", "val_accuracy.png", "param_distance.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "compare.json").read_text())
    arms = {a["name"]: a["summary"] for a in report["arms"]}
    assert list(arms) == ["allreduce", "codistill", "codistill_regularized", "diloco", "localsgd"]
    steps = {s["steps"] for s in arms.values()}
    assert len(steps) == 1  # matched updates
    assert all(s["world_size"] == 4 for s in arms.values())  # matched workers
    assert arms["allreduce"]["n_models"] == 1 and arms["codistill"]["n_models"] == 2
    assert arms["allreduce"]["bytes_per_worker"]["exchange"] == 0
    for name, s in arms.items():
        for m in s["models"]:
            assert m["val_accuracy"] > 0.6, (name, m)  # chance is 0.1
    reg = json.loads((out / "codistill_regularized" / "summary.json").read_text())
    assert reg == arms["codistill_regularized"]
    import yaml

    reg_cfg = yaml.safe_load((out / "codistill_regularized" / "config.yaml").read_text())
    assert reg_cfg["optim"]["weight_decay"] == [0.0005, 0.00005, 0.0]
    for name in arms:  # every arm in the printed table
        assert f"| {name} |" in proc.stdout, name
    for name in ("diloco", "localsgd"):  # the groups end holding one model
        accs = {m["val_accuracy"] for m in arms[name]["models"]}
        assert len(arms[name]["models"]) == 2 and len(accs) == 1, name
