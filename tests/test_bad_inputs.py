"""Table-driven bad inputs: each gives a one-line error naming the problem, exit status 2, and leaves
an earlier run directory intact (even with --overwrite, since everything is checked first)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from codistill.cli import main

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
    ("partial torchrun env", [], {"RANK": "0", "WORLD_SIZE": "4"}, ["not under torchrun (missing", "MASTER_ADDR"]),
    ("resume nothing", ["RESUME", "{tmp}"], {}, ["no config.yaml"]),
    ("resume no checkpoint", ["RESUME", "{no_manifest}"], {}, ["has no checkpoint yet"]),
    ("resume bad manifest", ["RESUME", "{bad_manifest}"], {}, ["checkpoint manifest", "is corrupt"]),
    ("resume bad checksum", ["RESUME", "{bad_checksum}"], {}, ["corrupt (SHA-256 mismatch)"]),
    ("resume with set", ["RESUME", "{bad_checksum}", "--set", "optim.lr=1"], {}, ["drop --config, --set and --out"]),
]


@pytest.mark.parametrize("name, args, env, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, monkeypatch, name, args, env, fragments):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text('{"precious": true}')
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
