"""Run the suite: each (experiment, variant, seed) is one `train(...)` call and one row.

A row already present is skipped, so an interrupted suite resumes; a run stopped half-way continues
from its last checkpoint (saved every CHECKPOINT_EVERY updates). A run whose resolved config
(and world size and seed derivation) equals one already recorded in any results file under `out` is
not trained again: its row is copied with `reused_from` naming the original (the all-reduce baseline
at the base budget is shared by F1, F2, F3, F6, F7 and Beyond).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..bench.common import git_commit
from ..checkpoint import CheckpointError, read_latest
from ..arms import arm_configs
from ..config import Config, load_config, replace, to_dict
from ..curves import compute_seconds_per_step
from ..distributed import is_leader, torchrun_world_size, under_torchrun
from ..errors import UserError
from ..seeds import DERIVATION
from . import results as res
from .suite import BASES, EPOCH_FIELDS, EXPERIMENTS, Experiment, Variant, seed_of


@dataclass(frozen=True)
class Run:
    experiment: Experiment
    variant: Variant
    seed: int  # seed number: 0, 1, 2, ...
    cfg: Config  # the arm's resolved config
    world: int


CHECKPOINT_EVERY = 250  # updates; a few seconds of saving against minutes of training lost at a stop


def _say(message: str) -> None:
    if is_leader():  # under torchrun every process runs the suite; one speaks
        print(message, flush=True)


def _dunder(overrides: dict) -> dict:
    return {key.replace(".", "__"): value for key, value in overrides.items()}


def _scaled(value, factor: float):
    if value is None:
        return None
    if isinstance(value, list):
        return [_scaled(v, factor) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"cannot scale the non-numeric value {value!r}")
    if isinstance(value, int):
        return max(1, round(value * factor))
    return value * factor


# The shipped configs are package data (src/codistill/configs links the checkout's configs/), so an
# installed package finds them as a checkout does, whatever the working directory.
PACKAGE = Path(__file__).resolve().parents[1]


def base_config(experiment: Experiment, quick: bool) -> Config:
    """The experiment's base config (before any variant): its YAML file, if any, < the suite base
    < the experiment's own base."""
    path = None
    if experiment.config is not None:
        path = PACKAGE / experiment.config
        if not path.is_file():
            raise UserError(f"{experiment.name} starts from {experiment.config}, which is not in {PACKAGE}; "
                            "reinstall codistill")
    overrides = {**PAPER_ALPHA, **BASES[(experiment.family, quick)],
                 **(experiment.quick_base if quick else experiment.base)}
    return replace(load_config(path), **_dunder(overrides))


# The suite reproduces the paper, whose alpha is constant from step 0 (the library's default burns in
# for T steps, docs/peers.md); pinned, the rows keep their identity.
PAPER_ALPHA = {"codistill.alpha_schedule": "constant", "codistill.alpha_steps": 0}


def variant_config(experiment: Experiment, variant: Variant, seed: int, quick: bool,
                   budget: float = 1.0, out: str | Path = "results") -> tuple[Config, int]:
    """The arm's config and world size: base < variant.set < variant.scale (`quick_scale` if `quick`;
    and the `budget` factor on every epoch-valued setting) < seed, then the arms are derived by
    `codistill.arms.arm_configs` (matched workers and updates), then variant.after. A variant with a
    `teacher_run` trains the arm's last model alone on its model group's workers, distilled from the
    other models of that variant's run (same seed, under `out`), frozen."""
    cfg = base_config(experiment, quick)
    if variant.set:
        cfg = replace(cfg, **_dunder(variant.set))
    factors = dict(variant.scale if not quick or variant.quick_scale is None else variant.quick_scale)
    for key in EPOCH_FIELDS if budget != 1.0 else ():
        factors[key] = factors.get(key, 1.0) * budget
    tree = to_dict(cfg)
    scaled = {}
    for key, factor in factors.items():
        section, name = key.split(".")
        scaled[key] = _scaled(tree[section][name], factor)
    if "train.epochs" in factors and cfg.train.steps is not None:  # a budget given in steps
        scaled["train.steps"] = _scaled(cfg.train.steps, factors["train.epochs"])
    cfg = replace(cfg, **_dunder({**scaled, "train.seed": seed_of(seed)}))
    # Under torchrun the world is torchrun's (every arm of a finding still gets the same workers).
    world = torchrun_world_size() if under_torchrun() else cfg.dist.nproc
    arms = dict(arm_configs(replace(cfg, compare__arms=[variant.arm]), world))
    arm = arms[variant.arm]
    if variant.after:
        arm = replace(arm, **_dunder(variant.after))
    if variant.teacher_run is not None:
        n = arm.codistill.n_models
        arm = replace(arm, codistill__exchange="frozen", codistill__model_index=n - 1,
                      codistill__teacher_run=str(run_directory(out, experiment.name, variant.teacher_run, seed, budget)))
        world //= n  # the same workers per model: one model group
    return arm, world


