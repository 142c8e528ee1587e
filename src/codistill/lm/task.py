"""`LMTask`: the trainer's Task interface (see `codistill.tasks`) for next-token language modeling.

- Tokens: the corpus's lines, tokenized with the SentencePiece BPE of `codistill.translation.tokenizer`
  (trained on the training split, `lm.vocab_size` pieces), an EOS after each line. Tokenizer and
  token ids are cached under `lm.cache_dir`, keyed by the corpus files and vocabulary size, as
  memory-mapped arrays (uint16, or int32 above 65,535 pieces): a second run maps them and starts in
  seconds. The cache is verified before every launch (`codistill.lm.cache`: checksums, dtype, id
  range, length). `prepare` copies the tokenizer and the cache's manifest into the run directory; a
  resume (`check_resume`) refuses a corpus whose tokens are no longer the ones the run trained on.
- Blocks: a split of N tokens holds (N - 1) // context non-overlapping blocks; block i reads
  tokens [i*T, i*T + T) and predicts [i*T + 1, i*T + T + 1), T = `lm.context`.
- Batches: `data.batch_size` counts tokens (a multiple of `lm.context`), so the trainer's model
  batch, its linear LR scaling and its samples/s are in tokens (samples/s is tokens/s). Blocks are
  dealt by `ShardBatchSampler` with the model's seed, like images; `data.split = disjoint` gives each
  model its own 1/n of the blocks. `data.num_workers` is not used (a batch is one slice of a memmap).
- forward (the student's; the teachers' too, under no_grad) flattens (B, T) positions: logits (B*T, V), targets (B*T,), so
  `codistillation_loss` gives next-token cross-entropy plus the per-token KL toward each teacher
  averaged over all B*T positions.
- evaluate (`codistill.evaluation.evaluate`, as every task): NLL per token ("loss"), perplexity and top-1 next-token accuracy for each model, the
  ensemble (mean of the models' probabilities) and top-1 disagreement; `data.eval_batch_size`
  tokens per batch (at least one block).
- write_extras: after the run's summary is written, model 0's first worker writes a seeded top-k
  sample to `sample.txt` in the run directory.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..data import ShardBatchSampler, eval_batches, load_dataset, model_indices
from ..errors import ConfigError, DataError
from ..evaluation import eval_subset, evaluate
from ..models import build_model
from ..topology import Topology, job_topology
from ..translation.tokenizer import TOKENIZER_FILE, Tokenizer
from .cache import MANIFEST, SPLITS, build_cache, read_manifest, sha256_file, token_dtype
from .corpus import TextCorpus

PROMPT_TOKENS = 16  # the sample continues the first tokens of the test split
RUN_TOKENS = "tokens.json"  # in the run directory: the cache manifest of the tokens the run trains on


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_corpus(cfg: Config) -> TextCorpus:
    corpus = load_dataset(cfg.data.name, cfg.data.root)
    if not isinstance(corpus, TextCorpus):
        raise ConfigError(f"data.name: {cfg.data.name!r} is not a text corpus")
    return corpus


def check_config(cfg: Config, vocab_size: int) -> int:
    """Blocks per training batch; errors for a context the models cannot take or a batch under a block."""
    t = cfg.lm.context
    with torch.device("meta"):  # shapes only: nothing allocated
        for name in set(cfg.model_names()):
            limit = getattr(build_model(name, vocab_size, (), **cfg.model.options), "context", None)
            if limit is not None and t > limit:
                raise ConfigError(f"lm.context={t} is longer than model {name!r}'s maximum context {limit}")
    if cfg.data.fraction != 1:
        raise ConfigError("data.fraction applies to classification and translation; for language modeling "
                          "give text_files a smaller train.txt")
    if cfg.data.batch_size % t:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} tokens must be a multiple of lm.context={t}")
    return cfg.data.batch_size // t


class LMTask:
    """Next-token prediction on a registered text corpus."""

    model_kind = "lm"  # what its models read (codistill.models.KINDS)

    def __init__(self, cfg: Config, device: torch.device, run_dir=None, checksums: bool = False):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.corpus = load_corpus(cfg)
        # Maps the cache `prepare` built (or builds it); `check` verified every byte of it before
        # the launch, so the workers only check lengths.
        cache = build_cache(cfg, self.corpus, checksums=checksums)
        self.tokenizer = Tokenizer.load(cache / TOKENIZER_FILE)
        own = Path(run_dir) / TOKENIZER_FILE if run_dir is not None else None
        if own is not None and own.exists():  # the run's own (the sample decodes with it): the same file
            if own.read_bytes() != self.tokenizer.proto:
                raise DataError(f"{own} differs from the tokenizer of the token cache {cache}: the text of "
                                "data.root changed since the run started; restore it, or start a new run")
        self.blocks_per_batch = check_config(cfg, self.tokenizer.vocab_size)
        dtype = token_dtype(self.tokenizer.vocab_size)
        self.tokens = {s: np.memmap(cache / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}
        for split in ("valid", "test"):
            if self.n_blocks(split) < 1:
                raise DataError(f"{cfg.data.name}: the {split} split has {len(self.tokens[split])} tokens, "
                                f"fewer than one block of lm.context={cfg.lm.context} needs")

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """Build the task (its tokenizer and tokens live in the cache, not the run directory) with
        every byte of the cache verified, so every bad input, including a damaged cache and a batch
        larger than the data, is reported before the run directory is touched."""
        cls(cfg, torch.device("cpu"), checksums=True).steps_per_epoch(job_topology(cfg, world_size))

    @classmethod
    def check_resume(cls, cfg: Config, run_dir) -> None:
        """Before a resume: the corpus must give the very tokens the run trained on, tokenized by
        the run's own tokenizer; a text changed since (appended to, edited) is refused, never
        re-tokenized under the models' feet."""
        run_dir = Path(run_dir)
        own = run_dir / TOKENIZER_FILE
        if not own.is_file():
            raise DataError(f"cannot resume {run_dir}: its {TOKENIZER_FILE} (the tokenizer its models were "
                            "trained with) is missing")
        pieces = Tokenizer.load(own).vocab_size
        if pieces != cfg.lm.vocab_size:
            raise ConfigError(f"cannot resume {run_dir}: its config.yaml says lm.vocab_size={cfg.lm.vocab_size} but "
                              f"its models were trained with {pieces} pieces ({own}); restore lm.vocab_size={pieces}")
        cache = build_cache(cfg, load_corpus(cfg), checksums=False)  # `check` verified it
        now = read_manifest(cache)
        changed = [] if sha256_file(own) == now["tokenizer_sha256"] else ["the tokenizer trained on it"]
        try:
            then = json.loads((run_dir / RUN_TOKENS).read_text())["splits"]
        except FileNotFoundError:
            then = {}  # a run from before tokens.json: its tokenizer is the check
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot resume {run_dir}: {run_dir / RUN_TOKENS} cannot be read ({e})") from None
        changed += [f"{s} tokens" for s in SPLITS
                    if s in then and then[s].get("sha256") != now["splits"][s]["sha256"]]
        if changed:
            raise DataError(f"cannot resume {run_dir}: the text of {cfg.data.name} (data.root={cfg.data.root}) "
                            f"changed since the run started ({', '.join(changed)} differ from the run's); "
                            "restore that text, or start a new run")

    @classmethod
    def prepare(cls, cfg: Config, run_dir) -> None:
        """Build the cache (tokenizer, token ids); copy the tokenizer and the cache's manifest (what
        a resume must find again) into the run directory."""
        cache = build_cache(cfg, load_corpus(cfg), checksums=False)  # `check` verified it
        check_config(cfg, Tokenizer.load(cache / TOKENIZER_FILE).vocab_size)
        from ..run_log import atomic_write_text

        own = Path(run_dir) / TOKENIZER_FILE
        if not own.exists():  # a resumed run keeps its own
            _atomic(own, lambda f: f.write((cache / TOKENIZER_FILE).read_bytes()))
            atomic_write_text(Path(run_dir) / RUN_TOKENS, (cache / MANIFEST).read_text())

    def build_model(self, name: str) -> nn.Module:
        return build_model(name, self.tokenizer.vocab_size, (), **self.cfg.model.options).to(self.device)

    # -- blocks -------------------------------------------------------------------------------

    def n_blocks(self, split: str) -> int:
        return max(0, (len(self.tokens[split]) - 1) // self.cfg.lm.context)

    def batch(self, split: str, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(blocks), context) int64, of the given blocks."""
        t, data = self.cfg.lm.context, self.tokens[split]
        rows = np.stack([data[b * t: b * t + t + 1] for b in blocks]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def sampler(self, topo: Topology, seed: int) -> ShardBatchSampler:
        indices = model_indices(torch.arange(self.n_blocks("train")), self.cfg.data.split, topo.model_index,
                                topo.n_models, self.cfg.train.seed)
        need = self.blocks_per_batch * topo.replicas
        if len(indices) < need:
            raise DataError(f"{self.cfg.data.name}: the training tokens of each model make {len(indices)} "
                            f"blocks of lm.context={self.cfg.lm.context}, fewer than one step of "
                            f"{topo.replicas} replica(s) x data.batch_size={self.cfg.data.batch_size} tokens")
        return ShardBatchSampler(indices, self.blocks_per_batch, topo.replicas, topo.replica_index, seed)

    def steps_per_epoch(self, topo: Topology) -> int:
        return self.sampler(topo, self.cfg.train.seed).steps_per_epoch

    @property
    def flops_sequence_length(self) -> int:
        """Tokens per training block, for the models' FLOP count (throughput.py)."""
        return self.cfg.lm.context

    def train_batches(self, topo: Topology, seed: int, start_step: int = 0):
        sampler = self.sampler(topo, seed)
        sampler.set_start_step(start_step)
        return (self.batch("train", idx) for idx in sampler), sampler.steps_per_epoch

    def forward(self, module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        return module(x).flatten(0, 1), y.flatten()

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, topo: Topology) -> dict:
        """`codistill.evaluation.evaluate`'s metrics per token, plus perplexity; identical on all
        ranks."""
        split = "valid" if split == "val" else split
        per_batch = max(1, self.cfg.data.eval_batch_size // self.cfg.lm.context)
        blocks = torch.arange(self.n_blocks(split))
        if split == "valid" and self.cfg.eval.max_samples:  # the budget counts tokens: whole blocks, at least one
            blocks = eval_subset(blocks, max(1, self.cfg.eval.max_samples // self.cfg.lm.context))
        shard = eval_batches(blocks, per_batch, topo.replicas, topo.replica_index)
        result = evaluate(model, (self.batch(split, b) for b in shard), self.forward, topo, self.device,
                          self.cfg.eval.topk)
        for m in result["models"] + [result["ensemble"]]:
            m["perplexity"] = math.exp(min(m["loss"], 700.0))
        return result

    def write_extras(self, model: nn.Module, topo: Topology) -> None:
        """After the run's summary is written (the trainer calls it): model 0's first worker writes
        the sample, so no sampling, however long, can cost the run its results."""
        if topo.model_index == 0 and topo.replica_index == 0:
            was_training = model.training
            model.eval()
            self.write_sample(model)
            model.train(was_training)

    def write_sample(self, model: nn.Module) -> None:
        """sample.txt in the run directory: the test split's first tokens, continued by top-k sampling."""
        lm = self.cfg.lm
        if self.run_dir is None or lm.sample_tokens == 0 or not hasattr(model, "generate"):
            return
        prompt = torch.from_numpy(self.tokens["test"][:PROMPT_TOKENS].astype(np.int64)).unsqueeze(0)
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        out = model.generate(prompt.to(self.device), lm.sample_tokens, lm.sample_top_k, generator=g)[0].tolist()
        eos = self.tokenizer.eos_id

        def text(ids):  # EOS ends a line of the corpus
            lines, line = [], []
            for i in ids:
                if i == eos:
                    lines.append(line)
                    line = []
                else:
                    line.append(i)
            return "\n".join(self.tokenizer.decode(lines + [line]))

        body = (f"# model 0, top-k {lm.sample_top_k}, seed {self.cfg.train.seed}\n# prompt:\n"
                f"{text(out[:PROMPT_TOKENS])}\n# continuation:\n{text(out[PROMPT_TOKENS:])}\n")
        from ..run_log import atomic_write_text

        atomic_write_text(Path(self.run_dir) / "sample.txt", body)
