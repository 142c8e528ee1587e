"""Issue 31 (items 1, 2, 5 and the weak list): bad inputs that deleted a user's files, touched an
earlier run before every input was checked, or gave a traceback. Each error case: exit status 2,
exactly one stderr line `codistill: error: ...` with the fragments asked for, and every file of the
earlier run and of the user's folder byte-identical afterwards. Each warning case: exactly one
`codistill: warning:` line. All in-process (the CLI's main), none starts a worker."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import pytest

from codistill.cli import main
from codistill.config import Config, dump_yaml, load_config, path_fields, to_dict
from codistill.run_log import RUN_MARKER, write_run_marker

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.name=digits", "--set", "model.name=cnn_tiny", "--set", "train.progress=false",
          "--set", "train.steps=8", "--set", "codistill.exchange_every=2", "--nproc", "2"]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n" for i in range(400))


def tree_digest(*roots: Path) -> dict[str, str | None]:
    """Every path under the roots with the SHA-256 of its bytes (None for directories, the target
    for links)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            key = str(p)
            if p.is_symlink():
                out[key] = "-> " + os.readlink(p)
            elif p.is_file():
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists():
                out[key] = None
    return out


@pytest.fixture
def world(tmp_path, monkeypatch):
    """An earlier codistill run, a user's folder (with files other tools name like ours), a file,
    a text corpus and a cache directory; the launcher environment cleared."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "CODISTILL_FAULT"):
        monkeypatch.delenv(var, raising=False)
    earlier = tmp_path / "earlier"
    (earlier / "sub").mkdir(parents=True)
    (earlier / "summary.json").write_text('{"steps": 8}')
    (earlier / "sub" / "notes.txt").write_text("the earlier run's file")
    write_run_marker(earlier)
    user = tmp_path / "user"
    (user / "figures").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "figures" / "fig1.pdf").write_bytes(b"%PDF-1.4 figure")
    (user / "summary.json").write_text('{"written by": "another tool"}')
    (tmp_path / "a_file").write_text("a regular file")
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "cache").mkdir()
    return tmp_path


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_error(code: int, lines: list[str], fragments: list[str]) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# Item 1: --overwrite deletes only a directory whose marker says it is a codistill run made there.


def folder_with(tmp: Path, kind: str) -> Path:
    """A folder that only looks like a run, in one of several ways."""
    d = tmp / "user"
    if kind == "full config.yaml":  # the resolved config of a real run, copied for reference
        (d / "config.yaml").write_text(dump_yaml(Config()))
    elif kind == "checkpoint manifest":
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "latest.json").write_text('{"step": 5}')
    elif kind == "compare.json":
        (d / "compare.json").write_text('{"arms": []}')
    elif kind == "garbage marker":
        (d / RUN_MARKER).write_text("not json")
    elif kind == "marker of another tool":
        (d / RUN_MARKER).write_text(json.dumps({"format": "something else", "version": 1, "directory": str(d)}))
    elif kind == "marker is a directory":
        (d / RUN_MARKER).mkdir()
    elif kind == "copied run":  # a whole run copied into the user's folder: its marker names the original
        (d / RUN_MARKER).write_bytes((tmp / "earlier" / RUN_MARKER).read_bytes())
    elif kind == "newer marker":
        marker = json.loads((tmp / "earlier" / RUN_MARKER).read_text())
        (d / RUN_MARKER).write_text(json.dumps({**marker, "directory": str(d.resolve()), "version": 99}))
    return d


OVERWRITE_CASES = [
    ("summary.json of another tool", "train", ["no codistill_run.json", "summary.json", "thesis.tex"]),
    ("full config.yaml", "train", ["no codistill_run.json", "config.yaml"]),
    ("checkpoint manifest", "train", ["no codistill_run.json", "checkpoints/"]),
    ("compare.json", "compare", ["no codistill_run.json", "compare.json"]),
    ("garbage marker", "train", ["is not a codistill run marker"]),
    ("marker of another tool", "train", ["is not a codistill run marker"]),
    ("marker is a directory", "compare", ["is not a codistill run marker"]),
    ("copied run", "train", ["belongs to the run created in", "copied or moved"]),
    ("newer marker", "train", ["newer codistill"]),
]


@pytest.mark.parametrize("kind, command, fragments", OVERWRITE_CASES, ids=[c[0] for c in OVERWRITE_CASES])
def test_overwrite_refuses_what_only_looks_like_a_run(world, capsys, kind, command, fragments):
    folder = folder_with(world, kind)
    before = tree_digest(world)
    code, lines = run_main([command, *DIGITS, "--out", str(folder), "--overwrite"], capsys)
    assert_one_error(code, lines, ["--overwrite refuses to delete", *fragments])
    assert tree_digest(world) == before


@pytest.mark.parametrize("link", ["to the earlier run", "dangling"])
def test_a_symlinked_out_is_named_not_followed_into_a_deletion(world, capsys, link):
    out = world / "link"
    out.symlink_to(world / ("earlier" if link == "to the earlier run" else "nowhere"))
    before = tree_digest(world)
    code, lines = run_main(["train", *DIGITS, "--out", str(out), "--overwrite"], capsys)
    assert_one_error(code, lines, ["symbolic link"] + (["does not exist"] if link == "dangling" else []))
    assert tree_digest(world) == before


def test_a_marked_run_is_replaced_and_marked_anew(world, capsys, monkeypatch):
    """The positive side: everything checked, the earlier run is replaced by a new marked one (the
    workers are stubbed: this is about the directory)."""
    import codistill.launch as launch

    def fake_spawn(fn, world_size, run_dir, args, **kwargs):
        (Path(run_dir) / "summary.json").write_text(json.dumps({"steps": 8, "models": []}))

    monkeypatch.setattr(launch, "spawn", fake_spawn)
    monkeypatch.setattr(launch, "prepare_task", lambda cfg, run_dir: None)  # trackers: beside the point
    monkeypatch.setattr("codistill.cli._finish", lambda *args: None)  # plots (matplotlib): slow, beside the point
    old = json.loads((world / "earlier" / RUN_MARKER).read_text())
    code, lines = run_main(["train", *DIGITS, "--out", str(world / "earlier"), "--overwrite"], capsys)
    assert code == 0 and not lines, lines
    new = json.loads((world / "earlier" / RUN_MARKER).read_text())
    assert new["run_id"] != old["run_id"] and new["directory"] == str((world / "earlier").resolve())
    assert new["config"]["data"]["name"] == "digits" and not (world / "earlier" / "sub").exists()


# ---------------------------------------------------------------------------------------------
# Item 2: every setting that names a path is checked before the run directory is touched.

PATH_WORDS = {"dir", "root", "path", "file", "url", "uri", "cache", "location"}


def test_every_path_valued_field_is_declared_as_one():
    """A new setting that names a path must be declared with config.path_field, so preflight checks
    it; this walks every field of every section."""
    declared = path_fields()
    named = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)
             if PATH_WORDS & set(f.name.split("_"))}
    assert named <= declared.keys(), f"path-like fields not declared with path_field: {named - declared.keys()}"
    assert {"data.root", "lm.cache_dir", "codistill.exchange_dir"} <= declared.keys()
    assert set(declared.values()) <= {"input", "output", "location"}


def bad_path_values(kind: str) -> list[tuple[str, str, list[str]]]:
    """(case, value with {tmp}, fragments) that every path field of `kind` must refuse."""
    cases = [("proc", "/proc/codistill-test", ["under /proc"]),
             ("sys", "/sys/kernel/codistill", ["under /sys"]),
             ("dev null", "/dev/null", ["under /dev"]),
             ("inside the doomed run", "{tmp}/earlier/sub", ["inside the run directory", "--overwrite would delete"]),
             ("the doomed run itself", "{tmp}/earlier", ["inside the run directory"]),
             ("empty", "", ["is empty"]),
             ("link into the doomed run", "{tmp}/link_to_sub", ["inside the run directory"]),
             ("link to proc", "{tmp}/link_to_proc", ["under /proc"])]
    if kind in ("output", "location"):
        cases += [("a file", "{tmp}/a_file", ["is a file, not a directory"]),
                  ("under a file", "{tmp}/a_file/sub", ["cannot be created", "a_file is a file"]),
                  ("not writable", "{tmp}/cache/new", ["no write permission"])]
    else:
        cases += [("a fifo", "{tmp}/fifo", ["neither a directory nor a regular file"])]
    if kind != "location":
        cases += [("tilde", "~/data", ["'~' is not expanded"])]
    return cases


PATH_CASES = [(key, *case) for key, kind in sorted(path_fields().items()) for case in bad_path_values(kind)]


@pytest.mark.parametrize("key, case, value, fragments", PATH_CASES, ids=[f"{c[0]}-{c[1]}" for c in PATH_CASES])
def test_every_path_field_is_checked_before_the_earlier_run_is_touched(world, capsys, monkeypatch, key, case,
                                                                       value, fragments):
    (world / "link_to_sub").symlink_to(world / "earlier" / "sub")
    (world / "link_to_proc").symlink_to("/proc/self")
    os.mkfifo(world / "fifo")
    if case == "not writable":  # root writes anywhere: simulate a read-only cache directory
        access = os.access
        monkeypatch.setattr("codistill.preflight.os.access",
                            lambda path, mode: access(path, mode) and Path(path) != world / "cache")
    before = tree_digest(world)
    code, lines = run_main(["train", *DIGITS, "--set", f"{key}={value.format(tmp=world)}",
                            "--out", str(world / "earlier"), "--overwrite"], capsys)
    assert_one_error(code, lines, [key, *fragments])
    assert tree_digest(world) == before


def test_data_root_inside_the_run_being_replaced_is_refused_for_text_data(world, capsys):
    """The issue's case with real data: a corpus kept inside the run --overwrite would delete."""
    (world / "earlier" / "corpus.txt").write_text(TEXT)
    before = tree_digest(world)
    code, lines = run_main(["train", "--set", "data.name=text_files", "--set", f"data.root={world}/earlier/corpus.txt",
                            "--set", "model.name=gpt_tiny", "--set", f"lm.cache_dir={world}/cache",
                            "--nproc", "2", "--out", str(world / "earlier"), "--overwrite"], capsys)
    assert_one_error(code, lines, ["data.root", "inside the run directory"])
    assert tree_digest(world) == before


