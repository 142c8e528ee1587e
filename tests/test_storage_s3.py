"""The storage exchange through object storage: a real S3 API server on 127.0.0.1 (tests/s3_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from codistill.storage_exchange import KEEP

from s3_server import refuse_unknown_credentials, s3_server
from test_storage_exchange import _exchanger, _same, _step

pytestmark = pytest.mark.timeout(300)
URL = "s3://codistill-test/run1"


def test_groups_exchange_through_a_bucket_and_skip_corrupt_objects(monkeypatch, capsys):
    from s3fs import S3FileSystem

    with s3_server(monkeypatch):
        _, teachers0, ex0 = _exchanger(0, URL)
        model1, _, ex1 = _exchanger(1, URL)
        _step(ex1, 0)
        _step(ex0, 0)
        assert teachers0.versions[1] == 0 and _same(teachers0.modules[1], model1)

        fs = S3FileSystem(skip_instance_cache=True)
        with torch.no_grad():
            for p in model1.parameters():
                p.add_(1.0)
        _step(ex1, 5)
        pointer = json.loads(fs.cat_file("codistill-test/run1/model_1/latest.json"))
        key = f"codistill-test/run1/model_1/{pointer['object']}"
        fs.pipe_file(key, fs.cat_file(key)[:-7])  # truncated in the bucket
        _step(ex0, 5)
        err = capsys.readouterr().err
        assert "skipping exchange object" in err and "checksum mismatch" in err
        assert teachers0.versions[1] == 0 and not _same(teachers0.modules[1], model1)

        _step(ex1, 10)
        _step(ex0, 10)
        assert teachers0.versions[1] == 10 and _same(teachers0.modules[1], model1)
        for step in range(15, 40, 5):
            _step(ex1, step)
        objects = [k for k in fs.ls("codistill-test/run1/model_1", detail=False) if k.endswith(".pt")]
        assert len(objects) == KEEP and all(ex1.incarnation in k and ex1.run in k for k in objects)
        assert json.loads(fs.cat_file("codistill-test/run1/run.json"))["n_models"] == 2


def _train(tmp_path, location: str):
    cmd = [sys.executable, "-m", "codistill.cli", "train", "--config", os.path.abspath("configs/digits_tiny.yaml"),
           "--set", "codistill.exchange=storage", "--set", "codistill.model_index=0", "--set", "train.steps=4",
           "--set", f"codistill.exchange_dir={location}", "--nproc", "1", "--out", str(tmp_path / "run")]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_error(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codistill: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_missing_bucket_or_refused_credentials_is_one_line_before_anything_is_created(monkeypatch, tmp_path):
    with s3_server(monkeypatch):
        _one_line_error(_train(tmp_path, "s3://no-such-bucket/run1"), "bucket does not exist")
        assert sorted(os.listdir(tmp_path)) == []  # no run directory, and no local "s3:" directory
        refuse_unknown_credentials()
        line = _one_line_error(_train(tmp_path, URL), "access refused", "AWS_ACCESS_KEY_ID")
        assert "testing" not in line.replace("codistill-test", "")  # the credentials are never printed
        assert sorted(os.listdir(tmp_path)) == []


def test_a_url_missing_its_slashes_is_refused_not_made_a_local_directory(tmp_path):
    _one_line_error(_train(tmp_path, "s3:/codistill-test/run1"), "missing '//'")
    assert sorted(os.listdir(tmp_path)) == []
