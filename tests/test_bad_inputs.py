"""Table-driven bad inputs: each gives a one-line error naming the problem, exit status 2, and leaves
an earlier run directory intact (even with --overwrite, since everything is checked first)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from codistill.cli import main
from codistill.run_log import write_run_marker

DIGITS = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false"]


def idx_dir(tmp: Path, damage: str) -> Path:
    """A Fashion-MNIST-style directory whose train images are damaged in one way."""
    root = tmp / f"idx_{damage}"
    root.mkdir()
    images = struct.pack(">4B3I", 0, 0, 8, 3, 10, 28, 28) + bytes(10 * 28 * 28)
    labels = struct.pack(">4B1I", 0, 0, 8, 1, 10) + bytes(range(10))
    if damage == "magic":
        images = b"\x12\x34" + images[2:]
    elif damage == "truncated":
        images = images[:-100]
    for split in ("train", "t10k"):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return root


def fake_run(tmp: Path, manifest: str | None, payload: bytes = b"garbage") -> Path:
    run = tmp / "fake_run"
    (run / "checkpoints" / "step_000005").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  name: digits\nmodel:\n  name: cnn_tiny\n")
    (run / "checkpoints" / "step_000005" / "model_0.pt").write_bytes(payload)
    if manifest is not None:
        (run / "checkpoints" / "latest.json").write_text(manifest)
    return run


GOOD_MANIFEST = json.dumps({"step": 5, "dir": "step_000005", "world_size": 4, "sha256": {"model_0.pt": "0" * 64}})

# (id, arguments (may use {tmp}), environment, fragments the error line must contain)
CASES = [
    ("unknown key", ["--set", "optim.lrr=1"], {}, ["unknown config key optim.lrr", "allowed:"]),
    ("unknown section", ["--set", "optimizer.lr=1"], {}, ["unknown config section 'optimizer'"]),
    ("float type", ["--set", "optim.lr=fast"], {}, ["optim.lr must be float"]),
    ("bool type", ["--set", "train.progress=maybe"], {}, ["train.progress must be bool"]),
    ("int type", ["--set", "codistill.n_models=2.5"], {}, ["codistill.n_models must be int"]),
    ("choice", ["--set", "codistill.loss=l1"], {}, ["codistill.loss must be one of kl, mse, ce"]),
    ("T zero", ["--set", "codistill.exchange_every=0"], {}, ["codistill.exchange_every must be > 0"]),
    ("negative alpha", ["--set", "codistill.alpha=-1"], {}, ["codistill.alpha must be >= 0"]),
    ("unknown model", ["--set", "model.name=vgg"], {}, ["unknown model 'vgg'"]),
    ("unknown dataset", ["--set", "data.name=svhn"], {}, ["unknown dataset 'svhn'"]),
    ("wd stages", ["--set", "optim.weight_decay=[1e-4, 0]"], {}, ["optim.weight_decay has 2 stages"]),
    ("val fraction", ["--set", "data.val_fraction=1.5"], {}, ["data.val_fraction must be in [0, 1)"]),
    ("label smoothing", ["--set", "train.label_smoothing=1"], {}, ["train.label_smoothing must be in [0, 1)"]),
    ("model list", ["--set", "model.name=[cnn, mlp, cnn]"], {}, ["model.name lists 3 models"]),
    ("storage without dir", ["--set", "codistill.exchange=storage"], {}, ["exchange_dir"]),
    ("storage index", ["--set", "codistill.exchange=storage", "--set", "codistill.exchange_dir={tmp}/x",
                       "--set", "codistill.model_index=5"], {}, ["codistill.model_index must be in 0..1"]),
    ("frozen index", ["--set", "codistill.exchange=frozen", "--set", "codistill.teacher_run={tmp}/x",
                      "--set", "codistill.model_index=-1"], {}, ["codistill.model_index must be in 0..1"]),
    ("batch too large", ["--set", "data.batch_size=100000"], {}, ["data.batch_size=100000 is too large"]),
    ("missing data dir", ["--set", "data.name=fashion_mnist", "--set", "data.root={tmp}/nowhere"], {},
     ["data directory not found", "nowhere"]),
    ("idx bad magic", ["--set", "data.name=fashion_mnist", "--set", "data.root={idx_magic}"], {},
     ["train-images-idx3-ubyte.gz is not an IDX file"]),
    ("idx truncated", ["--set", "data.name=fashion_mnist", "--set", "data.root={idx_truncated}"], {},
     ["train-images-idx3-ubyte.gz is corrupt"]),
    ("missing config", ["--config", "{tmp}/none.yaml"], {}, ["config file not found"]),
    ("bad yaml", ["--config", "{bad_yaml}"], {}, ["is not valid YAML"]),
    ("nproc zero", ["--nproc", "0"], {}, ["--nproc must be > 0"]),
    ("world size", ["--nproc", "3"], {}, ["world size 3 is not divisible by codistill.n_models=2"]),
    ("bad fault env", [], {"CODISTILL_FAULT": "explode"}, ["CODISTILL_FAULT must be kind@rank:step"]),
    ("partial torchrun env", [], {"RANK": "0", "WORLD_SIZE": "4"}, ["partial launcher environment", "MASTER_ADDR"]),
    ("resume nothing", ["RESUME", "{tmp}"], {}, ["no config.yaml"]),
    ("resume no checkpoint", ["RESUME", "{no_manifest}"], {}, ["has no checkpoint yet"]),
    ("resume bad manifest", ["RESUME", "{bad_manifest}"], {}, ["checkpoint manifest", "is corrupt"]),
    ("resume bad checksum", ["RESUME", "{bad_checksum}"], {}, ["corrupt (SHA-256 mismatch)"]),
    ("resume with set", ["RESUME", "{bad_checksum}", "--set", "optim.lr=1"], {}, ["own config.yaml", "drop --set"]),
]


@pytest.mark.parametrize("name, args, env, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, monkeypatch, name, args, env, fragments):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text('{"precious": true}')
    write_run_marker(earlier)  # a codistill run: --overwrite may replace it once every input is checked
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: [unclosed\n")
    values = {"tmp": tmp_path, "bad_yaml": bad_yaml}
    if any("{idx_" in a for a in args):
        values.update(idx_magic=idx_dir(tmp_path, "magic"), idx_truncated=idx_dir(tmp_path, "truncated"))
    for key, manifest in (("no_manifest", None), ("bad_manifest", "{not json"), ("bad_checksum", GOOD_MANIFEST)):
        if "{" + key + "}" in args:
            values[key] = fake_run(tmp_path, manifest)
    args = [a.format(**values) for a in args]
    if args[:1] == ["RESUME"]:
        argv = ["train", "--resume", *args[1:]]
    else:
        argv = ["train", *DIGITS, *args, "--out", str(earlier), "--overwrite"]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("codistill: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert (earlier / "summary.json").read_text() == '{"precious": true}'  # untouched


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


# ---------------------------------------------------------------------------------------------
# Issue 15: everything is checked before anything is touched, --overwrite protects what is not a
# run, the launcher environment is all or nothing. Each case: exit 2, at most two stderr lines, no
# traceback, and a directory holding a file is byte-identical afterwards.


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def idx_files(root: Path, train_shape=(10, 28, 28), test_shape=(10, 28, 28), test_labels=None) -> Path:
    """An IDX dataset directory (Fashion-MNIST layout) with the given image shapes and test labels."""
    root.mkdir()
    for split, shape in (("train", train_shape), ("t10k", test_shape)):
        n = shape[0]
        labels = list(range(n)) if split == "train" or test_labels is None else test_labels
        images = struct.pack(f">4B{len(shape)}I", 0, 0, 8, len(shape), *shape) + bytes(n * shape[1] * shape[2])
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4BI", 0, 0, 8, 1, n) + bytes(labels)))
    return root


def real_checkpoint_run(tmp: Path, world: int, rank_files: int, manifest_extra: dict | None = None,
                        summary_steps: int | None = None) -> Path:
    """A run directory with loadable checkpoint files and a manifest whose checksums match."""
    import hashlib

    import torch

    run = tmp / "ckpt_run"
    step = run / "checkpoints" / "step_000005"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  name: digits\nmodel:\n  name: cnn_tiny\n")
    hashes = {}
    for name in ["model_0.pt", "model_1.pt", *[f"rank_{r}.pt" for r in range(rank_files)]]:
        torch.save({"step": 5}, step / name)
        hashes[name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
    manifest = {"step": 5, "dir": "step_000005", "world_size": world, "sha256": hashes, **(manifest_extra or {})}
    (run / "checkpoints" / "latest.json").write_text(json.dumps(manifest))
    if summary_steps is not None:
        (run / "summary.json").write_text(json.dumps({"steps": summary_steps, "models": []}))
    return run


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
AGENT = {"TORCHELASTIC_RUN_ID": "test"}
FAST_TIMEOUT = ["--set", "dist.timeout_s=5"]  # the old code waited for peers here: fail, don't hang

# (id, argv with placeholders, environment, fragments of the error line). argv starts with the
# command; {earlier} is a finished codistill run holding a file, passed with --overwrite where shown.
T = ["train", *DIGITS]
OUT = ["--out", "{earlier}", "--overwrite"]
MORE_CASES = [
    # 1. Non-finite and out-of-range numbers, in any field.
    ("lr nan", [*T, "--set", "optim.lr=nan", *OUT], {}, ["optim.lr must be a finite number, got nan"]),
    ("alpha .nan", [*T, "--set", "codistill.alpha=.nan", *OUT], {}, ["codistill.alpha must be a finite number"]),
    ("timeout inf", [*T, "--set", "dist.timeout_s=.inf", *OUT], {}, ["dist.timeout_s must be a finite number"]),
    ("timeout huge", [*T, "--set", "dist.timeout_s=1e300", *OUT], {}, ["dist.timeout_s must be at most"]),
    ("timeout zero", [*T, "--set", "dist.timeout_s=0", *OUT], {}, ["dist.timeout_s must be > 0"]),
    ("temperature -inf", [*T, "--set", "codistill.temperature=-.inf", *OUT], {}, ["codistill.temperature must be a finite"]),
    ("wd list nan", [*T, "--set", "optim.weight_decay=[.nan, 0, 0]", *OUT], {}, ["optim.weight_decay must be a finite"]),
    ("milestone nan", [*T, "--set", "schedule.milestones=[1, nan]", *OUT], {}, ["schedule.milestones must be a finite"]),
    ("warmup inf", [*T, "--set", "schedule.warmup_epochs=inf", *OUT], {}, ["schedule.warmup_epochs must be a finite"]),
    ("fraction nan", [*T, "--set", "data.fraction=nan", *OUT], {}, ["data.fraction must be a finite"]),
    ("lr zero", [*T, "--set", "optim.lr=0", *OUT], {}, ["optim.lr must be > 0"]),
    ("momentum one", [*T, "--set", "optim.momentum=1", *OUT], {}, ["optim.momentum must be in [0, 1)"]),
    ("momentum negative", [*T, "--set", "optim.momentum=-0.1", *OUT], {}, ["optim.momentum must be in [0, 1)"]),
    ("beta above one", [*T, "--set", "optim.name=adamw", "--set", "optim.betas=[0.9, 1.5]", *OUT], {},
     ["optim.betas must be in [0, 1)"]),
    ("one beta", [*T, "--set", "optim.betas=[0.9]", *OUT], {}, ["optim.betas must be two numbers"]),
    ("nesterov without momentum", [*T, "--set", "optim.nesterov=true", "--set", "optim.momentum=0", *OUT], {},
     ["optim.nesterov needs"]),
    ("gamma zero", [*T, "--set", "schedule.gamma=0", *OUT], {}, ["schedule.gamma must be > 0"]),
    ("seed overflow", [*T, "--set", "train.seed=99999999999999", *OUT], {}, ["train.seed must be at most"]),
    ("seed negative", [*T, "--set", "train.seed=-1", *OUT], {}, ["train.seed must be >= 0"]),
    ("beam zero", [*T, "--set", "translation.beam=0", *OUT], {}, ["translation.beam must be > 0"]),
    # Model options the model does not take or cannot use: built once on the meta device.
    ("unknown model option", [*T, "--set", "model.options={nosuch: 1}", *OUT], {}, ["cnn_tiny", "nosuch"]),
    ("negative width", [*T, "--set", "model.options={width: -3}", *OUT], {}, ["model 'cnn_tiny' cannot be built"]),
    ("dropout above one", [*T, "--set", "model.options={dropout: 2}", *OUT], {}, ["model 'cnn_tiny' cannot be built"]),
    ("option nan", [*T, "--set", "model.options={dropout: .nan}", *OUT], {}, ["model.options.dropout must be a finite"]),
    ("mlp option", [*T, "--set", "model.name=mlp", "--set", "model.options={width: 3}", *OUT], {}, ["'mlp'", "width"]),
    ("nccl without gpu", [*T, "--set", "dist.backend=nccl", *OUT], {"NO_CUDA": "1"}, ["dist.backend=nccl needs CUDA"]),
    # Compare arms.
    ("no arms", ["compare", *DIGITS, "--set", "compare.arms=[]", *OUT], {}, ["compare.arms must list at least one"]),
    ("unknown arm", ["compare", *DIGITS, "--set", "compare.arms=[fast]", *OUT], {}, ["unknown arm 'fast'"]),
    ("arm twice", ["compare", *DIGITS, "--set", "compare.arms=[codistill, codistill]", *OUT], {}, ["an arm twice"]),
    ("compare option", ["compare", *DIGITS, "--set", "model.options={nosuch: 1}", *OUT], {}, ["nosuch"]),
    # 2. Data: splits that disagree, empty files, wrong kinds of paths.
    ("idx zero items", [*T, "--set", "data.name=fashion_mnist", "--set", "data.root={idx_empty}", *OUT], {},
     ["hold zero examples"]),
    ("test shape differs", [*T, "--set", "data.name=fashion_mnist", "--set", "data.root={idx_shape}", *OUT], {},
     ["test examples have shape (1, 32, 32)", "(1, 28, 28)"]),
    ("test labels outside", [*T, "--set", "data.name=fashion_mnist", "--set", "data.root={idx_labels}", *OUT], {},
     ["test labels range over 0..12", "10 classes"]),
    ("data root is a file", [*T, "--set", "data.name=fashion_mnist", "--set", "data.root={a_file}", *OUT], {},
     ["is not a directory"]),
    ("data file is a dir", [*T, "--set", "data.name=fashion_mnist", "--set", "data.root={idx_dirfile}", *OUT], {},
     ["is not a regular file"]),
    ("no training data left", [*T, "--set", "data.fraction=0.001", *OUT], {}, ["no training examples left"]),
    # Config files.
    ("config not utf-8", [*T, "--config", "{latin1}", *OUT], {}, ["is not UTF-8 text"]),
    ("yaml line and column", [*T, "--config", "{bad_yaml2}", *OUT], {}, ["line 3, column 1", "expected"]),
    ("config is a dir", [*T, "--config", "{tmp}", *OUT], {}, ["is not a regular file"]),
    # 3. --out and --overwrite.
    ("out under a file", [*T, "--out", "{a_file}/run", "--overwrite"], {}, ["is a file, not a directory"]),
    ("out not writable", [*T, "--out", "{tmp}/new/run"], {"NO_WRITE": "1"}, ["no write permission"]),
    ("overwrite unrelated dir", [*T, "--out", "{unrelated}", "--overwrite"], {}, ["no codistill_run.json"]),
    ("overwrite cwd", [*T, "--out", ".", "--overwrite"], {"CWD": "unrelated"}, ["the current directory"]),
    ("overwrite parent of cwd", [*T, "--out", "..", "--overwrite"], {"CWD": "earlier/sub"}, ["the current directory"]),
    ("overwrite home", [*T, "--out", "{earlier}", "--overwrite"], {"HOME": "{earlier}"}, ["home directory"]),
    ("compare overwrite unrelated", ["compare", *DIGITS, "--out", "{unrelated}", "--overwrite"], {},
     ["no codistill_run.json"]),
    # 4. Launcher environment: all or nothing.
    ("rank alone", [*T, *FAST_TIMEOUT, *OUT], {"RANK": "1"}, ["partial launcher environment", "unset RANK"]),
    ("local rank alone", [*T, *FAST_TIMEOUT, *OUT], {"LOCAL_RANK": "0"}, ["partial launcher environment"]),
    ("torchrun leftovers", [*T, "--nproc", "2", *FAST_TIMEOUT, *OUT], TORCHRUN,
     ["no torchrun agent", "unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT"]),
    ("world size not int", [*T, *FAST_TIMEOUT, *OUT], {**TORCHRUN, **AGENT, "WORLD_SIZE": "four"},
     ["WORLD_SIZE='four' is not an integer"]),
    ("rank beyond world", [*T, *FAST_TIMEOUT, *OUT], {**TORCHRUN, **AGENT, "RANK": "4"},
     ["inconsistent launcher environment"]),
    ("port not int", [*T, *FAST_TIMEOUT, *OUT], {**TORCHRUN, **AGENT, "MASTER_PORT": "http"},
     ["MASTER_PORT='http' is not an integer"]),
    # 6. Resume: damaged manifests, world sizes that disagree, finished runs.
    ("manifest missing step", ["train", "--resume", "{m_nostep}"], {}, ["field 'step' is missing"]),
    ("manifest world size type", ["train", "--resume", "{m_wstype}"], {}, ["field 'world_size' must be int"]),
    ("manifest sha256 list", ["train", "--resume", "{m_shalist}"], {}, ["field 'sha256' must be dict"]),
    ("manifest dir escapes", ["train", "--resume", "{m_escape}"], {}, ["do not fit together"]),
    ("manifest array", ["train", "--resume", "{m_array}"], {}, ["not a JSON object"]),
    ("manifest world differs", ["train", "--resume", "{m_world}"], {}, ["world_size 4", "holds 2 rank file(s)"]),
    ("resume finished run", ["train", "--resume", "{m_done}"], {}, ["already complete (5 steps)", "nothing changed"]),
    ("resume a file", ["train", "--resume", "{a_file}"], {}, ["not a directory"]),
]


def _more_values(tmp: Path, argv: list[str]) -> dict:
    """Build only the fixtures a case names."""
    text = " ".join(argv)
    values = {"tmp": tmp, "earlier": tmp / "earlier", "unrelated": tmp / "unrelated", "a_file": tmp / "a_file"}
    if "{idx_empty}" in text:
        values["idx_empty"] = idx_files(tmp / "idx_empty", (0, 28, 28), (0, 28, 28))
    if "{idx_shape}" in text:
        values["idx_shape"] = idx_files(tmp / "idx_shape", test_shape=(10, 32, 32))
    if "{idx_labels}" in text:
        values["idx_labels"] = idx_files(tmp / "idx_labels", test_labels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 12])
    if "{idx_dirfile}" in text:
        values["idx_dirfile"] = idx_files(tmp / "idx_dirfile")
        (values["idx_dirfile"] / "train-images-idx3-ubyte.gz").unlink()
        (values["idx_dirfile"] / "train-images-idx3-ubyte.gz").mkdir()
    if "{latin1}" in text:
        values["latin1"] = tmp / "latin1.yaml"
        values["latin1"].write_bytes("optim:\n  name: sgd # r\xe9glage\n".encode("latin-1"))
    if "{bad_yaml2}" in text:
        values["bad_yaml2"] = tmp / "bad2.yaml"
        values["bad_yaml2"].write_text("optim:\n  betas: [0.9,\n")
    manifests = {"m_nostep": {"step": None}, "m_wstype": {"world_size": "four"}, "m_shalist": {"sha256": []},
                 "m_escape": {"dir": "../../elsewhere"}}
    for key, extra in manifests.items():
        if "{" + key + "}" in text:
            run = real_checkpoint_run(tmp, 4, 4, extra)
            if extra.get("step", 0) is None:
                manifest = json.loads((run / "checkpoints" / "latest.json").read_text())
                del manifest["step"]
                (run / "checkpoints" / "latest.json").write_text(json.dumps(manifest))
            values[key] = run
    if "{m_array}" in text:
        values["m_array"] = real_checkpoint_run(tmp, 4, 4)
        (values["m_array"] / "checkpoints" / "latest.json").write_text("[1, 2]")
    if "{m_world}" in text:
        values["m_world"] = real_checkpoint_run(tmp, 4, 2)
    if "{m_done}" in text:
        values["m_done"] = real_checkpoint_run(tmp, 4, 4, summary_steps=5)
    return values


@pytest.mark.parametrize("name, argv, env, fragments", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_checked_before_anything_is_touched(tmp_path, capsys, monkeypatch, name, argv, env, fragments):
    earlier = tmp_path / "earlier"  # a finished run, which --overwrite may replace only if all is well
    (earlier / "sub").mkdir(parents=True)
    (earlier / "summary.json").write_text('{"precious": true}')
    (earlier / "sub" / "notes.txt").write_text("keep me")
    write_run_marker(earlier)
    unrelated = tmp_path / "unrelated"  # somebody's files, never a codistill run
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    (unrelated / "config.yaml").write_text("my: own config\n")
    (tmp_path / "a_file").write_text("a regular file")
    values = _more_values(tmp_path, argv)

    def fill(text: str) -> str:  # only our placeholders: YAML options use braces too
        for key, value in values.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    argv = [fill(a) for a in argv]
    for key in ("NO_CUDA", "NO_WRITE", "CWD"):
        env = dict(env)
        flag = env.pop(key, None)
        if flag and key == "NO_CUDA":
            monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        if flag and key == "NO_WRITE":  # root may write anywhere: simulate a read-only parent
            monkeypatch.setattr("codistill.run_log.os.access", lambda path, mode: False)
        if flag and key == "CWD":
            monkeypatch.chdir(tmp_path / flag)
    for key, value in env.items():
        monkeypatch.setenv(key, fill(value))
    for key in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"} - env.keys():
        monkeypatch.delenv(key, raising=False)
    before = snapshot(tmp_path)

    code = main(argv)

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("codistill: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing created, nothing deleted, nothing rewritten


def test_there_are_forty_more_cases():
    assert len(MORE_CASES) >= 40