# ---------------------------------------------------------------------------------------------
# Item 5 and the weak list: one line instead of a traceback, or instead of silence.

LM = ["--set", "data.name=text_files", "--set", "data.root={tmp}/corpus.txt", "--set", "model.name=gpt_tiny",
      "--set", "lm.cache_dir={tmp}/cache", "--set", "lm.context=16", "--set", "data.batch_size=32",
      "--set", "data.eval_batch_size=32", "--nproc", "2"]
T = ["train", *DIGITS]
OUT = ["--out", "{tmp}/earlier", "--overwrite"]
CASES = [
    ("sentencepiece 3 pieces", ["train", *LM, "--set", "lm.vocab_size=3", *OUT], ["lm.vocab_size=3", "distinct characters"]),
    ("vocab below the characters", ["train", *LM, "--set", "lm.vocab_size=20", *OUT], ["lm.vocab_size=20", "use at least"]),
    ("image model on text", ["train", *LM, "--set", "model.name=cnn_tiny", *OUT], ["cnn_tiny is a classifier", "language model"]),
    ("translation model on text", ["train", *LM, "--set", "model.name=transformer_tiny", *OUT], ["transformer_tiny", "language model"]),
    ("language model on images", [*T, "--set", "model.name=gpt_tiny", *OUT], ["gpt_tiny is a language model", "classifier"]),
    ("one model of two wrong", [*T, "--set", "model.name=[cnn_tiny, gpt_tiny]", *OUT], ["gpt_tiny"]),
    ("text data is a directory", ["train", *LM, "--set", "data.root={tmp}/textdir", *OUT], ["train.txt is a directory"]),
    ("resume with nproc 0", ["train", "--resume", "{tmp}/earlier", "--nproc", "0"], ["--nproc must be > 0"]),
    ("resume with overwrite", ["train", "--resume", "{tmp}/earlier", "--overwrite"], ["drop --overwrite"]),
    ("resume empty", ["train", "--resume", ""], ["--resume is empty"]),
    ("resume edited config", ["train", "--resume", "{tmp}/resumable"], ["edited after the run started", "lm.context: 256 -> 128"]),
    ("out empty", [*T, "--out", ""], ["--out is empty"]),
    ("out blank", ["compare", *DIGITS, "--out", "  "], ["--out is empty"]),
    ("describe with set", ["config", "--describe", "--set", "optim.lr=3"], ["--describe", "drop --config and --set"]),
    ("describe with config", ["config", "--describe", "--config", "{tmp}/a_file"], ["--describe"]),
    ("link far too slow", ["compare", *DIGITS, "--link", "0.000001bit", *OUT], ["--link", "outside 100 kbit/s"]),
    ("link far too fast", ["compare", *DIGITS, "--link", "1000tbit", *OUT], ["--link", "outside"]),
    ("out under proc", [*T, "--out", "/proc/codistill-run"], ["--out=/proc/codistill-run is under /proc"]),
    ("out a url", [*T, "--out", "s3://bucket/run"], ["--out=s3://bucket/run: URLs are not supported"]),
    ("out tilde quoted", [*T, "--out", "~/runs/x"], ["'~' is not expanded"]),
    ("reproduce out a file", ["reproduce", "F1", "--quick", "--out", "{tmp}/a_file"], ["--out={tmp}/a_file is a file"]),
    ("reproduce doc a directory", ["reproduce", "--report", "--out", "{tmp}/results", "--doc", "{tmp}/user"],
     ["--doc", "not a file path"]),
    ("bench out under proc", ["bench", "step_overhead", "--quick", "--out", "/proc/bench"], ["--out=/proc/bench is under /proc"]),
    ("exchange_dir half url", [*T, "--set", "codistill.exchange=storage", "--set", "codistill.exchange_dir=s3:/bucket",
                               "--set", "codistill.model_index=0", *OUT], ["missing '//'"]),
]


