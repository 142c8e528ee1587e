"""Translation: SWORD reader, corpora, tokenizer, Transformer, token batching, the task end to end."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codistill.data.corpus import Bitext, filter_ratio, load_parallel_text, read_aligned, split_bitext
from codistill.data.sword import read_testament, read_verses, strip_osis
from codistill.errors import DataError
from codistill.losses import IGNORE_INDEX, codistillation_loss
from codistill.topology import Grid, Topology

pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------------------------------------
# Fixtures: a SWORD module and a parallel corpus, written by the tests


def write_ztext(directory: Path, testament: str, verses: list[str], per_block: int = 2) -> None:
    """Write `verses` as a zText testament: blocks of `per_block` verses, each a zlib stream."""
    directory.mkdir(parents=True, exist_ok=True)
    bzv, bzs, bzz = bytearray(), bytearray(), bytearray()
    for b, start in enumerate(range(0, len(verses), per_block)):
        block = bytearray()
        for text in verses[start:start + per_block]:
            raw = text.encode("utf-8")
            bzv += struct.pack("<IIH", b, len(block), len(raw))
            block += raw
        packed = zlib.compress(bytes(block))
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
    for ext, data in (("bzv", bzv), ("bzs", bzs), ("bzz", bzz)):
        (directory / f"{testament}.{ext}").write_bytes(bytes(data))


VERSES = [
    "",
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/> <title type="chapter">Chapter One</title>',
    'In the <w lemma="strong:H7225">beginning</w> <w lemma="strong:H0430">God</w> created.',
    'And <w lemma="x">God</w> saw the light.<note placement="foot"><reference type="annotateRef">1.4 '
    '</reference>the light: Heb. <w>between</w></note> ',
    '¶ the <divineName><w lemma="H3068">LORD</w></divineName> <transChange type="added">is</transChange> '
    'good &amp; kind\\+nd*<l eID="x1"/><l sID="x2"/>and true',
]


def test_sword_reader_reads_blocks_and_strips_markup(tmp_path):
    write_ztext(tmp_path, "ot", VERSES, per_block=2)
    write_ztext(tmp_path, "nt", ["<w>Jesus</w> wept."], per_block=1)
    assert read_testament(tmp_path, "ot") == VERSES
    assert read_verses(tmp_path) == [
        "", "", "In the beginning God created.", "And God saw the light.",
        "the LORD is good & kind and true", "Jesus wept."]
    assert read_verses(tmp_path, ("nt",)) == ["Jesus wept."]


def test_strip_osis_keeps_words_drops_notes_and_titles():
    assert strip_osis('<w lemma="a">EN el</w> <w>principio</w>. <note>a <w>b</w> c</note>') == "EN el principio."
    assert strip_osis('<title type="psalm"><foreign>ALEPH</foreign></title>Bless<w>ed</w>') == "Blessed"
    assert strip_osis('<q who="Jesus">Follow me</q><lb type="x-p"/>now') == "Follow me now"
    assert strip_osis('<note type="x" />kept') == "kept"  # self-closing note: nothing to drop


@pytest.mark.parametrize("damage, file", [
    (lambda d: (d / "ot.bzz").write_bytes(b"\x00" * 40), "ot.bzz"),  # not a zlib stream
    (lambda d: (d / "ot.bzv").write_bytes((d / "ot.bzv").read_bytes()[:-3]), "ot.bzv"),  # truncated index
    (lambda d: (d / "ot.bzs").unlink(), "ot.bzs"),  # missing
    (lambda d: (d / "ot.bzs").write_bytes(struct.pack("<III", 0, 10, 10_000) * 3), "ot.bzz"),  # wrong size
])
def test_sword_reader_errors_name_the_file(tmp_path, damage, file):
    write_ztext(tmp_path, "ot", VERSES, per_block=2)
    damage(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path / file).replace(".", r"\.")):
        read_testament(tmp_path, "ot")


def test_sword_missing_module_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_verses(tmp_path / "nope")


@pytest.mark.skipif(not Path("/usr/share/sword/modules/texts/ztext/spaRV1909eb").is_dir(),
                    reason="Debian packages sword-text-kjv and sword-text-sparv not installed")
def test_bible_corpus_from_the_debian_modules():
    from codistill.data.corpus import load_bible

    corpus = load_bible()
    assert 28_000 < len(corpus.train) < 31_000 and 500 < len(corpus.valid) == len(corpus.test) < 700
    pairs = dict(zip(corpus.train.src + corpus.valid.src + corpus.test.src,
                     corpus.train.tgt + corpus.valid.tgt + corpus.test.tgt))
    assert pairs["In the beginning God created the heaven and the earth."] == \
        "EN el principio crió Dios los cielos y la tierra."
    assert not any("<" in s or ">" in s for s in corpus.train.src[:2000] + corpus.train.tgt[:2000])


# ---------------------------------------------------------------------------------------------
# Corpora

WORDS = ("el gato come pan y la casa es grande pero mi perro bebe agua con su amigo en un dia "
         "de sol").split()
EN = dict(zip(WORDS, ("the cat eats bread and the house is big but my dog drinks water with his "
                      "friend in a day of sun").split()))


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Spanish-like sources and their word-by-word 'translations': learnable by a tiny model."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        src.append(" ".join(words))
        tgt.append(" ".join(EN[w] for w in words))
    return src, tgt


def write_parallel(root: Path, sizes=(400, 40, 30)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for (name, n), seed in zip(zip(("train", "valid", "test"), sizes), (0, 1, 2)):
        src, tgt = synthetic_pairs(n, seed)
        (root / f"{name}.src").write_text("\n".join(src) + "\n", encoding="utf-8")
        (root / f"{name}.tgt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return root


def test_read_aligned_and_mismatch(tmp_path):
    (tmp_path / "a").write_text("uno\ndos\n\n", encoding="utf-8")
    (tmp_path / "b").write_text("one\ntwo\n(empty)\n", encoding="utf-8")
    (tmp_path / "c").write_text("one\n", encoding="utf-8")
    assert read_aligned(tmp_path / "a", tmp_path / "b") == Bitext(("uno", "dos", ""), ("one", "two", "(empty)"))
    with pytest.raises(DataError) as e:
        read_aligned(tmp_path / "a", tmp_path / "c")
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "c") in str(e.value)
    with pytest.raises(DataError, match="not found"):
        read_aligned(tmp_path / "a", tmp_path / "missing")


def test_parallel_text_loader(tmp_path):
    root = write_parallel(tmp_path / "corpus")
    corpus = load_parallel_text(str(root))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (400, 40, 30)
    assert corpus.reversed().train.src == corpus.train.tgt
    (root / "test.tgt").write_text("only one line\n", encoding="utf-8")
    with pytest.raises(DataError, match="test.src"):
        load_parallel_text(str(root) + "/")  # a new cache key: read again


def test_ratio_filter_and_split_are_deterministic():
    bitext = Bitext(("a b c d", "a", "a b", "", "a b c d e"), ("w x", "w x y", "w x", "w", "v w x y z"))
    kept = filter_ratio(bitext)
    assert kept.src == ("a b c d", "a b", "a b c d e")  # ratios 2, 1, 1 kept; 1/3 and empty dropped
    src, tgt = synthetic_pairs(500)
    big = Bitext(tuple(f"{i} {s}" for i, s in enumerate(src)), tuple(tgt))
    one, two = split_bitext(big), split_bitext(big)
    assert one == two
    assert (len(one.valid), len(one.test), len(one.train)) == (10, 10, 480)
    seen = set(one.train.src) | set(one.valid.src) | set(one.test.src)
    assert len(seen) == 500
    assert split_bitext(big, seed=7).valid != one.valid


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_determinism(tmp_path):
    from codistill.translation.tokenizer import BOS, EOS, PAD, Tokenizer, train_tokenizer

    src, tgt = synthetic_pairs(300)
    proto = train_tokenizer(src + tgt + ["¿Qué? ¡Sí, señor!"], vocab_size=120)
    assert proto == train_tokenizer(src + tgt + ["¿Qué? ¡Sí, señor!"], vocab_size=120)
    tok = Tokenizer(proto)
    assert tok.vocab_size <= 120 and (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    assert len({PAD, BOS, EOS, tok.unk_id}) == 4
    texts = ["el gato come pan", "the dog drinks water", "¿Qué? ¡Sí, señor!"]
    ids = tok.encode(texts)
    assert all(PAD not in s and BOS not in s and EOS not in s for s in ids)
    assert tok.decode([s + [EOS, PAD, PAD] for s in ids]) == texts
    tok.save(tmp_path / "tokenizer.model")
    assert Tokenizer.load(tmp_path / "tokenizer.model").encode(texts) == ids


# ---------------------------------------------------------------------------------------------
# Transformer


def _tiny(vocab=40, **options):
    from codistill.models import build_model

    torch.manual_seed(0)
    return build_model("transformer_tiny", vocab, (), **options)


def test_transformer_shapes_and_padding_invariance():
    model = _tiny(dropout=0.0).eval()
    src = torch.randint(4, 40, (3, 7))
    tgt = torch.randint(4, 40, (3, 5))
    assert model(src, tgt).shape == (3, 5, 40)
    # Padding the source or appending target positions changes nothing at the real positions.
    padded_src = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    longer_tgt = torch.cat([tgt, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded_src, longer_tgt)[:, :5], model(src, tgt), atol=1e-5, rtol=1e-5)


def test_shared_embeddings_tie_source_target_and_output():
    shared, separate = _tiny(), _tiny(share_embeddings=False)
    assert shared.output_weight is shared.embed.weight
    assert sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters()) == 2 * 40 * 128
    # Trained together: a gradient through the output projection reaches the (shared) embedding.
    out = shared(torch.randint(4, 40, (2, 3)), torch.randint(4, 40, (2, 3)))
    out.sum().backward()
    assert shared.embed.weight.grad is not None and shared.embed.weight.grad.abs().sum() > 0


def test_presets_sizes():
    from codistill.models import MODELS, build_model

    assert {"transformer_tiny", "transformer_base", "transformer_big"} <= set(MODELS)
    with torch.device("meta"):  # no memory, no init cost
        big = build_model("transformer_big", 32000, ())
        base = build_model("transformer_base", 32000, ())
    n_big = sum(p.numel() for p in big.parameters())
    assert 205e6 < n_big < 213e6  # Vaswani et al.'s big model: ~209M with a shared 32k vocabulary
    assert len(big.encoder.layers) == len(big.decoder.layers) == 6 and big.d_model == 1024
    assert base.d_model == 512 and base.encoder.layers[0].self_attn.num_heads == 8


@pytest.mark.parametrize("options", [{}, {"norm_first": False}, {"share_embeddings": False, "learned_positions": True}])
def test_incremental_decoding_matches_full_decoder(options):
    from codistill.models.transformer import DecoderState, greedy_decode

    model = _tiny(**options).eval()
    src = torch.randint(4, 40, (4, 9))
    src[1, 5:] = 0
    out = greedy_decode(model, src, bos=2, eos=3, max_len=8)
    with torch.no_grad():
        memory, pad = model.encode(src)
        prefix = torch.cat([torch.full((4, 1), 2), out], dim=1)
        full = model.decode(prefix, memory, pad)
        state = DecoderState(model, memory, pad)
        steps = torch.stack([state.step(prefix[:, t]) for t in range(prefix.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def _score(model, src, hyp, bos=2, eos=3):
    """Sum of log-probabilities of each hypothesis (up to and including its first EOS)."""
    with torch.no_grad():
        prefix = torch.cat([torch.full((len(hyp), 1), bos), hyp], dim=1)[:, :-1]
        logp = F.log_softmax(model(src, prefix), dim=-1).gather(2, hyp.unsqueeze(2)).squeeze(2)
    scores = []
    for row, lp in zip(hyp.tolist(), logp):
        n = row.index(eos) + 1 if eos in row else len(row)
        scores.append(lp[:n].sum().item())
    return torch.tensor(scores)


def test_beam_search_finds_at_least_the_greedy_likelihood():
    from codistill.models.transformer import beam_search, greedy_decode

    model = _tiny(vocab=12).eval()
    src = torch.randint(4, 12, (6, 5))
    greedy = greedy_decode(model, src, 2, 3, max_len=6)
    assert torch.equal(beam_search(model, src, 2, 3, max_len=6, beam=1), greedy)
    beam = beam_search(model, src, 2, 3, max_len=6, beam=8, length_penalty=0.0)  # raw log-probability
    assert beam.shape[0] == 6
    assert bool((_score(model, src, beam) >= _score(model, src, greedy) - 1e-4).all())


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_a_sentence_does_not_depend_on_its_batch(beam):
    from codistill.models.transformer import beam_search

    model = _tiny(vocab=30).eval()
    src = torch.randint(4, 30, (3, 8))
    src[0, 3:] = 0  # a short sentence batched with longer ones
    limits = torch.tensor([5, 12, 12])
    together = beam_search(model, src, 2, 3, limits, beam=beam)
    alone = beam_search(model, src[:1, :3], 2, 3, limits[:1], beam=beam)
    assert together.shape[1] <= 12 and alone.shape[1] <= 5
    width = alone.shape[1]
    assert torch.equal(together[:1, :width], alone) and bool((together[0, width:] == 0).all())


# ---------------------------------------------------------------------------------------------
# The task


def _config(root, **overrides):
    from codistill.config import load_config

    settings = {"data.name": "parallel_text", "data.root": str(root), "model.name": "transformer_tiny",
                "model.options": {"dropout": 0.0}, "translation.vocab_size": 100,
                "translation.max_tokens": 200, "translation.max_len": 24, "translation.bleu_sentences": 12,
                "train.label_smoothing": 0.1, "train.progress": False}
    settings.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_parallel(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def task(corpus_dir):
    from codistill.tasks import make_task

    return make_task(_config(corpus_dir), torch.device("cpu"))


def _topo(n_models=1, replicas=1, model=0, replica=0):
    grid = Grid(n_models * replicas, n_models)
    return Topology(grid, grid.rank(model, replica), None, None)


def test_dataset_selects_the_translation_task(corpus_dir):
    from codistill.data import DATASETS
    from codistill.tasks import task_class
    from codistill.translation.task import TranslationTask

    assert DATASETS["bible_en_es"].task is DATASETS["parallel_text"].task is TranslationTask
    assert task_class(_config(corpus_dir)) is TranslationTask


def test_steps_per_epoch_is_the_count_train_batches_uses(corpus_dir):
    from codistill.tasks import make_task
    from codistill.topology import model_seed

    task = make_task(_config(corpus_dir, **{"data.split": "disjoint", "codistill.n_models": 2}), torch.device("cpu"))
    for m in range(2):
        topo = _topo(2, 2, m, 1)
        _, spe = task.train_batches(topo, seed=model_seed(task.cfg.train.seed, m))
        counts = [len(task.batch_plan(j, 2, model_seed(task.cfg.train.seed, j))) for j in range(2)]
        assert task.steps_per_epoch(topo) == spe == min(counts) // 2


def _batch_sets(task, topo, seed, steps, start=0):
    batches, spe = task.train_batches(topo, seed, start_step=start)
    return [next(batches) for _ in range(steps)], spe


def test_token_batches_respect_max_tokens_and_shard_replicas(task):
    max_tokens = task.cfg.translation.max_tokens
    shards = [_batch_sets(task, _topo(1, 3, 0, r), seed=5, steps=40) for r in range(3)]
    spe = shards[0][1]
    assert spe > 5 and all(s == spe for _, s in shards)  # every replica: the same count
    for batches, _ in shards:
        for b in batches:
            assert b.src.numel() + b.tgt_in.numel() <= max_tokens
            assert b.src.shape[0] == b.tgt_out.shape[0] and (b.tgt_out != IGNORE_INDEX).sum(1).min() >= 1
    # Within one epoch, replicas read disjoint sentences.
    def sentences(batches):
        return {tuple(row.tolist()) for b in batches[:spe] for row in b.src}
    a, b, c = (sentences(bs) for bs, _ in shards)
    assert not (a & b) and not (a & c) and not (b & c)


def test_token_batches_deterministic_per_seed_and_resumable(task):
    topo = _topo(1, 2, 0, 1)
    one, spe = _batch_sets(task, topo, seed=3, steps=2 * 13)
    two, _ = _batch_sets(task, topo, seed=3, steps=2 * 13)
    other, _ = _batch_sets(task, topo, seed=4, steps=2 * 13)
    assert all(torch.equal(x.src, y.src) and torch.equal(x.tgt_out, y.tgt_out) for x, y in zip(one, two))
    assert not all(x.src.shape == y.src.shape and torch.equal(x.src, y.src) for x, y in zip(one, other))
    for start in (1, spe - 1, spe + 2):  # resume mid-epoch and across an epoch boundary
        resumed, _ = _batch_sets(task, topo, seed=3, steps=3, start=start)
        assert all(torch.equal(x.src, y.src) and torch.equal(x.tgt_in, y.tgt_in)
                   for x, y in zip(resumed, one[start:start + 3]))


def test_disjoint_split_gives_each_model_its_own_sentences(corpus_dir):
    from codistill.tasks import make_task

    task = make_task(_config(corpus_dir, **{"data.split": "disjoint", "codistill.n_models": 2}), torch.device("cpu"))
    seen = []
    for m in range(2):
        batches, spe = task.train_batches(_topo(2, 1, m), seed=m)
        seen.append({tuple(row.tolist()) for _ in range(spe) for row in next(batches).src})
    assert not (seen[0] & seen[1])
    assert len(seen[0]) + len(seen[1]) <= len({tuple(s) for s in task.train.src})


def test_padding_targets_are_masked_in_the_loss(task):
    batches, _ = task.train_batches(_topo(), seed=0)
    batch = next(batches)
    model, teacher = task.build_model("transformer_tiny"), task.build_model("transformer_tiny").eval()
    logits, targets = task.forward(model, batch)
    with torch.no_grad():  # a teacher's logits: the same forward pass
        t_logits, _ = task.forward(teacher, batch)
    assert logits.shape == t_logits.shape == (batch.tgt_in.numel(), task.tokenizer.vocab_size)
    assert (targets == IGNORE_INDEX).sum() == (batch.tgt_in == task.tokenizer.pad_id).sum() > 0
    out = codistillation_loss(logits, [t_logits], targets, alpha=0.5, label_smoothing=0.1)
    real = targets != IGNORE_INDEX
    ref_task = F.cross_entropy(logits[real], targets[real], label_smoothing=0.1)
    ref_kl = F.kl_div(F.log_softmax(logits[real], -1), F.log_softmax(t_logits[real], -1),
                      reduction="batchmean", log_target=True)
    torch.testing.assert_close(out["task"], ref_task)
    torch.testing.assert_close(out["distill"], ref_kl)


def test_single_process_training_lowers_validation_nll_and_reports_bleu(task, tmp_path):
    topo = _topo()
    torch.manual_seed(0)
    model = task.build_model("transformer_tiny")
    before = task.evaluate(model, "val", topo)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    batches, _ = task.train_batches(topo, seed=0)
    for _ in range(25):
        logits, targets = task.forward(model, next(batches))
        loss = codistillation_loss(logits, [], targets, label_smoothing=0.1)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(model, "val", topo)
    assert after["models"][0]["loss"] < before["models"][0]["loss"] - 0.5
    assert after["count"] == sum(len(t) + 1 for t in task.encoded("val").tgt)
    assert after["ensemble"]["loss"] == pytest.approx(after["models"][0]["loss"], rel=1e-6)
    assert after["disagreement"] == 0.0 and model.training
    test = task.evaluate(model, "test", topo)
    m = test["models"][0]
    assert {"loss", "accuracy", "perplexity", "bleu"} <= set(m) and 0.0 <= m["bleu"] <= 100.0
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"])


def test_prepare_writes_the_tokenizer_once(corpus_dir, tmp_path):
    from codistill.translation.task import TranslationTask
    from codistill.translation.tokenizer import TOKENIZER_FILE

    cfg = _config(corpus_dir)
    TranslationTask.prepare(cfg, tmp_path)
    path = tmp_path / TOKENIZER_FILE
    first = path.read_bytes()
    TranslationTask.prepare(cfg, tmp_path)  # a resumed run keeps the file it has
    assert path.read_bytes() == first
    task = TranslationTask(cfg, torch.device("cpu"), tmp_path)
    assert task.tokenizer.proto == first


def test_ensemble_bleu_script_scores_models_of_different_architectures(tmp_path, corpus_dir):
    """A run that trains a tiny and a base Transformer together: the script builds each model's own
    architecture (it built `model.name`, a list here, for every model). Untrained weights suffice."""
    import os
    import re
    import subprocess
    import sys

    from codistill import checkpoint as ckpt
    from codistill.config import dump_yaml
    from codistill.tasks import make_task, task_class

    cfg = _config(corpus_dir, **{"model.name": "[transformer_tiny, transformer_base]", "codistill.n_models": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    task_class(cfg).prepare(cfg, run)  # the run's tokenizer
    task = make_task(cfg, torch.device("cpu"), run)
    hashes = {}
    for i, name in enumerate(cfg.model_names()):
        torch.manual_seed(i)
        state = {"model": task.build_model(name).state_dict()}
        hashes[f"model_{i}.pt"] = ckpt.save_file(state, ckpt.step_dir(run, 1) / f"model_{i}.pt")
    ckpt.commit(run, 1, hashes, world_size=2)
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensemble_bleu.py"
    out = subprocess.run([sys.executable, str(script), str(run), "--sentences", "2"], capture_output=True,
                         text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"2 test sentences: BLEU model 0 [\d.]+, model 1 [\d.]+; ensemble [\d.]+", out.stdout.strip())
