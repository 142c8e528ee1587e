"""One trainer for every arm: all-reduce (n_models = 1), codistillation, independent (alpha = 0).

Each worker trains its own model through `Codistillation` (DDP over its model group, teachers, their
exchange, the loss); the trainer adds what a run needs around it: the task's data and evaluation,
schedules, logs, checkpoints. The loop is a sequence of named steps: train_step, maybe_log,
maybe_eval, maybe_checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import sharded_checkpoint
from .codistillation import Codistillation
from .config import ONE_MODEL_EXCHANGES, Config, check_world_size, effective_precision, to_dict
from .distributed import DistContext, configure_device
from .evaluation import initial_parameters, parameter_distance
from .faults import NonFiniteLossError, PeerError, inject_fault, parse_fault, peer_error
from .metrics import MetricsWindow
from .optim_step import autocast, clip_grad_norm, grad_scaler, grad_sync_paused
from .profiling import StepProfiler
from .recipe import build_optimizer, build_schedules
from .run_log import RunLog, atomic_write_text, write_json
from .schedules import apply_to_optimizer
from .tasks import make_task, optimizer_steps_per_epoch
from .throughput import flops_per_target, peak_tflops, speed
from .topology import build_topology, model_seed


def to_device(batch, device: torch.device):
    """A batch's tensors (in tuples, lists, named tuples) on `device`, copied once, on the current
    stream: the teachers (on their own CUDA stream) and the student then read the same copy."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def every(step: int, period: int) -> bool:
    """True on steps period, 2 * period, ... (step counts completed updates)."""
    return period > 0 and step % period == 0