def damaged_tokenizer(tmp: Path, content: bytes) -> None:
    """Build the corpus's cache once, then damage its tokenizer."""
    from codistill.lm.cache import build_cache
    from codistill.lm.task import load_corpus

    cfg = load_config(None, [a.format(tmp=tmp) for a in LM if "=" in a] + ["lm.vocab_size=100"])
    cache = build_cache(cfg, load_corpus(cfg))
    (cache / "tokenizer.model").write_bytes(content)


def resumable_run(tmp: Path) -> Path:
    """A run with a marker, a loadable checkpoint and a config.yaml edited after it started."""
    import hashlib as h

    import torch

    run = tmp / "resumable"
    step = run / "checkpoints" / "step_000005"
    step.mkdir(parents=True)
    cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny"])
    write_run_marker(run, to_dict(cfg))
    (run / "config.yaml").write_text(dump_yaml(cfg).replace("context: 256", "context: 128"))
    hashes = {}
    for name in ["model_0.pt", "model_1.pt", *[f"rank_{r}.pt" for r in range(4)]]:
        torch.save({"step": 5}, step / name)
        hashes[name] = h.sha256((step / name).read_bytes()).hexdigest()
    (run / "checkpoints" / "latest.json").write_text(json.dumps(
        {"step": 5, "dir": "step_000005", "world_size": 4, "sha256": hashes}))
    return run


