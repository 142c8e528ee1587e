"""The language-model token cache is verified before every launch, and a resume only continues on
the tokens the run trained on (issue 31, item 3).

Each bad cache must give one `codistill: error:` line and exit 2 before an earlier run that
`--overwrite` would replace is touched; each changed corpus must be refused by `--resume` with the
run directory left byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from codistill.cli import main
from codistill.config import load_config
from codistill.errors import DataError
from codistill.lm.cache import MANIFEST
from codistill.lm.task import LMTask
from test_lm import write_text

pytestmark = pytest.mark.timeout(300)

SETTINGS = ["data.name=text_files", "lm.context=16", "lm.vocab_size=256", "data.batch_size=64",
            "data.eval_batch_size=128", "model.name=gpt_tiny", "codistill.n_models=1", "train.steps=2",
            "train.log_every=1", "train.progress=false", "lm.sample_tokens=4", "dist.threads=1"]


def train_args(root, cache, out, *extra: str) -> list[str]:
    args = ["train", "--nproc", "1", "--out", str(out)]
    for s in [*SETTINGS, f"data.root={root}", f"lm.cache_dir={cache}", *extra]:
        args += ["--set", s]
    return args


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished run made by the real command in BASE, with its text and cache given relative to
    BASE (the working directory), so a copy of BASE is the same run in another place."""
    base = tmp_path_factory.mktemp("lm_cache")
    write_text(base / "text", lines=600)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(train_args("text", "cache", base / "run", "train.checkpoint_every=1")) == 0
    finally:
        os.chdir(cwd)
    return base / "text", base / "cache", base / "run"


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    return lines[0]


# -- damaged caches ----------------------------------------------------------------------------

def _rewrite_ids(d: Path, split: str, ids: np.ndarray) -> None:
    """Replace a split's ids and keep cache.json consistent with them (only the range is wrong)."""
    (d / f"{split}.bin").write_bytes(ids.tobytes())
    m = json.loads((d / MANIFEST).read_text())
    m["splits"][split].update(tokens=len(ids), sha256=hashlib.sha256(ids.tobytes()).hexdigest())
    (d / MANIFEST).write_text(json.dumps(m))


def _out_of_range(d: Path) -> None:
    ids = np.fromfile(d / "train.bin", dtype=np.uint16)
    ids[len(ids) // 2] = 300  # the tokenizer has 256 pieces: no embedding row for it
    _rewrite_ids(d, "train", ids)


def _manifest_field(key, value):
    def damage(d: Path) -> None:
        m = json.loads((d / MANIFEST).read_text())
        m["splits"]["valid"][key] = value
        (d / MANIFEST).write_text(json.dumps(m))
    return damage


DAMAGE = [
    ("empty", lambda d: (d / "train.bin").write_bytes(b""), ["train.bin holds 0 bytes, expected"]),
    ("one byte short", lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1]),
     ["train.bin holds", "bytes, expected"]),
    ("zero-filled", lambda d: (d / "train.bin").write_bytes(bytes((d / "train.bin").stat().st_size)),
     ["train.bin does not match its checksum"]),
    ("one id changed", lambda d: (d / "test.bin").write_bytes(b"\x05\x00" + (d / "test.bin").read_bytes()[2:]),
     ["test.bin does not match its checksum"]),
    ("ids beyond the vocabulary", _out_of_range, ["train.bin holds token id 300", "vocabulary of 256 pieces"]),
    ("split missing", lambda d: (d / "valid.bin").unlink(), ["valid.bin is missing"]),
    ("tokenizer replaced", lambda d: (d / "tokenizer.model").write_bytes(b"not a model"),
     ["tokenizer.model does not match its checksum"]),
    ("no manifest", lambda d: (d / MANIFEST).unlink(), ["has no cache.json"]),
    ("manifest not json", lambda d: (d / MANIFEST).write_text("{"), ["cache.json cannot be read"]),
    ("manifest wrong dtype", _manifest_field("dtype", "int32"), ["valid.bin holds int32 ids", "need uint16"]),
    ("manifest zero tokens", _manifest_field("tokens", 0), ["not a version-2 cache manifest"]),
]


