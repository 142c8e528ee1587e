"""`TranslationTask`: the trainer's Task interface (see `codistill.tasks`) for translation.

- Data: a registered parallel corpus (`bible_en_es`, `parallel_text`), reversed with
  `translation.reverse`, a seeded `data.fraction` of its training pairs, tokenized with the run's
  shared tokenizer; training pairs longer than `translation.max_len` tokens are dropped.
- Batches hold at most `translation.max_tokens` source + target tokens, padding included, per
  worker. Sentences are sorted by length (ties broken by the model's seed) and cut into batches once;
  each epoch shuffles the batches (seed, epoch) and deals them to the replicas, cut to a count every
  replica of every model shares (so all workers take the same steps). `data.split = disjoint` gives
  each model its own 1/n of the pairs. Resuming at step s yields exactly the batches from step s on.
- forward (the student's; the teachers' too, under no_grad) flattens (B, T) positions: logits (B*T, V), targets (B*T,) with padding
  at IGNORE_INDEX, which `codistillation_loss` and the evaluation leave out. Label smoothing is
  `train.label_smoothing`, applied by that loss.
- evaluate (`codistill.evaluation.evaluate`, as classification): NLL per target token ("loss",
  without smoothing), token accuracy, perplexity, and on the test split BLEU (sacrebleu, detokenized output of greedy or beam search on
  `translation.bleu_sentences` sentences), of every model and of the ensemble, which averages the
  models' probabilities (when decoding, too: its workers choose each token together).

Batch size and the LR: the trainer's model batch is `data.batch_size x replicas`, used for linear
LR scaling (`schedule.scale_lr`) and its samples/s. Translation batches by tokens, so either set
`schedule.scale_lr: false`, or set `data.batch_size` to `translation.max_tokens`: the model batch
then counts tokens (an upper bound) and `optim.lr` is the LR per `schedule.reference_batch` tokens.
`data.val_fraction`, `data.eval_batch_size` and `data.num_workers` are not used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..data import load_dataset, model_indices, shuffle_and_deal
from ..data.corpus import Bitext, ParallelCorpus
from ..errors import ConfigError, DataError
from ..evaluation import eval_subset, evaluate
from ..losses import IGNORE_INDEX
from ..models import build_model
from ..models.transformer import beam_search
from ..topology import Topology, model_seed
from .tokenizer import TOKENIZER_FILE, Tokenizer, train_tokenizer

FRACTION_SEED = 1236  # fixed: the training subset must not move with the training seed


class Batch(NamedTuple):
    src: torch.Tensor  # (B, S) source ids + EOS, padded
    tgt_in: torch.Tensor  # (B, T) BOS + target ids, padded
    tgt_out: torch.Tensor  # (B, T) target ids + EOS, IGNORE_INDEX at padding


class Encoded(NamedTuple):
    """A tokenized split: src[i] ends with EOS; tgt[i] has neither BOS nor EOS."""

    src: list[list[int]]
    tgt: list[list[int]]

    def lengths(self, i: int) -> tuple[int, int]:
        """(source, decoder) lengths of pair i, as batched (tgt + BOS or EOS)."""
        return len(self.src[i]), len(self.tgt[i]) + 1


def collate(data: Encoded, indices: list[int], pad: int, bos: int, eos: int) -> Batch:
    s_len = max(len(data.src[i]) for i in indices)
    t_len = max(len(data.tgt[i]) for i in indices) + 1
    src = torch.full((len(indices), s_len), pad, dtype=torch.long)
    tgt_in = torch.full((len(indices), t_len), pad, dtype=torch.long)
    tgt_out = torch.full((len(indices), t_len), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        s, t = data.src[i], data.tgt[i]
        src[row, : len(s)] = torch.tensor(s)
        tgt_in[row, : len(t) + 1] = torch.tensor([bos] + t)
        tgt_out[row, : len(t) + 1] = torch.tensor(t + [eos])
    return Batch(src, tgt_in, tgt_out)


def token_batches(lengths: list[tuple[int, int]], indices: list[int], max_tokens: int,
                  seed: int | None = None) -> list[list[int]]:
    """Cut `indices`, sorted by (source, target) length, into batches of at most `max_tokens`
    padded tokens: len(batch) x (longest source + longest target) <= max_tokens.

    Ties in length are broken by a shuffle with `seed` (None keeps index order). A pair longer than
    max_tokens on its own gets a batch of its own.
    """
    order = list(indices)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    order.sort(key=lambda i: lengths[i])  # stable: the shuffle decides among equal lengths
    batches, current, s_max, t_max = [], [], 0, 0
    for i in order:
        s, t = lengths[i]
        s_new, t_new = max(s_max, s), max(t_max, t)
        if current and (len(current) + 1) * (s_new + t_new) > max_tokens:
            batches.append(current)
            current, s_new, t_new = [], s, t
        current.append(i)
        s_max, t_max = s_new, t_new
    if current:
        batches.append(current)
    return batches


def max_output(source_length: int) -> int:
    """Longest translation decoded for a source of this many tokens (fairseq's 1.2 x + 10)."""
    return int(1.2 * source_length) + 10


_TOKENIZERS: dict[tuple, bytes] = {}  # in-memory tokenizers of tasks built without a run directory


def load_corpus(cfg: Config) -> ParallelCorpus:
    """The configured corpus: direction and training fraction applied."""
    corpus = load_dataset(cfg.data.name, cfg.data.root)
    if not isinstance(corpus, ParallelCorpus):
        raise ConfigError(f"data.name: {cfg.data.name!r} is not a parallel corpus")
    if cfg.translation.reverse:
        corpus = corpus.reversed()
    if cfg.data.fraction < 1:
        g = torch.Generator().manual_seed(FRACTION_SEED)
        keep = torch.randperm(len(corpus.train), generator=g)[: max(1, round(cfg.data.fraction * len(corpus.train)))]
        corpus = ParallelCorpus(corpus.train.select(sorted(keep.tolist())), corpus.valid, corpus.test)
    return corpus


def build_tokenizer(cfg: Config, corpus: ParallelCorpus | None = None) -> Tokenizer:
    """Train the run's tokenizer on the training split, both languages together."""
    corpus = corpus or load_corpus(cfg)
    return Tokenizer(train_tokenizer(corpus.train.src + corpus.train.tgt, cfg.translation.vocab_size))


def memory_tokenizer(cfg: Config, corpus: ParallelCorpus | None = None) -> Tokenizer:
    """The run's tokenizer, trained once per process and config (training is deterministic)."""
    d, t = cfg.data, cfg.translation
    key = (d.name, d.root, d.fraction, t.vocab_size, t.reverse)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = build_tokenizer(cfg, corpus).proto
    return Tokenizer(_TOKENIZERS[key])


class TranslationTask:
    """Sequence-to-sequence translation from a registered parallel corpus."""

    model_kind = "seq2seq"  # what its models read (codistill.models.KINDS)

    def __init__(self, cfg: Config, device: torch.device, run_dir=None):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.corpus = load_corpus(cfg)
        self.tokenizer = self._load_tokenizer()
        t = cfg.translation
        train = self.encode(self.corpus.train)
        keep = [i for i in range(len(train.src))
                if max(train.lengths(i)) <= t.max_len and sum(train.lengths(i)) <= t.max_tokens]
        if not keep:
            raise DataError(f"no training pair of {cfg.data.name!r} fits translation.max_len={t.max_len} "
                            f"and translation.max_tokens={t.max_tokens}")
        self.train = Encoded([train.src[i] for i in keep], [train.tgt[i] for i in keep])
        self._lengths = [self.train.lengths(i) for i in range(len(self.train.src))]
        self._encoded: dict[str, Encoded] = {}
        self._plans: dict[tuple, list[list[int]]] = {}

    # -- setup --------------------------------------------------------------------------------

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """The corpus files and the tokenizer, trained here in memory (and kept for `prepare`), so a
        vocabulary the corpus cannot train is an error before the run directory is touched."""
        memory_tokenizer(cfg, load_corpus(cfg))

    @classmethod
    def prepare(cls, cfg: Config, run_dir) -> None:
        """Save the tokenizer into the run directory unless it is there (a resumed run keeps it)."""
        path = Path(run_dir) / TOKENIZER_FILE
        if not path.exists():
            memory_tokenizer(cfg).save(path)

    def _load_tokenizer(self) -> Tokenizer:
        if self.run_dir is not None and (Path(self.run_dir) / TOKENIZER_FILE).exists():
            return Tokenizer.load(Path(self.run_dir) / TOKENIZER_FILE)
        # No prepared file (tests, `codistill compare` sizing its arms): training is deterministic,
        # so an in-memory copy equals the one `prepare` writes.
        return memory_tokenizer(self.cfg, self.corpus)

    def encode(self, bitext: Bitext) -> Encoded:
        eos = self.tokenizer.eos_id
        return Encoded([s + [eos] for s in self.tokenizer.encode(bitext.src)], self.tokenizer.encode(bitext.tgt))

    def encoded(self, split: str) -> Encoded:
        """A held-out split ("val" or "test"), tokenized once."""
        if split not in self._encoded:
            self._encoded[split] = self.encode(self.corpus.split(split))
        return self._encoded[split]

    def build_model(self, name: str) -> nn.Module:
        tok = self.tokenizer
        return build_model(name, tok.vocab_size, (), pad_idx=tok.pad_id, **self.cfg.model.options).to(self.device)

    # -- training -----------------------------------------------------------------------------

    def batch_plan(self, model: int, n_models: int, seed: int) -> list[list[int]]:
        """Model `model`'s training batches (pair indices), fixed for the run; shuffled per epoch."""
        key = (model, n_models, seed)
        if key not in self._plans:
            indices = model_indices(torch.arange(len(self.train.src)), self.cfg.data.split, model, n_models,
                                    self.cfg.train.seed).tolist()
            self._plans[key] = token_batches(self._lengths, indices, self.cfg.translation.max_tokens, seed)
        return self._plans[key]

    def train_batches(self, topo: Topology, seed: int, start_step: int = 0):
        """(iterator of this worker's `Batch`es from global step `start_step` on, steps per epoch).

        `seed` is this model's (`model_seed(train.seed, topo.model_index)`); steps per epoch as
        `steps_per_epoch`.
        """
        steps = self.steps_per_epoch(topo)
        batches = self.batch_plan(topo.model_index, topo.n_models, seed)
        return self._iterate(batches, steps, topo.replicas, topo.replica_index, seed, start_step), steps

    @property
    def flops_sequence_length(self) -> int:
        """Mean source and target length of the training pairs, for the FLOP count (throughput.py)."""
        return round(sum(s + t for s, t in self._lengths) / max(1, 2 * len(self._lengths)))

    def steps_per_epoch(self, topo: Topology) -> int:
        """The smallest batch count of any model over the replicas: every model and every replica
        then take the same number of steps (models' counts differ slightly, as their batches do), in
        this job or in another one (exchange through storage)."""
        counts = [len(self.batch_plan(m, topo.n_models, model_seed(self.cfg.train.seed, m)))
                  for m in range(topo.n_models)]
        steps = min(counts) // topo.replicas
        if steps == 0:
            raise DataError(f"{min(counts)} batches of translation.max_tokens="
                            f"{self.cfg.translation.max_tokens} are fewer than the {topo.replicas} replicas")
        return steps

    def _iterate(self, batches, steps, replicas, replica, seed, start_step):
        tok = self.tokenizer
        epoch, offset = divmod(start_step, steps)
        while True:
            mine = shuffle_and_deal(len(batches), seed, epoch, replicas, replica)[:steps].tolist()
            for j in mine[offset:]:
                yield collate(self.train, batches[j], tok.pad_id, tok.bos_id, tok.eos_id)
            epoch, offset = epoch + 1, 0

    def _to_device(self, batch: Batch) -> Batch:
        return Batch(*(t.to(self.device, non_blocking=True) for t in batch))

    def forward(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = self._to_device(batch)
        logits = module(src, tgt_in)  # (B, T, V)
        return logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1)

    # -- evaluation ---------------------------------------------------------------------------

    def _shard(self, data: Encoded, indices: list[int], topo: Topology, lengths=None) -> list[list[int]]:
        """This replica's share of `indices` (sorted by length, dealt round-robin), in token batches."""
        lengths = lengths or [data.lengths(i) for i in range(len(data.src))]
        order = sorted(indices, key=lambda i: lengths[i])
        return token_batches(lengths, order[topo.replica_index::topo.replicas], self.cfg.translation.max_tokens)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, topo: Topology) -> dict:
        """Metrics of every model and the ensemble on the split (per target token, as
        `codistill.evaluation.evaluate`), perplexity, and BLEU on "test"; identical on all ranks."""
        data, tok = self.encoded(split), self.tokenizer
        pairs = list(range(len(data.src)))
        if split == "val":
            pairs = eval_subset(pairs, self.cfg.eval.max_samples)
        batches = (collate(data, idx, tok.pad_id, tok.bos_id, tok.eos_id) for idx in self._shard(data, pairs, topo))
        result = evaluate(model, batches, self.forward, topo, self.device, self.cfg.eval.topk)
        for m in result["models"]:
            m["perplexity"] = math.exp(min(m["loss"], 700.0))
        if split == "test":
            was_training = model.training
            model.eval()
            scores, ensemble, decode_bytes = self.bleu(model, topo)
            result["bytes_sent"] = result.get("bytes_sent", 0) + decode_bytes
            for m, bleu in zip(result["models"], scores):
                m["bleu"] = bleu
            if ensemble is not None:
                result["ensemble"]["bleu"] = ensemble
            model.train(was_training)
        return result

    def translate(self, model: nn.Module, sentences: Encoded, indices: list[int], topo: Topology,
                  combine=None) -> dict[int, str]:
        """{index: detokenized translation} of this replica's share of `indices` (by the ensemble of
        the column's models when `combine` is `ensemble_log_probs`)."""
        tok, beam = self.tokenizer, self.cfg.translation.beam
        # Budget each batch for its source and the longest output it may produce.
        lengths = [(len(s), max_output(len(s))) for s in sentences.src]
        out: dict[int, str] = {}
        for idx in self._shard(sentences, indices, topo, lengths):
            src = collate(sentences, idx, tok.pad_id, tok.bos_id, tok.eos_id).src.to(self.device)
            limits = torch.tensor([max_output(len(sentences.src[i])) for i in idx])
            hyps = beam_search(model, src, tok.bos_id, tok.eos_id, limits, beam=beam, combine=combine)
            rows = [row[: row.index(tok.eos_id)] if tok.eos_id in row else row for row in hyps.tolist()]
            out.update(zip(idx, tok.decode(rows)))
        return out

    def bleu(self, model: nn.Module, topo: Topology) -> tuple[list[float], float | None, float]:
        """Corpus BLEU of every model on the first `translation.bleu_sentences` test sentences, of
        their ensemble (None for one model), and the bytes this worker sent to the other models while
        decoding with the ensemble: the column's workers decode the same sentences in step,
        choosing every token by the models' mean probability."""
        try:
            import sacrebleu
        except ImportError:
            from ..errors import UserError

            raise UserError("BLEU needs sacrebleu: pip install 'codistill[translation]'") from None
        test, refs = self.encoded("test"), self.corpus.test.tgt
        count = self.cfg.translation.bleu_sentences or len(refs)
        indices = list(range(min(count, len(refs))))

        def score(combine=None) -> float:
            mine = self.translate(model, test, indices, topo, combine)
            if topo.replicas > 1:  # every worker of this model gets all its translations
                parts = [None] * topo.replicas
                dist.all_gather_object(parts, mine, group=topo.model_group)
                mine = {i: h for part in parts for i, h in part.items()}
            return sacrebleu.corpus_bleu([mine[i] for i in indices], [[refs[i] for i in indices]]).score

        own = score()
        if topo.job_models == 1:
            return [own], None, 0.0
        combine = ensemble_log_probs(topo.exchange_group, topo.job_models)
        ensemble = score(combine)
        scores = [None] * topo.job_models  # the column holds one worker of each model, in model order
        dist.all_gather_object(scores, own, group=topo.exchange_group)
        return scores, ensemble, combine.bytes_sent


def ensemble_log_probs(group, n_models: int):
    """A decoding `combine`: the log of the mean of the n models' probabilities, summed over `group`
    (one worker of each model). all_reduce leaves the same sum on every member, so all of them
    choose the same tokens. Beam search needs every token's probability, so these (rows, V)
    all-reduces stay (on `translation.bleu_sentences` test sentences, once per run); `bytes_sent`
    counts them as ring all-reduces (accounting.py)."""

    def combine(logp: torch.Tensor) -> torch.Tensor:
        probs = logp.exp()
        dist.all_reduce(probs, group=group)
        combine.bytes_sent += 2.0 * (n_models - 1) / n_models * probs.numel() * probs.element_size()
        return (probs / n_models).log()

    combine.bytes_sent = 0.0
    return combine