@pytest.mark.parametrize("name, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_one_line_instead_of_a_traceback_or_silence(world, capsys, name, argv, fragments):
    (world / "textdir" / "train.txt").mkdir(parents=True)
    for split in ("valid", "test"):
        (world / "textdir" / f"{split}.txt").write_text(TEXT)
    if "{tmp}/resumable" in argv:
        resumable_run(world)
    before = tree_digest(world)
    code, lines = run_main([a.format(tmp=world) for a in argv], capsys)
    assert_one_error(code, lines, [f.format(tmp=world) for f in fragments])
    after = tree_digest(world)
    if name.startswith(("sentencepiece", "vocab")):  # the cache is codistill's own, not the user's
        after = {k: v for k, v in after.items() if not k.startswith(str(world / "cache"))}
        before = {k: v for k, v in before.items() if not k.startswith(str(world / "cache"))}
    assert after == before


@pytest.mark.parametrize("content", [b"garbage, not a model", b""], ids=["garbage", "empty"])
def test_a_damaged_tokenizer_in_the_cache_is_one_line(world, capsys, content):
    damaged_tokenizer(world, content)
    before = tree_digest(world)
    code, lines = run_main(["train", *[a.format(tmp=world) for a in LM], "--set", "lm.vocab_size=100",
                            "--out", str(world / "earlier"), "--overwrite"], capsys)
    assert_one_error(code, lines, ["tokenizer.model"])
    assert tree_digest(world) == before


@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-1", "1e9"])
def test_reproduce_budget_is_checked_before_anything_is_written(world, capsys, budget):
    out = world / "results"
    before = tree_digest(world)
    code, lines = run_main(["reproduce", "F1", "--quick", "--budget", budget, "--out", str(out)], capsys)
    assert_one_error(code, lines, ["--budget must be a number in (0, 1000]"])
    assert not out.exists() and tree_digest(world) == before


# scripts/ensemble_bleu.py on a run whose config, manifest or checkpoint is broken.

def translation_run(tmp: Path, damage: str) -> Path:
    """A tiny parallel_text translation run with a real checkpoint of model 0, damaged one way."""
    import hashlib as h

    import torch

    data = tmp / "bitext"
    data.mkdir()
    words = "uno dos tres cuatro cinco seis siete ocho nueve diez".split()
    for split in ("train", "valid", "test"):
        (data / f"{split}.src").write_text("".join(f"one two {w}\n" for w in words))
        (data / f"{split}.tgt").write_text("".join(f"uno dos {w}\n" for w in words))
    cfg = load_config(None, ["data.name=parallel_text", f"data.root={data}", "model.name=transformer_tiny",
                             "translation.vocab_size=40", "codistill.n_models=1"])
    run = tmp / "mt_run"
    step = run / "checkpoints" / "step_000005"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    if damage == "config":
        (run / "config.yaml").write_text("model: [unclosed\n")
    elif damage == "unknown key":
        (run / "config.yaml").write_text(dump_yaml(cfg) + "extra:\n  key: 1\n")
    state = {"model": {"not.a.parameter": torch.zeros(2)}} if damage == "wrong weights" else {"model": {}}
    torch.save(state, step / "model_0.pt")
    digest = h.sha256((step / "model_0.pt").read_bytes()).hexdigest()
    if damage == "checksum":
        digest = "0" * 64
    manifest = {"step": 5, "dir": "step_000005", "world_size": 1, "sha256": {"model_0.pt": digest}}
    (run / "checkpoints" / "latest.json").write_text("{broken" if damage == "manifest" else json.dumps(manifest))
    return run


ENSEMBLE_CASES = [("config", ["is not valid YAML"]), ("unknown key", ["unknown config section 'extra'"]),
                  ("manifest", ["checkpoint manifest", "is corrupt"]), ("checksum", ["SHA-256 mismatch"]),
                  ("wrong weights", ["does not fit model 'transformer_tiny'"])]


@pytest.mark.parametrize("damage, fragments", ENSEMBLE_CASES, ids=[c[0] for c in ENSEMBLE_CASES])
def test_ensemble_bleu_on_a_broken_run_is_one_line_with_status_2(tmp_path, capsys, monkeypatch, damage, fragments):
    run = translation_run(tmp_path, damage)
    before = tree_digest(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ensemble_bleu.py", str(run)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "ensemble_bleu.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("ensemble_bleu: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Settings that do nothing in the chosen method: one `codistill: warning:` line each.

WARNINGS = [
    ("outer with distillation", ["outer.lr=0.5"], "outer.lr does nothing here", "diloco has an outer optimizer"),
    ("outer every with distillation", ["outer.every=4"], "outer.every does nothing", "outer steps"),
    ("exchange dtype with one model", ["codistill.n_models=1", "codistill.exchange_dtype=bf16"],
     "codistill.exchange_dtype does nothing", "all-reduce"),
    ("diloco outer.every past the end", ["codistill.method=diloco", "outer.every=500"],
     "outer.every (H=500) >= the run's 400 updates", "averaged once"),
    ("localsgd T past the end", ["codistill.method=localsgd", "codistill.exchange_every=400"],
     "outer.every (H=400)", "lower outer.every"),
    ("diloco with temperature", ["codistill.method=diloco", "codistill.temperature=2"],
     "codistill.temperature does nothing", "codistill.method=diloco"),
    ("localsgd with outer momentum", ["codistill.method=localsgd", "outer.momentum=0.5"],
     "outer.momentum does nothing", "localsgd"),
    ("root for digits", ["data.root=/tmp"], "data.root does nothing", "built in"),
    ("betas with sgd", ["optim.betas=[0.8, 0.9]"], "optim.betas does nothing", "optim.name=sgd"),
    ("momentum with adamw", ["optim.name=adamw", "optim.momentum=0.5"], "optim.momentum does nothing", "adamw"),
    ("temperature with mse", ["codistill.loss=mse", "codistill.temperature=3"], "codistill.temperature does nothing",
     "raw logits"),
    ("exchange dir with collective", ["codistill.exchange_dir=/tmp/ex"], "codistill.exchange_dir does nothing",
     "collective"),
    ("lm settings on images", ["lm.context=64", "lm.vocab_size=100"], "lm.context, lm.vocab_size do nothing",
     "not a language-modeling corpus"),
    ("translation settings on images", ["translation.beam=4"], "translation.beam does nothing", "translation corpus"),
    ("gamma with cosine", ["schedule.name=cosine", "schedule.gamma=0.5"], "schedule.gamma does nothing", "cosine"),
    ("reference batch unscaled", ["schedule.scale_lr=false", "schedule.reference_batch=128"],
     "schedule.reference_batch does nothing", "scale_lr is false"),
    ("disjoint split with one model", ["codistill.n_models=1", "data.split=disjoint"], "data.split does nothing",
     "one model"),
    ("alpha with all-reduce", ["codistill.n_models=1", "codistill.alpha=0.5"], "codistill.alpha does nothing",
     "all-reduce"),
    ("hierarchical with one replica", ["codistill.exchange_hierarchical=true"],
     "codistill.exchange_hierarchical does nothing", "one worker per model"),
]


@pytest.mark.parametrize("name, sets, start, fragment", WARNINGS, ids=[w[0] for w in WARNINGS])
def test_a_setting_that_does_nothing_gets_one_warning_line(capsys, name, sets, start, fragment):
    from codistill.prelaunch import warn_before_launch

    cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny", "train.steps=400", *sets])
    assert warn_before_launch([cfg], 2) is not None
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("codistill: warning: "), lines
    assert start in lines[0] and fragment in lines[0], lines[0]


def test_a_comparison_warns_only_about_what_no_arm_uses(capsys):
    from codistill.compare import arm_configs
    from codistill.prelaunch import warn_before_launch

    def warnings(arms):
        cfg = load_config(None, ["data.name=digits", "model.name=cnn_tiny", "train.steps=40",
                                 "codistill.exchange_every=5", "outer.lr=0.5", f"compare.arms={arms}"])
        warn_before_launch([c for _, c in arm_configs(cfg, 2)], 2, given=cfg)
        return [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    assert warnings("[allreduce, codistill, diloco]") == []  # the diloco arm uses outer.lr
    lines = warnings("[allreduce, codistill]")
    assert len(lines) == 1 and "outer.lr does nothing here: no arm of this comparison" in lines[0], lines


def test_there_are_at_least_forty_new_bad_input_cases():
    errors = len(OVERWRITE_CASES) + 2 + len(PATH_CASES) + 1 + len(CASES) + 2 + 5 + len(ENSEMBLE_CASES)
    assert errors >= 40 and len(WARNINGS) >= 10