@pytest.mark.parametrize("name, damage, fragments", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_cache_is_one_line_before_the_earlier_run_is_touched(earlier, tmp_path, capsys, name, damage,
                                                                       fragments):
    root, good_cache, run = earlier  # used in place: --overwrite would replace it if the check failed
    cache = tmp_path / "cache"
    shutil.copytree(good_cache, cache)
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    damage(d)
    before_run, before_cache = snapshot(run), snapshot(cache)

    code = main(train_args(root, cache, run) + ["--overwrite"])

    line = one_error_line(capsys)
    assert code == 2
    for fragment in fragments:
        assert fragment in line, line
    assert f"delete {d} to rebuild it" in line, line
    assert snapshot(run) == before_run  # the run --overwrite would have replaced
    assert snapshot(cache) == before_cache  # never repaired behind the user's back


def test_a_verified_cache_records_what_every_file_must_be(earlier):
    root, cache, run = earlier
    (d,) = [p for p in cache.iterdir() if p.is_dir()]
    m = json.loads((d / MANIFEST).read_text())
    for split in ("train", "valid", "test"):
        data = (d / f"{split}.bin").read_bytes()
        ids = np.frombuffer(data, dtype=np.uint16)
        assert m["splits"][split] == {"dtype": "uint16", "tokens": len(ids), "sha256": hashlib.sha256(data).hexdigest(),
                                      "max_id": int(ids.max())}
    assert m["tokenizer_sha256"] == hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest()
    assert json.loads((run / "tokens.json").read_text()) == m  # what a resume must find again


# -- resume ------------------------------------------------------------------------------------

def crashed_copy(earlier, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """The earlier run with its text and cache, copied to another place (the working directory
    from now on), as if it crashed after its last checkpoint (no summary); config.yaml unchanged."""
    base = tmp_path / "base"
    shutil.copytree(earlier[2].parent, base)
    (base / "run" / "summary.json").unlink()
    monkeypatch.chdir(base)
    return base / "text", base / "run"


def test_resume_refuses_a_training_text_appended_to_since_the_crash(earlier, tmp_path, capsys, monkeypatch):
    text, run = crashed_copy(earlier, tmp_path, monkeypatch)
    with open(text / "train.txt", "a") as f:
        f.write("and then some words that were never seen before zyx qwv\n" * 40)
    before = snapshot(run)

    code = main(["train", "--resume", str(run)])

    line = one_error_line(capsys)
    assert code == 2
    assert f"cannot resume {run}" in line and "changed since the run started" in line, line
    assert "train tokens" in line, line
    assert snapshot(run) == before


def test_resume_refuses_an_edited_vocabulary_size(earlier, tmp_path, capsys, monkeypatch):
    _, run = crashed_copy(earlier, tmp_path, monkeypatch)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["lm"]["vocab_size"] = 300
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = snapshot(run)

    code = main(["train", "--resume", str(run)])

    line = one_error_line(capsys)
    assert code == 2
    assert f"cannot resume {run}" in line and "lm.vocab_size" in line and "300" in line, line
    assert snapshot(run) == before


def test_resume_continues_on_the_same_text_in_another_place(earlier, tmp_path, capsys, monkeypatch):
    # Another path and new mtimes: a new cache, whose tokenizer is the run's own again (training
    # is deterministic), so the run goes on with its own tokenizer and tokens.
    text, run = crashed_copy(earlier, tmp_path, monkeypatch)
    own = (run / "tokenizer.model").read_bytes()
    caches = {p.name for p in (run.parent / "cache").iterdir()}

    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err

    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert (run / "tokenizer.model").read_bytes() == own
    assert len({p.name for p in (run.parent / "cache").iterdir()} - caches) == 1  # a new cache for the new place


def test_a_worker_refuses_a_run_whose_tokenizer_is_not_the_caches(earlier, tmp_path, monkeypatch):
    run = tmp_path / "base" / "run"
    shutil.copytree(earlier[2].parent, tmp_path / "base")
    monkeypatch.chdir(tmp_path / "base")
    other = write_text(tmp_path / "other", lines=600, seed=1)
    cfg_other = load_config(None, [*SETTINGS, f"data.root={other}", f"lm.cache_dir={tmp_path / 'c2'}"])
    LMTask.prepare(cfg_other, tmp_path / "other_run")
    shutil.copy(tmp_path / "other_run" / "tokenizer.model", run / "tokenizer.model")
    cfg = load_config(run / "config.yaml")

    with pytest.raises(DataError, match="differs from the tokenizer of the token cache"):
        LMTask(cfg, torch.device("cpu"), run)