def build_codistillation(cfg: Config, task, topo, device: torch.device, alpha) -> Codistillation:
    """The component configured by `cfg.codistill` (models built by the task)."""
    c, names, o = cfg.codistill, cfg.model_names(), cfg.outer
    precision = effective_precision(cfg)  # the teachers run under the student's autocast
    teacher_precision = precision if precision != "fp32" else c.teacher_precision
    exchange, every = c.exchange, c.exchange_every
    if c.method != "distill" and c.n_models > 1:  # DiLoCo / local SGD: an outer step every H steps, no teachers
        exchange, every = c.method, o.every or c.exchange_every
    return Codistillation(lambda j: task.build_model(names[j]), c.n_models, every, alpha,
                          delay=c.exchange_delay, exchange=exchange, exchange_dir=c.exchange_dir,
                          teacher_run=c.teacher_run,
                          loss=c.loss, temperature=c.temperature, label_smoothing=cfg.train.label_smoothing,
                          teacher_mode=c.teacher_mode, teacher_precision=teacher_precision,
                          exchange_dtype=c.exchange_dtype, hierarchical=c.exchange_hierarchical,
                          outer=(o.lr, o.momentum, o.nesterov), seed=cfg.train.seed, device=device, topology=topo,
                          trained_teachers_only=c.alpha_schedule == "burnin", max_teacher_age=c.max_teacher_age,
                          distill_fraction=c.distill_fraction, teacher_every=c.teacher_every,
                          teacher_dtype=c.teacher_dtype, teacher_topk=c.teacher_topk, parallel=cfg.train.parallel,
                          teacher_offload=c.teacher_offload, outer_state_device=o.state_device,
                          graph=c.graph, peers=c.peers, shard_size=cfg.train.shard_size)


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.fault = parse_fault(os.environ.get("CODISTILL_FAULT"))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        check_world_size(cfg, ctx.world_size)
        c = cfg.codistill
        # A job trains all n models, or one of them with exchange through storage.
        configure_device(self.device, cfg.train.deterministic)  # cuDNN autotuning + TF32, or determinism
        if self.device.type == "cuda":  # the summary's peak memory is this run's, not the process's
            torch.cuda.reset_peak_memory_stats(self.device)
        self.topo = topo = build_topology(c.n_models, c.model_index if c.exchange in ONE_MODEL_EXCHANGES else None)
        self.model_index = topo.model_index  # among all n models
        self.task = make_task(cfg, self.device, self.run_dir)
        self.seed = model_seed(cfg.train.seed, self.model_index)
        # Arithmetic on the data's size: starts no DataLoader workers (train_batches would).
        batches_per_epoch = self.task.steps_per_epoch(topo)
        self.accumulate = cfg.train.accumulate
        steps_per_epoch = optimizer_steps_per_epoch(batches_per_epoch, self.accumulate)
        self.model_batch = cfg.data.batch_size * topo.replicas * self.accumulate
        self.schedules = build_schedules(cfg, steps_per_epoch, self.model_batch)
        self.total_steps = self.schedules.total_steps
        self.eval_every = cfg.train.eval_every or max(1, self.total_steps // 10)

        self.codist = build_codistillation(cfg, self.task, topo, self.device, self.schedules.alpha)
        self.model, self.teachers = self.codist.module, self.codist.teachers
        self.counter, self.exchanger = self.codist.counter, self.codist.exchanger
        self.initial = initial_parameters(self.model)  # on the CPU
        self.optimizer = build_optimizer(self.model, cfg)
        self.precision = effective_precision(cfg)
        self.scaler = grad_scaler(self.device, self.precision)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        seq_len = getattr(self.task, "flops_sequence_length", None)
        self.flops_per_target = flops_per_target(self.model, seq_len)
        self.peak_tflops = peak_tflops(self.device, self.precision, cfg.train.peak_tflops)
        self.attached = self.codist.attach(self.optimizer)  # counts steps, runs the exchange

        self.skipped_steps = 0
        self.window = MetricsWindow(self.device)
        self._t0 = time.perf_counter()
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.leader_dir = self.run_dir / f"model_{self.model_index}" if self.run_dir and topo.is_model_leader else None
        if resume:
            self.load_checkpoint()
        self.log = RunLog(self.leader_dir, resumed_at=self.step if resume else None, trackers=cfg.train.trackers,
                          run_dir=self.run_dir, config=to_dict(cfg))
        self.profiler = StepProfiler(cfg.train.profile, self.run_dir, topo.rank, self.device)

    @property
    def step(self) -> int:
        """Completed updates (skipped ones included)."""
        return self.codist.step

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to the end; returns the run summary (on every rank)."""
        try:
            return self._fit()
        except RuntimeError as e:  # collectives fail this way when a peer hangs or dies
            error = peer_error(e, self.topo.rank, self.step, self.cfg.dist.timeout_s)
            if error is None:
                raise
            raise error from None
        finally:
            self.log.close()

    def _fit(self) -> dict:
        dist.barrier()  # start the clocks together: setup skew is not training time or exchange stall
        start = self._t0 = self.window.start = time.perf_counter()
        # Batches count micro-batches: K = train.accumulate of them per optimizer step.
        batches, _ = self.task.train_batches(self.topo, self.seed, start_step=self.step * self.accumulate)
        bar = self._progress_bar()
        try:
            with self.attached:  # leaving it finishes a transfer still in flight
                while self.step < self.total_steps:
                    micro_batches = [next(batches) for _ in range(self.accumulate)]
                    self.profiler.before_step(self.step)
                    with self._sync_debug():
                        self.train_step(*micro_batches)
                    self.profiler.after_step(self.step, last=self.step == self.total_steps)
                    if self.step == self.total_steps:  # the last transfer / outer step (DiLoCo's
                        self.codist.finish()  # changes the model) before the final eval and checkpoint
                    self.maybe_log()
                    self.maybe_eval()
                    self.maybe_checkpoint()
                    inject_fault(self.fault, self.topo.rank, self.step)
                    self._update_bar(bar)
            return self.summarize(time.perf_counter() - start)
        finally:
            if bar is not None:
                bar.close()

    def _sync_debug(self):
        """With CODISTILL_SYNC_DEBUG=1 on CUDA, warn at every host synchronization inside a training
        step that does not exchange (exchange steps synchronize on purpose: exchange.py)."""
        if (not os.environ.get("CODISTILL_SYNC_DEBUG") or self.device.type != "cuda"
                or self.step % self.codist.every == 0):
            return contextlib.nullcontext()
        return _SyncDebug()

    def maybe_exchange(self) -> None:
        """This step's exchange (train_step runs it too; tests call it to look at the teachers)."""
        self.codist.maybe_exchange()

    def train_step(self, *micro_batches) -> dict[str, torch.Tensor]:
        """One optimizer step of the codistillation objective at self.step, from its micro-batches
        (train.accumulate of them in `fit`); returns the last micro-batch's losses.

        Each micro-batch's loss is weighted 1/K, so K micro-batches of B give the gradient of one
        batch of K x B (exactly when no BatchNorm sees the batch split); the gradient is synchronized
        over the model group on the last one only. The teachers run on every micro-batch (on CUDA on
        their own stream, overlapping the student's forward), under the student's autocast.
        Then: fp16's unscaling, the global gradient norm (clipped to optim.clip_norm when set), the
        update. An update skipped (train.nonfinite=skip on a non-finite gradient, or fp16's scaler
        on an overflow) still counts as a step for the schedules and the exchange.
        """
        s = self.schedules
        apply_to_optimizer(self.optimizer, self.step, s.lr, s.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)
        stats, last = 0, len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            with grad_sync_paused(self.codist.model) if i < last else contextlib.nullcontext():
                out, batch_stats = self._forward_backward(to_device(batch, self.device), len(micro_batches))
            stats = stats + batch_stats
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(self.params, self.cfg.optim.clip_norm)
        if self._update(norm):
            self.window.add(stats, norm)
            return out
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.codist.on_optimizer_step()  # the update counts as a step, as the schedules expect
        if self.cfg.train.nonfinite == "stop":  # fp16 overflow: the losses are logged (and a NaN one stops the run)
            self.window.add(stats)
        return out

    def _forward_backward(self, batch, micro_batches: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        teacher_logits = self.codist.teacher_logits(batch, self.teacher_forward)
        with autocast(self.device, self.precision):
            logits, targets = self.task.forward(self.codist.model, batch)
        out = self.codist.loss(logits, targets, teacher_logits)
        if self.fault and self.fault[0] == "nan" and self.fault[1:] == (self.topo.rank, self.step):
            out["total"] = out["total"] * float("nan")
        loss = out["total"] / micro_batches if micro_batches > 1 else out["total"]
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return out, self.window.batch_stats(out, logits, targets)

    def _update(self, norm: torch.Tensor) -> bool:
        """The optimizer step; False when it was skipped. Every replica decides alike: the gradients
        (and so their norm) are the model group's."""
        if self.scaler is not None:  # it skips the update on inf/NaN gradients (and lowers its scale)
            before = self.codist.step
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return self.codist.step != before  # the step hook ran only if the optimizer stepped
        if self.cfg.train.nonfinite == "skip" and not bool(torch.isfinite(norm)):
            return False
        self.optimizer.step()
        return True

    def teacher_forward(self, teacher, batch) -> torch.Tensor:
        """A teacher's logits on the student's batch: the task's forward pass, targets dropped."""
        return self.task.forward(teacher, batch)[0]

    def check_finite(self) -> list[float]:
        """The window's mean losses and accuracy over the model group; raises NonFiniteLossError
        (before anything is logged or saved) if a loss is not finite."""
        means = self.window.means(self.topo.model_group, self.topo.replicas)
        self.window.check_finite(means, f"step {self.step} in model {self.model_index} (rank {self.topo.rank})")
        return means

    def maybe_log(self) -> None:
        if not (every(self.step, self.cfg.train.log_every) or self.step == self.total_steps):
            return
        task, distill, total, correct = self.check_finite()
        s, last = self.schedules, self.step - 1
        grad_norm, grad_norm_max = self.window.grad_norm()
        elapsed = max(self.window.elapsed(), 1e-9)
        self.last_train = {
            "train/task_loss": task, "train/distill_loss": distill, "train/loss": total,
            "train/accuracy": correct, "lr": s.lr(last), "weight_decay": s.weight_decay(last), "alpha": s.alpha(last),
            "staleness": self.codist.staleness(),
            "bytes/allreduce": self.counter.allreduce_sent, "bytes/exchange": self.counter.exchange_sent,
            "bytes/eval": self.counter.eval_sent,
            "exchange_blocked_s": self.codist.blocked_seconds,
            "skipped_steps": self.skipped_steps,
            "samples_per_s": self.window.steps * self.model_batch / elapsed,
            **speed(self.window.group_targets / self.topo.replicas / elapsed, self.flops_per_target,
                    self.peak_tflops),
            "grad_norm": grad_norm, "grad_norm_max": grad_norm_max,
            "peak_memory_mib": peak_memory_mib(self.device),
            "param_distance": parameter_distance(self.model, self.initial),
            "epoch": self.step / s.steps_per_epoch, "time": time.perf_counter() - self._t0,
            **self.exchange_metrics(),
        }
        self.log.log(self.step, {"model": self.model_index, **self.last_train})
        self.window.reset()

    def exchange_metrics(self) -> dict:
        """The storage exchange's own: each teacher's age (steps, seconds), publications, conflicts."""
        metrics = getattr(self.exchanger, "metrics", None)
        return metrics(self.step - 1) if metrics is not None else {}

    def maybe_eval(self, force: bool = False) -> None:
        if not (force or every(self.step, self.eval_every) or self.step == self.total_steps):
            return
        # Evaluation gathers over the grid, so a worker that ran ahead waits for the slowest inside it;
        # the barrier makes that wait happen before `eval_start`, where it counts as training time
        # (a straggler's cost), and the evaluation's own duration is what follows.
        dist.barrier()
        eval_start = time.perf_counter() - self._t0
        with self.codist.evaluating():  # a sharded model gathered for the evaluation
            result = self.task.evaluate(self.model, "val", self.topo)
        self.counter.eval_sent += result.get("bytes_sent", 0)  # the evaluation's traffic between models
        result["step"] = self.step
        self.last_eval = result
        mine = result["models"][self.topo.job_model]
        self.log.log(self.step, {"model": self.model_index,
                                 **{f"val/{k}": v for k, v in mine.items()},
                                 "val/ensemble_accuracy": result["ensemble"]["accuracy"],
                                 "val/ensemble_loss": result["ensemble"]["loss"],
                                 "val/ensemble_argmax_exact": result["ensemble"].get("argmax_exact", 1.0),
                                 "bytes/eval": self.counter.eval_sent,
                                 "val/disagreement": result["disagreement"],
                                 "eval_start": eval_start, "time": time.perf_counter() - self._t0})

    def _progress_bar(self):
        if self.topo.rank != 0 or not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=f"{self.cfg.mode} W={self.topo.grid.world_size}",
                    unit="step", dynamic_ncols=True)

    def _update_bar(self, bar) -> None:
        if bar is None:
            return
        bar.update(1)
        if self.last_eval and every(self.step, self.cfg.train.log_every):
            bar.set_postfix(loss=f"{self.last_train['train/task_loss']:.3f}",
                            val_acc=f"{self.last_eval['models'][0]['accuracy']:.3f}")

    # -- checkpoints --------------------------------------------------------------------------

    def maybe_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        if every(self.step, self.cfg.train.checkpoint_every) or self.step == self.total_steps:
            self.check_finite()  # never a checkpoint of a diverged model: the last good one stays
            self.codist.wait()  # a transfer in flight is part of the state: complete it on every rank
            self.save_checkpoint()

    def rank_state(self) -> dict:
        """What each rank saves of its own: RNG, byte counters, skipped steps, the metrics window."""
        return {"rng": ckpt.rng_state(self.device), "counter": self.counter.as_dict(),
                "skipped_steps": self.skipped_steps, **self.window.state_dict()}

    def save_checkpoint(self) -> None:
        """This step's files on every rank, then the manifest (checkpoint.save_run_state; sharded
        runs: sharded_checkpoint.save)."""
        if self.codist.mesh is not None:
            return sharded_checkpoint.save(self)
        model_state = None
        if self.topo.is_model_leader:
            model_state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                           **self.codist.state_dict(), "initial": self.initial}
            if self.scaler is not None:  # fp16's loss scale and its growth tracker
                model_state["scaler"] = self.scaler.state_dict()
        ckpt.save_run_state(self.run_dir, self.step, f"model_{self.model_index}.pt", model_state, self.topo.rank,
                            self.rank_state(), self.topo.grid.world_size)

    def load_checkpoint(self) -> None:
        if self.codist.mesh is not None:
            mine = sharded_checkpoint.load(self)  # model, optimizer, component; possibly another k
        else:
            state, mine = ckpt.load_run_state(self.run_dir, f"model_{self.model_index}.pt", self.topo.rank,
                                              self.topo.grid.world_size)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            self.codist.load_state_dict(state)  # the step, teachers and a pending transfer
            self.initial = [t.cpu() for t in state["initial"]]
        ckpt.set_rng_state(mine["rng"], self.device)
        self.counter.load(mine["counter"])
        self.skipped_steps = mine["skipped_steps"]
        self.window.load_state_dict(mine)
        if self.leader_dir is not None:  # drop what the interrupted run logged after the checkpoint
            truncate_metrics(self.leader_dir / "metrics.jsonl", self.step)

    # -- the end ------------------------------------------------------------------------------

    def summarize(self, wall_seconds: float) -> dict:
        """Final evaluation, gathered over the grid into the run summary (written by rank 0)."""
        if self.last_eval.get("step") != self.step:
            self.maybe_eval(force=True)
        with self.codist.evaluating():
            test = self.task.evaluate(self.model, "test", self.topo)
        self.counter.eval_sent += test.get("bytes_sent", 0)
        mine = {"index": self.model_index, "name": self.cfg.model_names()[self.model_index],
                "train_loss": self.last_train.get("train/task_loss"),
                "train_accuracy": self.last_train.get("train/accuracy"),
                "param_distance": parameter_distance(self.model, self.initial),
                "counter": self.counter.as_dict(), "blocked": self.codist.blocked_seconds,
                "exchange_metrics": self.exchange_metrics(),
                "peak_memory_mib": peak_memory_mib(self.device),
                "peak_memory_kind": "cuda_allocated" if self.device.type == "cuda" else "process_rss"}
        ranks = [None] * self.topo.grid.world_size
        dist.all_gather_object(ranks, mine)
        leaders = [ranks[self.topo.grid.rank(m, 0)] for m in range(self.topo.job_models)]
        summary = summarize(self.cfg, ranks, leaders, self.last_eval, test, steps=self.step,
                            steps_per_epoch=self.schedules.steps_per_epoch, model_batch=self.model_batch,
                            replicas=self.topo.replicas, teacher_steps=dict(self.teachers.versions),
                            final_staleness=self.codist.staleness(), wall_seconds=wall_seconds)
        if self.topo.rank == 0 and self.run_dir is not None:
            write_json(self.run_dir / "summary.json", summary)
        extras = getattr(self.task, "write_extras", None)  # optional (LM: the sample); after the summary
        if extras is not None:
            # Every worker gathers a sharded model, so the one that samples alone needs no peer.
            with self.codist.evaluating():
                extras(self.model, self.topo)
        return summary