def run_directory(out: str | Path, experiment: str, variant: str, seed: int, budget: float = 1.0) -> Path:
    """Where the runner trains (experiment, variant, seed) under `out`."""
    suffix = "" if budget == 1.0 else f"-budget{budget:g}"
    return Path(out) / "runs" / experiment / variant.replace("/", "_") / f"s{seed}{suffix}"


# Settings added after the first result rows: at their defaults they train exactly as before they
# existed, so they are left out of the identity and the earlier rows stay reusable.
ADDED_LATER = (("outer", None), ("lm", None), ("codistill", "method"), ("train", "deterministic"),
               ("codistill", "exchange_dtype"), ("codistill", "exchange_hierarchical"),
               ("codistill", "teacher_offload"), ("codistill", "graph"), ("codistill", "peers"),
               ("codistill", "teacher_run"))


def config_hash(cfg: Config, world: int) -> str:
    """Identity of a run: the resolved config without what does not change training."""
    tree, default = to_dict(cfg), to_dict(Config())
    tree.pop("compare")  # only used to derive the arms, already applied
    tree["train"].pop("progress")
    tree["train"]["checkpoint_every"] = 0  # when to save does not change training (resume is exact)
    for section, key in ADDED_LATER:
        if key is None and tree.get(section) == default[section]:
            tree.pop(section)
        elif key is not None and tree[section].get(key) == default[section][key]:
            tree[section].pop(key)
    text = json.dumps(tree, sort_keys=True, default=str)
    # The seed derivation is part of a run's identity (the config's train.seed stays the same): a run
    # is never given the row of one trained with `train.seed + i` model seeds, which every row made
    # before seeds.py has, nor continued from such a run's checkpoint.
    return hashlib.sha256(f"{text}\nworld={world}\nseeds={DERIVATION}".encode()).hexdigest()[:16]


def select(names: list[str]) -> list[Experiment]:
    if not names:
        raise UserError("name experiments to run (" + ", ".join(EXPERIMENTS) + ") or `all`")
    if "all" in names:
        return list(EXPERIMENTS.values())
    lookup = {name.lower(): e for name, e in EXPERIMENTS.items()}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise UserError(f"unknown experiment {unknown[0]!r}; allowed: all, {', '.join(EXPERIMENTS)}")
    return list({lookup[n.lower()].name: lookup[n.lower()] for n in names}.values())


def variants_of(experiment: Experiment, quick: bool) -> list[Variant]:
    return [v for v in experiment.variants if v.quick or not quick]


