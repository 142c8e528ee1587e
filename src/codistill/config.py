"""Run configuration: frozen dataclasses, one docstring per field.

Precedence: built-in defaults < YAML file (`--config`) < command line (`--set section.key=value`).
Every value is type-checked and range-checked here, at load time, with a message that names the
field and what is allowed, so that workers never start on a config that cannot run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError
from .teacher_graph import GRAPHS, check_graph


def path_field(kind: str):
    """A setting that names a path, checked before any run directory is touched (codistill.preflight):
    `input` (read: a file or directory that must exist), `output` (a directory codistill creates
    and writes) or `location` (an output directory, '~' expanded, or an fsspec URL). Every such
    field must be declared this way: a test walks them all."""
    return field(default=None, metadata={"path": kind})


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"
    """Dataset registered in `codistill.data` (e.g. fashion_mnist, mnist, digits)."""
    root: str | None = path_field("input")
    """Directory holding the dataset files; None means the dataset's default location."""
    batch_size: int = 64
    """Minibatch per worker. A model's effective batch is batch_size x replicas."""
    eval_batch_size: int = 1000
    """Minibatch for evaluation."""
    num_workers: int = 0
    """DataLoader worker processes per training worker, for training and evaluation batches (decoding
    images from files needs some)."""
    split: str = "shared"
    """How models share the training set: `shared` (each model iterates over all of it with its own
    shuffling, as in the paper) or `disjoint` (model i gets its own 1/n of it, as in Anil et al.)."""
    val_fraction: float = 0.1
    """Fraction of the training set held out (seeded, class-balanced) as the validation split used
    during training; the test split is only evaluated at the end. 0 evaluates on the test split."""
    fraction: float = 1.0
    """Train on this fraction of the training set (seeded, class-balanced), for overfitting studies."""


@dataclass(frozen=True)
class ModelConfig:
    name: str | list[str] = "cnn"
    """Model registered in `codistill.models`; one name for every model, or a list with one name
    per model (codistilling different architectures)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments passed to the model constructor (e.g. {width: 32})."""
    channels_last: bool = False
    """Convolutional nets on GPU: channels_last memory format for models and image batches."""