def summarize(cfg: Config, ranks: list[dict], leaders: list[dict], val: dict, test: dict, *, steps: int,
              steps_per_epoch: int, model_batch: int, replicas: int, teacher_steps: dict, final_staleness: int,
              wall_seconds: float) -> dict:
    """The run summary, from every rank's facts (`ranks`, in rank order), each of this job's models'
    first rank (`leaders`, in model order) and the final evaluations. Pure: no process group."""
    models = []
    for m, info in enumerate(leaders):
        models.append({"index": info["index"], "name": info["name"],
                       **{f"val_{k}": v for k, v in val["models"][m].items()},
                       **{f"test_{k}": v for k, v in test["models"][m].items()},
                       "train_loss": info["train_loss"], "train_accuracy": info["train_accuracy"],
                       "param_distance": info["param_distance"]})
    counters = [r["counter"] for r in ranks]
    mean = lambda key: sum(c[key] for c in counters) / len(counters)  # noqa: E731
    c = cfg.codistill
    return {
        "mode": cfg.mode, "n_models": c.n_models, "job_models": len(leaders),
        "exchange": c.exchange, "world_size": len(ranks),
        "replicas": replicas, "steps": steps, "steps_per_epoch": steps_per_epoch,
        "epochs": steps / steps_per_epoch, "model_batch": model_batch,
        "exchange_every": c.exchange_every if c.n_models > 1 else None,
        "teacher_steps": teacher_steps, "final_staleness": final_staleness,
        "models": models,
        "ensemble_val_accuracy": val["ensemble"]["accuracy"], "ensemble_val_loss": val["ensemble"]["loss"],
        "ensemble_test_accuracy": test["ensemble"]["accuracy"], "ensemble_test_loss": test["ensemble"]["loss"],
        "ensemble_test_bleu": test["ensemble"].get("bleu"),
        "val_disagreement": val["disagreement"], "test_disagreement": test["disagreement"],
        "bytes_per_worker": {"allreduce": mean("allreduce_sent"), "exchange": mean("exchange_sent"),
                             "exchange_received": mean("exchange_received"),
                             "buffer_sync": mean("buffer_sync_sent"), "eval": mean("eval_sent")},
        "exchanges": counters[0]["exchanges"],
        "exchange_blocked_fraction": max(r["blocked"] for r in ranks) / max(wall_seconds, 1e-9),
        # Storage exchange: the loop's wait on storage, each teacher's age, publications, conflicts.
        **({"storage": {"wait_s": max(r["blocked"] for r in ranks), **leaders[0].get("exchange_metrics", {})}}
           if c.exchange == "storage" else {}),
        "wall_seconds": wall_seconds,
        # Highest over the workers: what one worker needs (CUDA: tensors allocated; CPU: the whole
        # process, torch's own libraries included).
        "peak_memory_mib": max(r["peak_memory_mib"] for r in ranks),
        "peak_memory_kind": ranks[0]["peak_memory_kind"],
        "samples_per_s": steps * model_batch * len(leaders) / max(wall_seconds, 1e-9),
    }


def peak_memory_mib(device: torch.device) -> float:
    """This worker's peak memory so far: CUDA tensors on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class _SyncDebug:
    def __enter__(self):
        torch.cuda.set_sync_debug_mode("warn")

    def __exit__(self, *_):
        torch.cuda.set_sync_debug_mode("default")


def run_worker(rank: int, world_size: int, init_method: str | None, cfg: Config, run_dir: str | None,
               resume: bool = False) -> dict:
    """Entry point of one worker (spawned locally, or called under torchrun with init_method None)."""
    from .distributed import init_distributed, shutdown

    d = cfg.dist
    ctx = init_distributed(d.backend, d.threads, d.timeout_s, init_method=init_method,
                           rank=rank if init_method else None, world_size=world_size if init_method else None)
    try:
        return Trainer(cfg, ctx, run_dir, resume=resume).fit()
    finally:
        shutdown()


__all__ = ["Trainer", "run_worker", "NonFiniteLossError", "PeerError"]