class Suite:
    """Runs experiments into `out`: rows in `<out>/<name>.jsonl`, run directories in `<out>/runs/`."""

    def __init__(self, out: str | Path, quick: bool = False, command: str = "", budget: float = 1.0):
        if budget <= 0:
            raise UserError(f"--budget must be > 0, got {budget}")
        self.out, self.quick, self.command, self.budget = Path(out), quick, command, budget
        self.failures: list[str] = []
        self._by_hash: dict[str, dict] = {}
        for path in sorted(self.out.glob("*.jsonl")):
            for row in res.read_rows(path):
                if row.get("config_hash") and not row.get("reused_from"):
                    self._by_hash.setdefault(row["config_hash"], row)

    def run(self, experiments: list[Experiment], seeds: int, only: list[str] | None = None) -> int:
        """Runs what is missing (of the variants named in `only`, if given); returns the rows written."""
        if only:
            known = {v.name for e in experiments for v in variants_of(e, self.quick)}
            unknown = [name for name in only if name not in known]
            if unknown:
                raise UserError(f"unknown variant(s) {', '.join(unknown)} of {', '.join(e.name for e in experiments)}; "
                                f"known: {', '.join(sorted(known))}")
        written = 0
        for experiment in experiments:
            path = res.results_file(self.out, experiment.name)
            done = {res.row_key(r) for r in res.read_rows(path) if r.get("budget", 1.0) == self.budget}
            for seed in range(seeds):
                for variant in variants_of(experiment, self.quick):
                    if (experiment.name, variant.name, seed) in done or (only and variant.name not in only):
                        continue
                    label = f"{experiment.name}/{variant.name}/s{seed}"
                    try:
                        row = self.run_one(experiment, variant, seed, label)
                    except Exception as e:  # noqa: BLE001 - one failed run must not end an hours-long suite
                        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                        _say(f"[{label}] failed: {type(e).__name__}: {message}")
                        self.failures.append(f"{label}: {type(e).__name__}: {message}")
                        continue
                    if is_leader():  # under torchrun every process trains; one writes the row
                        res.append_row(path, row)
                    written += 1
        return written

    def run_one(self, experiment: Experiment, variant: Variant, seed: int, label: str) -> dict:
        from ..launch import train  # late: spawning workers needs the full stack

        cfg, world = variant_config(experiment, variant, seed, self.quick, self.budget, self.out)
        digest = config_hash(cfg, world)
        row = {"experiment": experiment.name, "variant": variant.name, "arm": variant.arm, "seed": seed,
               "quick": self.quick, "budget": self.budget, "config_hash": digest,
               "config": res.config_values(cfg, world)}
        original = self._by_hash.get(digest)
        if original is not None:
            _say(f"[{label}] same run as {original['experiment']}/{original['variant']}/s{original['seed']}; "
                  "reusing its row")
            kept = {k: v for k, v in original.items() if k not in row and k not in ("command", "time", "git")}
            row.update(kept, reused_from=f"{original['experiment']}/{original['variant']}/s{original['seed']}")
            row.update(command=self.command, time=time.strftime("%Y-%m-%dT%H:%M:%S"), git=git_commit())
            return row
        run_dir = run_directory(self.out, experiment.name, variant.name, seed, self.budget)
        n = cfg.job_models
        _say(f"[{label}] training: {n} model(s) x {world // n} worker(s), "
              f"{cfg.train.steps} steps -> {run_dir}")
        start = time.perf_counter()
        if cfg.train.checkpoint_every == 0:  # a long run survives a session stop
            cfg = replace(cfg, train__checkpoint_every=CHECKPOINT_EVERY)
        resume = interrupted(run_dir, digest, world)
        if resume:
            _say(f"[{label}] resuming from its checkpoint at step {read_latest(run_dir)['step']}")
        # Absolute: the workers meet through a file:// URL in the run directory, and a relative path
        # there would be read as a host name.
        summary = train(cfg, run_dir.resolve(), overwrite=not resume, resume=resume, nproc=world)
        row.update(res.summary_values(summary))
        row["total_seconds"] = time.perf_counter() - start
        # The first model this job trained: 0, or the one model of a frozen-teacher (offline) run.
        first = cfg.codistill.model_index if cfg.job_models == 1 and cfg.codistill.model_index is not None else 0
        row["curve"] = res.read_curve(run_dir, first)  # every experiment: the budget rule reads it
        row["compute_s_per_step"] = compute_seconds_per_step(run_dir, first)  # without evals and stalls
        row.update(run_dir=str(run_dir), reused_from=None, command=self.command,
                   time=time.strftime("%Y-%m-%dT%H:%M:%S"), git=git_commit())
        self._by_hash[digest] = row
        acc = row.get("test_accuracy") or []
        _say(f"[{label}] done in {row['total_seconds']:.0f} s: test accuracy "
              + ", ".join(f"{100 * a:.2f}%" for a in acc if a is not None))
        return row


def interrupted(run_dir: Path, digest: str, world: int) -> bool:
    """Whether `run_dir` holds a sound checkpoint of this very run (same config identity and world)
    that it has not finished: then the runner continues it instead of starting over. Anything else
    (no checkpoint, a damaged one, another config, a finished run whose row was not written) trains
    from scratch."""
    from ..launch import resume_config

    if not (run_dir / "config.yaml").is_file() or (run_dir / "summary.json").is_file():
        return False
    try:
        cfg, saved_world = resume_config(run_dir)
    except (UserError, CheckpointError, ValueError, OSError):
        return False
    return saved_world == world and config_hash(cfg, world) == digest


def load_rows(out: str | Path, experiment: Experiment) -> list[dict]:
    return res.read_rows(res.results_file(out, experiment.name))