@dataclass(frozen=True)
class CodistillConfig:
    n_models: int = 2
    """Number of models n. 1 is the all-reduce baseline: every worker trains one model."""
    method: str = "distill"
    """What the n model groups do every T steps: `distill` (codistillation: exchange weights, distill
    toward them), `diloco` (DiLoCo: average the groups' parameter change and apply it with the outer
    Nesterov SGD of the `outer` section) or `localsgd` (local SGD: plain model averaging). With
    diloco/localsgd every group trains the same architecture, there are no teachers, and the run ends
    with one model (a final outer step)."""
    exchange_every: int = 50
    """T: teachers are refreshed with the other models' weights every T optimizer steps."""
    exchange: str = "collective"
    """How teachers travel: `collective` (broadcast over the exchange groups of one job), `storage`
    (files in exchange_dir; each model group runs as its own job, see model_index) or `frozen`
    (offline, two-stage distillation: the teachers are the other models of the finished run
    teacher_run, at its last checkpoint, never refreshed; this job trains model_index alone)."""
    exchange_dir: str | None = path_field("location")
    """Where exchange=storage publishes and reads teachers: a shared path, or an fsspec URL such as
    `s3://bucket/prefix` (credentials and endpoint from the environment, e.g. AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL). Checked before launch: a missing bucket, refused
    credentials or `s3:/x` (a URL missing '//') is one error line. One location per run."""
    model_index: int | None = None
    """For exchange=storage or frozen: which of the n_models models this job trains (0 .. n_models-1)."""
    teacher_run: str | None = path_field("input")
    """For exchange=frozen: the directory of a finished run of the same n_models models whose last
    checkpoint holds the teachers (e.g. the big model trained alone)."""
    max_teacher_age: int = 0
    """Drop a teacher from the distillation term while its weights are more than this many steps
    old (the mean over teachers then runs over the rest: alpha is renormalized); 0 (default) never
    drops. Default off because a stale teacher only weakens a regularizer (the storage straggler
    benchmark trains fine on old teachers) while dropping changes the objective; set it when a peer
    group may stop for good. The age of each teacher is in the metrics (teacher_age_steps/<j>)."""
    exchange_delay: int = 0
    """0: teachers are refreshed synchronously at steps 0, T, 2T, ... D in 1..T: the transfer runs in
    the background while training goes on, and the new teachers are swapped in D steps later."""
    loss: str = "kl"
    """Distillation loss D: `kl` (KL(teacher || student) at temperature tau, times tau^2),
    `mse` (between logits) or `ce` (cross-entropy to the teacher's soft targets, times tau^2)."""
    temperature: float = 1.0
    """tau, for `kl` and `ce`."""
    alpha: float = 1.0
    """Weight of the distillation term."""
    alpha_schedule: str = "burnin"
    """`burnin` (0 for the first alpha_steps steps, then alpha, and never toward a teacher still
    holding the initial weights the exchange at step 0 hands out, which through storage can last
    past step T when a peer is slow; measured better on 3 seeds, docs/peers.md);
    `constant` (the paper's); `ramp` (linear from 0 to alpha over alpha_steps steps)."""
    alpha_steps: int | None = None
    """K for `burnin` and `ramp`; None means T + D (codistill.exchange_every + exchange_delay):
    distill from the first exchange of trained weights on (swapped in D steps after step T)."""
    teacher_mode: str = "eval"
    """Mode of the teacher copies: `eval` (running BatchNorm statistics, no dropout) or `train`."""
    teacher_precision: str = "fp32"
    """`fp32`, `bf16` or `fp16`: teacher forward passes under autocast to that type (cheaper; measure
    its effect). With train.precision bf16 or fp16 the teachers run under the student's autocast."""
    distill_fraction: float = 1.0
    """Cheaper teachers: in (0, 1], the teachers run on the first ceil(f * B) examples of each batch
    only and the distillation term is the mean over those examples (task loss on the whole batch).
    1.0 (default, the paper's): the full batch. Teacher cost scales with f."""
    teacher_every: int = 1
    """Cheaper teachers: >= 1, the teachers run on steps 0, m, 2m, ... only; on the other steps the
    distillation term is absent (loss = task loss) and alpha is not scaled by m: scaling would put an
    m times larger distillation gradient on one step in m, a spike the learning rate was not tuned
    for; unscaled, the average weight is alpha / m (set alpha * m to keep it). 1 (default): every step."""
    teacher_dtype: str = "fp32"
    """Cheaper teachers: the weights the teachers run with. `fp32` (default, the paper's); `bf16` (a
    bfloat16 copy of each teacher, remade when it receives weights; inputs cast to bf16); `int8`
    (torch.ao dynamic quantization of the teachers' nn.Linear layers, other layers fp32; CPU only).
    train.parallel=ddp only: sharded teachers stay fp32.
    The fp32 teachers stay: the exchange receives into them and checkpoints save them."""
    teacher_topk: int | None = None
    """Cheaper teachers, for language models: k >= 1 distills on each teacher's k most likely tokens
    plus one bucket holding the rest of the mass: KL_k = sum_{c in K} p_t[c] (log p_t[c] - log p_s[c])
    + r_t (log r_t - log r_s), r = 1 - sum_{c in K} p[c], times tau^2 (needs loss=kl). Keeps k, not
    the vocabulary, numbers per token per teacher. null (default): the full KL."""
    teacher_offload: bool = False
    """Keep the teachers in CPU memory (pinned under CUDA) between their forwards: each teacher is
    copied to the device for its forward only (sharded teachers: FSDP2's CPUOffloadPolicy, gathered
    for the forward, resharded after), so nothing teacher-sized stays on the device between steps.
    Same results; costs one host-to-device copy of each teacher (its shard under fsdp) per forward.
    Needs teacher_dtype=fp32 (a bf16 copy would stay on the device)."""
    exchange_hierarchical: bool = False
    """Collective exchange with several replicas per model: only replica 0 of each model takes part
    in the exchange between models, then broadcasts the teachers over its model group. With each
    model group on one machine the states cross between machines once per machine instead of once per
    replica; training is unchanged (every replica gets the same teachers)."""
    graph: str = "all"
    """Who distils from whom (the teacher graph; not the rank grid): `all` (every model from the n - 1
    others, the paper's), `ring` (model i from models i+1 .. i+peers, mod n, fixed) or `random`
    (`peers` others drawn at each exchange from the run's seed and the exchange number, the same on
    every replica of a model). With ring and random a step runs `peers` teacher forwards instead of
    n - 1, and the collective exchange sends each state only to its students (point to point).
    random holds a copy of every other model (any may be drawn) and needs exchange=collective."""
    peers: int = 1
    """Teachers per model with graph=ring or random, in 1 .. n_models - 1 (all: n - 1)."""
    exchange_dtype: str = "fp32"
    """Precision of the fp32 weights on the wire in the collective exchange: `fp32`, or `bf16` /
    `fp16` (half the exchanged bytes; the teachers run from the rounded weights)."""


