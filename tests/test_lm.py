"""Language modeling: causal mask, splits, the sequence KL, the token cache, bad inputs, and a
multi-process codistillation run of gpt_tiny (peak memory per worker printed for n = 2 and 4)."""

from __future__ import annotations

import itertools
import json
import random
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codistill.cli import main
from codistill.config import load_config
from codistill.lm.corpus import block_split, load_text_files
from codistill.lm.cache import cache_dir
from codistill.lm.task import LMTask, load_corpus
from codistill.models import build_model
from codistill.topology import Grid, Topology
from mp_helpers import run_workers

pytestmark = pytest.mark.timeout(600)


def write_text(root: Path, lines: int = 1500, seed: int = 0) -> Path:
    """train/valid/test.txt of pseudo-words (enough distinct pieces for a 256-piece BPE)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", lines), ("valid.txt", lines // 10), ("test.txt", lines // 10)):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n))
        (root / name).write_text(text + "\n")
    return root


def lm_config(root: Path, cache: Path, *extra: str):
    return load_config(None, [
        "data.name=text_files", f"data.root={root}", f"lm.cache_dir={cache}", "lm.context=16",
        "lm.vocab_size=256", "data.batch_size=64", "data.eval_batch_size=128", "model.name=gpt_tiny",
        "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.0", "schedule.name=constant",
        "schedule.warmup_epochs=0", "schedule.scale_lr=false", "train.progress=false", "train.log_every=2",
        "dist.threads=1", "lm.sample_tokens=20", *extra])


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    return write_text(base / "text"), base / "cache"


# -- model -----------------------------------------------------------------------------------------

def test_a_future_token_cannot_change_an_earlier_positions_logits():
    torch.manual_seed(0)
    model = build_model("gpt_tiny", 500, (), context=32).eval()
    x = torch.randint(0, 500, (3, 32))
    for k in (0, 7, 31):
        y = x.clone()
        y[:, k] = (y[:, k] + 1) % 500
        a, b = model(x), model(y)
        assert torch.equal(a[:, :k], b[:, :k]), k
        assert not torch.allclose(a[:, k:], b[:, k:])  # the changed position and later ones do see it


def test_presets_have_the_advertised_size_and_tied_embeddings():
    tiny = build_model("gpt_tiny", 4000, ())
    assert 1_000_000 <= sum(p.numel() for p in tiny.parameters()) <= 3_000_000
    with torch.device("meta"):
        small = build_model("gpt2_small", 50257, ())
    assert small.context == 1024
    assert round(sum(p.numel() for p in small.parameters()) / 1e6) == 124
    assert not any("output" in name for name, _ in small.named_parameters())  # the embedding is the head


# -- data ------------------------------------------------------------------------------------------

def test_bible_block_split_is_contiguous_disjoint_and_complete():
    parts = block_split(31_000)
    sets = {k: set(v) for k, v in parts.items()}
    assert sum(len(s) for s in sets.values()) == 31_000 and set().union(*sets.values()) == set(range(31_000))
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"] or sets["valid"] & sets["test"])
    assert parts["valid"][:3] == [4000, 4001, 4002] and len(parts["valid"]) == 800 and len(parts["test"]) == 600


def test_one_file_is_split_by_lines_without_overlap(tmp_path):
    f = tmp_path / "all.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    corpus = load_text_files(str(f))
    got = {s: list(corpus.lines(s)) for s in ("train", "valid", "test")}
    assert [len(got[s]) for s in ("train", "valid", "test")] == [900, 50, 50]
    assert got["train"] + got["valid"] + got["test"] == [f"line {i}" for i in range(1000)]


def test_disjoint_split_gives_each_model_its_own_blocks(corpus_dirs):
    cfg = lm_config(*corpus_dirs, "data.split=disjoint", "codistill.n_models=2")
    task = LMTask(cfg, torch.device("cpu"))
    seen = []
    for m in range(2):
        topo = Topology(Grid(2, 2), m, None, None)
        batches, steps = task.train_batches(topo, cfg.train.seed + m)
        rows = {tuple(r) for _ in range(steps) for r in next(batches)[0].tolist()}
        seen.append(rows)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_blocks_are_shifted_by_one_token(corpus_dirs):
    task = LMTask(lm_config(*corpus_dirs), torch.device("cpu"))
    x, y = task.batch("train", [0, 3])
    tokens = torch.from_numpy(np.asarray(task.tokens["train"][:16 * 4 + 1], dtype=np.int64))
    assert torch.equal(x[1], tokens[48:64]) and torch.equal(y[1], tokens[49:65])


def test_token_cache_is_memory_mapped_and_reused(corpus_dirs, monkeypatch):
    cfg = lm_config(*corpus_dirs)
    LMTask(cfg, torch.device("cpu"))
    d = cache_dir(cfg, load_corpus(cfg))
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert set(stamps) == {"tokenizer.model", "train.bin", "valid.bin", "test.bin", "cache.json"}

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("codistill.lm.cache.train_tokenizer", fail)
    monkeypatch.setattr("codistill.lm.cache.encode_split", fail)
    task = LMTask(cfg, torch.device("cpu"))
    assert isinstance(task.tokens["train"], np.memmap)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


# -- objective -------------------------------------------------------------------------------------

def test_sequence_kl_is_the_per_token_kl_averaged_over_tokens(corpus_dirs):
    from codistill.exchange import Teachers
    from codistill.losses import codistillation_loss

    cfg = lm_config(*corpus_dirs)
    task = LMTask(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    student, teacher = task.build_model("gpt_tiny").eval(), task.build_model("gpt_tiny").eval()  # no dropout
    teachers = Teachers({1: teacher}, "eval")
    teachers.versions[1] = 0
    batch = task.batch("train", [0, 1, 2])
    logits, targets = task.forward(student, batch)
    (t_logits,) = teachers.logits(batch, lambda m, b: task.forward(m, b)[0])  # the trainer's teacher forward
    out = codistillation_loss(logits, [t_logits], targets)
    s3, t3 = student(batch[0]).double(), teacher(batch[0]).double()
    kl, ce = 0.0, 0.0
    for b in range(3):
        for t in range(16):
            p_t = F.softmax(t3[b, t], -1)
            kl += (p_t * (F.log_softmax(t3[b, t], -1) - F.log_softmax(s3[b, t], -1))).sum()
            ce -= F.log_softmax(s3[b, t], -1)[batch[1][b, t]]
    assert out["distill"].item() == pytest.approx(kl.item() / 48, rel=1e-4)
    assert out["task"].item() == pytest.approx(ce.item() / 48, rel=1e-4)


# -- bad input -------------------------------------------------------------------------------------

def _bad(tmp_path, kind):
    root = write_text(tmp_path / "text", lines=400)
    if kind == "empty":
        (root / "valid.txt").write_text("")
    elif kind == "not utf-8":
        (root / "train.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    return root


BAD = [
    ("empty", [], "valid.txt is empty"),
    ("not utf-8", [], "train.txt is not UTF-8"),
    ("context", ["lm.context=512", "data.batch_size=512"], "longer than model 'gpt_tiny'"),
    ("vocabulary", ["lm.vocab_size=30000"], "more than the training text"),
    ("batch", ["data.batch_size=160000"], "fewer than one step"),
]


@pytest.mark.parametrize("kind, sets, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(tmp_path, capsys, kind, sets, fragment):
    root = _bad(tmp_path, kind)
    args = ["train", "--set", "data.name=text_files", "--set", f"data.root={root}", "--set",
            f"lm.cache_dir={tmp_path / 'cache'}", "--set", "lm.context=16", "--set", "lm.vocab_size=256",
            "--set", "data.batch_size=64", "--set", "model.name=gpt_tiny", "--set", "train.progress=false"]
    for s in sets:
        args += ["--set", s]
    code = main(args + ["--nproc", "2", "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("codistill: error: "), lines
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # checked before the run directory is made


# -- multi-process ---------------------------------------------------------------------------------

def _worker(rank, world, cfg, run_dir):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, run_dir)
    first = tr.task.evaluate(tr.model, "val", tr.topo)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    summary = tr.fit()
    return {"first": first, "summary": summary, "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


@pytest.mark.parametrize("n", [2, 4])
def test_codistillation_of_gpt_tiny_on_gloo(corpus_dirs, tmp_path, n):
    cfg = lm_config(*corpus_dirs, f"codistill.n_models={n}", "codistill.exchange_every=5", "train.steps=20",
                    "train.eval_every=0")
    LMTask.prepare(cfg, tmp_path)
    results = run_workers(_worker, n, tmp_path, (cfg, str(tmp_path)), timeout=500)
    s = results[0]["summary"]
    assert all(r["summary"]["models"] == s["models"] for r in results)
    assert s["n_models"] == n and s["steps"] == 20 and s["exchanges"] >= 4
    for before, m in zip(results[0]["first"]["models"], s["models"]):
        assert m["val_loss"] < before["loss"] - 0.5  # it learned
        assert m["val_perplexity"] == pytest.approx(np.exp(m["val_loss"]))
    assert s["ensemble_val_loss"] <= sum(m["val_loss"] for m in s["models"]) / n + 1e-9  # Jensen
    assert (tmp_path / "sample.txt").read_text().count("# continuation:") == 1
    # Peak resident memory per worker (docs/lm.md): the whole process, and what training added.
    print(json.dumps({"n_models": n, "peak_rss_mib_per_worker": [round(r["peak_rss_mb"]) for r in results],
                      "training_added_mib": [round(r["peak_rss_mb"] - r["rss_before_mb"]) for r in results]}))


def test_compare_table_shows_perplexity_for_language_models():
    from codistill.compare import format_table

    def summary(n, losses):
        return {"n_models": n, "replicas": 2 // n, "steps": 300, "ensemble_val_loss": 4.0,
                "bytes_per_worker": {"allreduce": 0.0, "exchange": 0.0}, "samples_per_s": 5120.0,
                "wall_seconds": 100.0,
                "models": [{"val_perplexity": float(np.exp(v)), "test_perplexity": 60.0, "train_loss": v,
                            "val_loss": v} for v in losses]}

    table = format_table([{"name": "allreduce", "summary": summary(1, [4.5])},
                          {"name": "codistill", "summary": summary(2, [4.2, 4.3])}])
    assert "val ppl per model" in table and "tokens/s" in table and "acc" not in table
    assert "| allreduce | 1 x 2 | 300 | 90.0 | - | 60.0 |" in table
    assert "| codistill | 2 x 1 | 300 | 66.7 / 73.7 | 54.6 | 60.0 |" in table


def test_bible_web_is_the_debian_world_english_bible():
    """The LM's default corpus (Debian sword-text-web, installed by scripts/setup.sh) loads."""
    from codistill.data import load_dataset

    corpus = load_dataset("bible_web")
    train = list(itertools.islice(corpus.lines("train"), 100))
    assert len(train) == 100 and all(isinstance(line, str) for line in train)
    assert sum(len(line.split()) for line in train) > 1000  # verses of running text
    assert next(iter(corpus.lines("test")), "").strip()