@dataclass(frozen=True)
class OuterConfig:
    """The outer optimizer of `codistill.method=diloco` (Douillard et al. 2023's defaults);
    `localsgd` ignores it and averages (outer SGD with lr 1, no momentum)."""

    lr: float = 0.7
    """Outer learning rate applied to the averaged parameter change."""
    momentum: float = 0.9
    """Outer SGD momentum, in [0, 1)."""
    nesterov: bool = True
    """Outer Nesterov momentum."""
    every: int | None = None
    """H: inner steps between outer steps; None means codistill.exchange_every (T), so the groups
    communicate as often as codistillation exchanges."""
    state_device: str = "device"
    """Where the global copy of the model and the outer momentum live between outer steps: `device`
    (the model's) or `cpu` (CPU memory, pinned under CUDA, as torchft keeps them): two model-sized
    tensors (one per shard under train.parallel=fsdp) off the device. Same results; costs a copy of
    the global model to the device and of the averaged change back at each outer step."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """`sgd` or `adamw`."""
    lr: float = 0.1
    """Base learning rate (before linear scaling and warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float | list[float] = 5e-4
    """One value, or one value per LR stage (len(milestones) + 1 values, switching at the LR
    milestones: the paper's 1e-4, 1e-5, 0)."""
    decay_bias_and_norm: bool = True
    """Apply weight decay to biases and normalization layers too (False exempts them)."""
    clip_norm: float | None = None
    """Clip the gradients to this global norm (over every parameter of the model, after the
    all-reduce over its group, so every replica clips alike); None: no clipping. The norm itself is
    logged as `grad_norm` either way."""


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "goyal"
    """`goyal` (warm-up, then x gamma at each milestone), `cosine` (warm-up, then cosine to 0) or
    `constant`."""
    warmup_epochs: float = 0.2
    """Linear warm-up to the peak LR over this many epochs: from `optim.lr` to the scaled LR
    (Goyal et al.), or from 0 to `optim.lr` when `scale_lr` is false."""
    warmup_steps: int | None = None
    """The warm-up in optimizer steps; overrides warmup_epochs when set (a warm-up in epochs shrinks
    with the corpus: 0.05 epochs of a 300 KB text is 4 steps)."""
    milestones: list[float] = field(default_factory=lambda: [0.9, 1.2])
    """Epochs at which the LR is multiplied by gamma (and the weight-decay stage advances)."""
    gamma: float = 0.1
    """LR factor at each milestone."""
    scale_lr: bool = True
    """Linear scaling: the LR after warm-up is lr x B / reference_batch, B = the model's batch."""
    reference_batch: int = 256
    """The batch size at which the base LR applies unscaled."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.5
    """Length of the run, in passes of one model over its training data."""
    steps: int | None = None
    """Length in optimizer steps; overrides epochs when set."""
    label_smoothing: float = 0.0
    """Label smoothing of the task loss."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 means about 10 times per run."""
    log_every: int = 20
    """Log training metrics every this many steps."""
    seed: int = 0
    """Model i is initialized and shuffled with its own seed, derived from (seed, i) by numpy's
    SeedSequence (codistill/seeds.py), so no two (seed, model) pairs share one."""
    progress: bool = True
    """Show a progress bar on the first worker."""
    amp: bool = False
    """Shorthand for precision=bf16 (kept for older configs; true with another precision is an error)."""
    precision: str = "fp32"
    """`fp32`, `bf16` or `fp16`: the student's and the teachers' forward passes under autocast to that
    type (parameters, gradients and the optimizer stay fp32). fp16 scales the loss with
    torch.amp.GradScaler; an update it skips (gradients overflowed) counts as a step for the
    schedules and the exchange, as train.nonfinite=skip does, and is counted in `skipped_steps`."""
    accumulate: int = 1
    """Gradient accumulation: micro-batches (of data.batch_size each) per optimizer step. The gradient
    is synchronized over the model group on the last one only; the teachers run on every one;
    schedules, exchanges and step counts are per optimizer step. A model's batch is
    data.batch_size x replicas x accumulate."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms; on GPU also no cuDNN autotuning
    and no TF32). Bitwise-exact resume holds on CPU either way; on GPU it needs this switch."""
    checkpoint_every: int = 0
    """Save the full run state every this many steps (0: only at the end)."""
    parallel: str = "ddp"
    """How a model is data-parallel over its group of k workers: `ddp` (each worker holds the whole
    model, its gradients and optimizer state) or `fsdp` (FSDP2: each worker holds 1/k of them, and
    of every teacher; the exchange and DiLoCo's outer step move each worker's shard, 1/k of a model
    per worker). Same results up to floating-point reduction order; docs/performance.md (memory)."""
    shard_size: int | None = None
    """train.parallel=fsdp: shard each model over runs of this many consecutive workers of its group
    and replicate it across the k / shard_size runs (HSDP: FSDP2 on a 2-D replicate x shard mesh).
    The forward's gathers stay within a run (one machine, when it holds shard_size workers) and only
    gradient shards cross runs; each worker holds 1 / shard_size of the model and exchanges that.
    Must divide the workers per model; None (default): the whole group (plain FSDP)."""
    nonfinite: str = "stop"
    """On a NaN or infinite loss: `stop` (error naming step, model and rank; the last good checkpoint
    stays) or `skip` (that update is skipped on every replica and counted)."""
    profile: list[int] | None = None
    """[start, stop]: record steps start .. stop-1 with torch.profiler into profile/rank_<r>.pt.trace.json
    in the run directory (open in TensorBoard or Perfetto); None: no profiling."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where training metrics go besides metrics.jsonl (always written, the source of truth):
    `tensorboard`, `mlflow` (a local store in the run directory, mlflow.db, unless
    MLFLOW_TRACKING_URI names another) and `wandb` (offline, under the run directory, unless logged in or WANDB_MODE
    says otherwise); mlflow and wandb need the `trackers` extra."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one worker's device at the run's precision, for the logged MFU; None: known
    GPUs are looked up (throughput.py), elsewhere only the achieved TFLOP/s are logged."""


@dataclass(frozen=True)
class DistConfig:
    nproc: int = 4
    """Workers W started locally when not under torchrun (torchrun's WORLD_SIZE wins)."""
    backend: str = "auto"
    """`auto` (NCCL with CUDA, else gloo), `gloo` or `nccl`."""
    threads: int = 1
    """Intra-op threads per worker on CPU; one avoids workers fighting over cores."""
    timeout_s: float = 600.0
    """Timeout of every collective, so a dead peer gives an error, not a hang."""


@dataclass(frozen=True)
class TranslationConfig:
    vocab_size: int = 8000
    """Subword vocabulary size of the tokenizer trained on the training split (shared by both languages)."""
    max_tokens: int = 4096
    """Batch by token count: at most this many source + target tokens per worker batch."""
    max_len: int = 128
    """Sentences longer than this many subword tokens are dropped from training."""
    beam: int = 1
    """Beam size for BLEU decoding (1 = greedy; at most 100)."""
    bleu_sentences: int = 500
    """Test sentences decoded for BLEU (0 = all)."""
    reverse: bool = False
    """Translate target -> source (e.g. Spanish -> English for the Bible corpus)."""


@dataclass(frozen=True)
class LMConfig:
    context: int = 256
    """Language modeling: tokens per training block (at most the model's context). `data.batch_size`
    and `data.eval_batch_size` count tokens for LM datasets and must hold at least one block."""
    vocab_size: int = 4000
    """Subword vocabulary size of the BPE tokenizer trained on the training split (an error if the
    corpus cannot train that many pieces)."""
    cache_dir: str | None = path_field("output")
    """Where the tokenizer and the memory-mapped token ids of a corpus are cached, keyed by the
    corpus files and vocabulary size; None is ~/.cache/codistill/lm ($XDG_CACHE_HOME)."""
    sample_tokens: int = 200
    """Tokens sampled from model 0 into sample.txt after the run's summary is written (0: no
    sample; at most 10,000)."""
    sample_top_k: int = 40
    """Top-k of that sampling (1 = greedy); seeded with train.seed."""


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation reads and what crosses between the model groups while it scores the
    ensemble (codistill/evaluation.py); its bytes are reported as `bytes/eval`."""

    max_samples: int = 0
    """Validation budget: at most this many samples scored per validation (0: the whole split):
    images, tokens for LM datasets (whole lm.context blocks), sentence pairs for translation. A
    fixed seeded subset, the same at every validation and for every model; the test split is
    always scored whole."""
    topk: int = 8
    """Classes each model sends per scored position for the ensemble's top-1. With at most 2 x topk
    classes the whole distribution is sent and ensemble accuracy is exact; with more, it is exact
    wherever the top-k certify it (`val/ensemble_argmax_exact`, the fraction where they do). Every
    other metric is exact either way."""


@dataclass(frozen=True)
class CompareConfig:
    arms: list[str] = field(default_factory=lambda: ["allreduce", "codistill", "diloco", "localsgd"])
    """Arms run by `codistill compare`, in order, of allreduce, codistill, codistill_regularized
    (opt-in: codistill with weight decay decaying at the LR milestones), diloco, localsgd (the last
    two are left out, with a warning, when the models differ in architecture)."""
    regularized_weight_decay: list[float] | None = None
    """Weight decay per LR stage for the regularization-accounted arm; None means
    [wd, wd/10, 0, 0, ...] from the base weight decay."""
    regularized_milestones: list[float] | None = None
    """Shifted LR milestones for that arm, in all-reduce epochs; None keeps the milestones."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)

    def model_names(self) -> list[str]:
        """One model name per model."""
        name = self.model.name
        return list(name) if isinstance(name, list) else [name] * self.codistill.n_models

    @property
    def mode(self) -> str:
        if self.codistill.n_models == 1:
            return "allreduce"
        return "codistill" if self.codistill.method == "distill" else self.codistill.method

    @property
    def job_models(self) -> int:
        """Models trained by this job: all of them, or one with exchange through storage."""
        return 1 if self.codistill.exchange in ONE_MODEL_EXCHANGES else self.codistill.n_models


ONE_MODEL_EXCHANGES = ("storage", "frozen")  # each job trains one of the n models (model_index)

CHOICES = {
    "data.split": ("shared", "disjoint"),
    "codistill.loss": ("kl", "mse", "ce"),
    "codistill.exchange": ("collective", "storage", "frozen"),
    "codistill.method": ("distill", "diloco", "localsgd"),
    "codistill.alpha_schedule": ("constant", "burnin", "ramp"),
    "codistill.teacher_mode": ("eval", "train"),
    "codistill.exchange_dtype": ("fp32", "bf16", "fp16"),
    "codistill.graph": GRAPHS,
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("goyal", "cosine", "constant"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "train.nonfinite": ("stop", "skip"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "codistill.teacher_precision": ("fp32", "bf16", "fp16"),
    "codistill.teacher_dtype": ("fp32", "bf16", "int8"),
    "train.parallel": ("ddp", "fsdp"),
    "outer.state_device": ("device", "cpu"),
}
ARMS = ("allreduce", "codistill", "codistill_regularized", "diloco", "localsgd")
MAX_INT = 2**31 - 1
MAX_TIMEOUT_S = 365 * 86400  # larger values overflow the collectives' millisecond timeouts
# Work done once at the end of a run, bounded so that it finishes: a sample is read by a person
# (10,000 tokens take gpt_tiny under a minute on one CPU core), and beams past 100 only multiply
# decoding memory (batch x beam x vocabulary) without better BLEU.
MAX_SAMPLE_TOKENS = 10_000
MAX_BEAM = 100


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file < `section.key=value` overrides, validated. Dataset and model names are
    checked by `codistill.tasks.check_names` (the command line and every launch call it): their
    registries live in the layers above this one."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a regular file")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error(e)}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return from_dict(tree)


def yaml_error(e: yaml.YAMLError) -> str:
    """`line L, column C: cause` from PyYAML's multi-line message."""
    mark = getattr(e, "problem_mark", None)
    cause = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
    if mark is None:
        return cause or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {cause}"


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=0.2` -> ("optim.lr", 0.2); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"config key {key!r} must be section.key, e.g. optim.lr")
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"config section {parts[0]!r} must be a mapping")
    section[parts[1]] = value


def from_dict(tree: dict) -> Config:
    sections = {}
    hints = typing.get_type_hints(Config)
    known = {f.name for f in dataclasses.fields(Config)}
    for name, value in tree.items():
        if name not in known:
            raise ConfigError(f"unknown config section {name!r}; allowed: {', '.join(sorted(known))}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
        sections[name] = _build_section(name, hints[name], value)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key}; allowed: {', '.join(allowed)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


class _NotFinite(ConfigError):
    """A float field holding NaN or infinity: reported as such, not as a type mismatch."""


def _finite(key: str, value: float) -> float:
    if not math.isfinite(value):  # NaN passes every `<` and `==` range check: reject it here, once
        raise _NotFinite(f"{key} must be a finite number, got {value}")
    return value


def _coerce(key: str, tp, value):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected,
    and every float must be finite."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, arg, value)
            except _NotFinite:
                raise
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(key, item_tp, v) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:  # seeds, step counts and sizes beyond this overflow in torch
                raise _NotFinite(f"{key} must be at most {MAX_INT} in size, got {value}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(key, float(value))
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(key, number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, float):
                    _finite(f"{key}.{k}", v)
            return dict(value)
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")

    def unit(key, value):  # a decay factor: [0, 1)
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")

    def positive(key, value, strict=True):
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ConfigError(f"{key} must be {'> 0' if strict else '>= 0'}, got {value}")

    c, d, o, s, t = cfg.codistill, cfg.data, cfg.optim, cfg.schedule, cfg.train
    positive("codistill.n_models", c.n_models)
    positive("codistill.exchange_every", c.exchange_every)
    if c.exchange == "frozen":
        if c.teacher_run is None or c.model_index is None:
            raise ConfigError("codistill.exchange=frozen needs codistill.teacher_run (a finished run's directory) "
                              "and codistill.model_index (which model this job trains)")
        if cfg.train.parallel != "ddp":
            raise ConfigError("codistill.exchange=frozen needs train.parallel=ddp")
    if c.exchange == "storage":
        if c.exchange_dir is None or c.model_index is None:
            raise ConfigError("codistill.exchange=storage needs codistill.exchange_dir (a shared directory) "
                              "and codistill.model_index (which model this job trains)")
        if c.exchange_delay:
            raise ConfigError("codistill.exchange_delay applies to exchange=collective only")
        if c.exchange_dtype != "fp32":
            raise ConfigError("codistill.exchange_dtype applies to exchange=collective only")
        if c.exchange_hierarchical:
            raise ConfigError("codistill.exchange_hierarchical applies to exchange=collective only")
        if cfg.train.parallel != "ddp":
            raise ConfigError("train.parallel=fsdp needs codistill.exchange=collective (storage exchanges "
                              "whole models)")
    if c.exchange in ONE_MODEL_EXCHANGES and not 0 <= c.model_index < c.n_models:
        raise ConfigError(f"codistill.model_index must be in 0..{c.n_models - 1}, got {c.model_index}")
    if cfg.train.parallel == "fsdp" and cfg.train.precision == "fp16":
        # GradScaler would look for inf/NaN in each worker's shard only: replicas could disagree.
        raise ConfigError("train.precision=fp16 is not supported with train.parallel=fsdp yet; use bf16")
    if cfg.train.shard_size is not None:
        positive("train.shard_size", cfg.train.shard_size)
        if cfg.train.parallel != "fsdp":
            raise ConfigError("train.shard_size applies to train.parallel=fsdp (HSDP inside a model group)")
    if c.teacher_offload and c.teacher_dtype != "fp32":
        raise ConfigError("codistill.teacher_offload needs codistill.teacher_dtype=fp32 (the low-precision copy "
                          "would stay on the device)")
    if cfg.train.parallel == "fsdp" and c.teacher_dtype != "fp32":
        # FSDP2's MixedPrecisionPolicy would cast the shards for the gather, but not BatchNorm's fp32
        # buffers, which batch_norm then refuses beside bf16 weights; a bf16 copy is what sharding avoids.
        raise ConfigError("codistill.teacher_dtype applies to train.parallel=ddp (sharded teachers stay fp32)")
    positive("codistill.exchange_delay", c.exchange_delay, strict=False)
    positive("codistill.max_teacher_age", c.max_teacher_age, strict=False)
    try:
        check_graph(c.graph, c.n_models, c.peers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.graph == "random" and c.exchange == "storage":
        raise ConfigError("codistill.graph=random needs codistill.exchange=collective (storage jobs do not "
                          "exchange in step, so they cannot agree on a draw); ring works through storage")
    check_teacher_settings(cfg)
    if c.exchange_delay > c.exchange_every:
        raise ConfigError(f"codistill.exchange_delay must be <= codistill.exchange_every "
                          f"({c.exchange_every}), got {c.exchange_delay}")
    if c.method != "distill":
        if c.exchange_dtype != "fp32":
            raise ConfigError(f"codistill.exchange_dtype applies to codistillation; codistill.method={c.method} "
                              "averages in fp32")
        if c.exchange != "collective":
            raise ConfigError(f"codistill.method={c.method} needs codistill.exchange=collective")
        if len(set(cfg.model_names())) > 1:
            raise ConfigError(f"codistill.method={c.method} averages parameters, so every model must have "
                              f"one architecture; got model.name {cfg.model.name}")
    u = cfg.outer
    if not (math.isfinite(u.lr) and u.lr > 0):
        raise ConfigError(f"outer.lr must be a finite number > 0, got {u.lr}")
    if not 0 <= u.momentum < 1:
        raise ConfigError(f"outer.momentum must be in [0, 1), got {u.momentum}")
    if u.nesterov and u.momentum == 0:
        raise ConfigError("outer.nesterov needs outer.momentum > 0")
    if u.every is not None:
        positive("outer.every", u.every)
    positive("codistill.temperature", c.temperature)
    positive("codistill.alpha", c.alpha, strict=False)
    if c.alpha_steps is not None:
        positive("codistill.alpha_steps", c.alpha_steps, strict=False)
    positive("data.batch_size", d.batch_size)
    positive("data.eval_batch_size", d.eval_batch_size)
    positive("data.num_workers", d.num_workers, strict=False)
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if not 0 < d.fraction <= 1:
        raise ConfigError(f"data.fraction must be in (0, 1], got {d.fraction}")
    positive("optim.lr", o.lr)
    unit("optim.momentum", o.momentum)
    if o.nesterov and (o.name != "sgd" or o.momentum == 0):
        raise ConfigError("optim.nesterov needs optim.name=sgd and optim.momentum > 0")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {o.betas}")
    for beta in o.betas:
        unit("optim.betas", beta)
    wds = o.weight_decay if isinstance(o.weight_decay, list) else [o.weight_decay]
    for wd in wds:
        positive("optim.weight_decay", wd, strict=False)
    if isinstance(o.weight_decay, list) and len(o.weight_decay) != len(s.milestones) + 1:
        raise ConfigError(
            f"optim.weight_decay has {len(o.weight_decay)} stages but schedule.milestones "
            f"{s.milestones} makes {len(s.milestones) + 1}; give one value per LR stage")
    positive("schedule.warmup_epochs", s.warmup_epochs, strict=False)
    if s.warmup_steps is not None:
        positive("schedule.warmup_steps", s.warmup_steps, strict=False)
    positive("schedule.gamma", s.gamma)
    positive("schedule.reference_batch", s.reference_batch)
    if list(s.milestones) != sorted(s.milestones) or any(m <= 0 for m in s.milestones):
        raise ConfigError(f"schedule.milestones must be increasing positive epochs, got {s.milestones}")
    positive("train.epochs", t.epochs)
    if t.steps is not None:
        positive("train.steps", t.steps)
    positive("train.eval_every", t.eval_every, strict=False)
    positive("train.log_every", t.log_every)
    positive("train.checkpoint_every", t.checkpoint_every, strict=False)
    _validate_knobs(cfg)
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    positive("eval.max_samples", cfg.eval.max_samples, strict=False)
    positive("eval.topk", cfg.eval.topk)
    positive("lm.context", cfg.lm.context)
    positive("lm.vocab_size", cfg.lm.vocab_size)
    positive("lm.sample_tokens", cfg.lm.sample_tokens, strict=False)
    if cfg.lm.sample_tokens > MAX_SAMPLE_TOKENS:
        raise ConfigError(f"lm.sample_tokens must be at most {MAX_SAMPLE_TOKENS} (a sample to read, sampled one "
                          f"token at a time at the end of the run), got {cfg.lm.sample_tokens}")
    positive("lm.sample_top_k", cfg.lm.sample_top_k)
    positive("dist.nproc", cfg.dist.nproc)
    positive("dist.threads", cfg.dist.threads)
    positive("dist.timeout_s", cfg.dist.timeout_s)
    if cfg.dist.timeout_s > MAX_TIMEOUT_S:
        raise ConfigError(f"dist.timeout_s must be at most {MAX_TIMEOUT_S} (a year), got {cfg.dist.timeout_s:g}")
    if t.seed < 0:
        raise ConfigError(f"train.seed must be >= 0, got {t.seed}")
    tr = cfg.translation
    for key in ("vocab_size", "max_tokens", "max_len", "beam"):
        positive(f"translation.{key}", getattr(tr, key))
    positive("translation.bleu_sentences", tr.bleu_sentences, strict=False)
    if tr.beam > MAX_BEAM:
        raise ConfigError(f"translation.beam must be at most {MAX_BEAM} (decoding memory grows with batch x "
                          f"beam x vocabulary), got {tr.beam}")
    if isinstance(cfg.model.name, list) and len(cfg.model.name) != c.n_models:
        raise ConfigError(
            f"model.name lists {len(cfg.model.name)} models but codistill.n_models is {c.n_models}")
    cmp = cfg.compare
    if not cmp.arms:
        raise ConfigError(f"compare.arms must list at least one arm of {', '.join(ARMS)}")
    for arm in cmp.arms:
        if arm not in ARMS:
            raise ConfigError(f"compare.arms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
    if len(set(cmp.arms)) != len(cmp.arms):
        raise ConfigError(f"compare.arms lists an arm twice: {cmp.arms}")
    for wd in cmp.regularized_weight_decay or []:
        positive("compare.regularized_weight_decay", wd, strict=False)
    m = cmp.regularized_milestones
    if m is not None and (list(m) != sorted(m) or any(v <= 0 for v in m)):
        raise ConfigError(f"compare.regularized_milestones must be increasing positive epochs, got {m}")


def _validate_knobs(cfg: Config) -> None:
    """Accumulation, clipping, precision, profiling and trackers (optim_step.py, profiling.py, trackers.py)."""
    t, c = cfg.train, cfg.codistill
    if t.accumulate < 1:
        raise ConfigError(f"train.accumulate must be >= 1 (micro-batches per optimizer step), got {t.accumulate}")
    if cfg.optim.clip_norm is not None and cfg.optim.clip_norm <= 0:
        raise ConfigError(f"optim.clip_norm must be > 0 (or null: no clipping), got {cfg.optim.clip_norm}")
    if t.amp and t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.amp=true means train.precision=bf16, but train.precision is {t.precision}; "
                          "set only train.precision")
    precision = effective_precision(cfg)
    if precision != "fp32" and c.teacher_precision not in ("fp32", precision):
        raise ConfigError(f"codistill.teacher_precision={c.teacher_precision} conflicts with train.precision="
                          f"{precision} (the teachers run under the student's autocast)")
    if t.profile is not None and not (len(t.profile) == 2 and 0 <= t.profile[0] < t.profile[1]):
        raise ConfigError(f"train.profile must be [start, stop] steps with 0 <= start < stop, got {t.profile}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops must be > 0 (or null), got {t.peak_tflops}")
    from .trackers import check_trackers

    check_trackers(t.trackers)


def _uses_cuda(cfg) -> bool:
    import torch

    return cfg.dist.backend == "nccl" or (cfg.dist.backend == "auto" and torch.cuda.is_available())


def check_teacher_settings(cfg) -> None:
    """The cheaper-teacher settings (cheap_teachers.py), as one ConfigError line."""
    from .cheap_teachers import check_cheap_teachers

    c = cfg.codistill
    try:
        check_cheap_teachers(c.distill_fraction, c.teacher_every, c.teacher_dtype, c.teacher_topk,
                             "cuda" if _uses_cuda(cfg) else "cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.teacher_topk is not None and c.loss != "kl":
        raise ConfigError(f"codistill.teacher_topk needs codistill.loss=kl, got {c.loss}")


def effective_precision(cfg: Config) -> str:
    """train.precision, with train.amp=true read as bf16."""
    return "bf16" if cfg.train.amp and cfg.train.precision == "fp32" else cfg.train.precision


def check_world_size(cfg: Config, world_size: int) -> int:
    """W = n_models x replicas (one model per job with exchange through storage); returns replicas."""
    n = cfg.job_models
    if world_size % n != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by codistill.n_models={n}; "
            f"use a multiple of {n} workers")
    replicas, shard = world_size // n, cfg.train.shard_size
    if shard is not None and replicas % shard:
        raise ConfigError(f"train.shard_size={shard} must divide the {replicas} worker(s) per model "
                          f"({world_size} workers / codistill.n_models={n})")
    return replicas


def path_fields() -> dict[str, str]:
    """Every setting that names a path, `section.key` -> its kind (`input`, `output`, `location`)."""
    return {f"{section.name}.{f.name}": f.metadata["path"] for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory) if "path" in f.metadata}


# ---------------------------------------------------------------------------------------------
# Saving and deriving


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy with `section__key=value` fields changed (used to derive comparison arms)."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        section, name = key.split("__")
        tree[section][name] = value
    return from_dict(tree)


def describe() -> str:
    """Every field with its default and docstring, for `codistill config --help`-style listings."""
    import inspect

    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        src = inspect.getsource(cls)
        docs = _field_docs(src)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _field_docs(source: str) -> dict[str, str]:
    import ast

    body = ast.parse(source).body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())
    return docs
