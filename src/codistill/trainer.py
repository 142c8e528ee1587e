"""One trainer for every arm: all-reduce (n_models = 1), codistillation, independent (alpha = 0).

Each worker trains its own model (DDP over its model group) and, when there are other models,
distills toward stale teacher copies of them that the `Exchanger` refreshes every T steps. The loop
is a sequence of named steps: maybe_exchange, train_step, maybe_log, maybe_eval.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .accounting import CommCounter, counting_allreduce_hook
from .config import Config, check_world_size
from .distributed import DistContext
from .faults import NonFiniteLossError, PeerError, inject_fault, parse_fault, peer_error
from .evaluation import parameter_distance
from .exchange import Exchanger, Teachers
from .losses import codistillation_loss
from .recipe import build_optimizer, build_schedules
from .run_log import RunLog, atomic_write_text, write_json
from .schedules import apply_to_optimizer
from .tasks import make_task
from .topology import build_topology


def every(step: int, period: int) -> bool:
    """True on steps period, 2 * period, ... (step counts completed updates)."""
    return period > 0 and step % period == 0


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.fault = parse_fault(os.environ.get("CODISTILL_FAULT"))
        self.run_dir = Path(run_dir) if run_dir is not None else None
        check_world_size(cfg, ctx.world_size)
        c = cfg.codistill
        self.topo = topo = build_topology(cfg.job_models)
        # This worker's model among all n (a job trains one of them with exchange through storage).
        self.model_index = c.model_index if c.exchange == "storage" else topo.model_index
        peers = [j for j in range(c.n_models) if j != self.model_index]
        self.task = make_task(cfg, self.device, self.run_dir)
        self.names = cfg.model_names()
        self.seed = cfg.train.seed + self.model_index

        torch.manual_seed(self.seed)
        self.model = self.task.build_model(self.names[self.model_index])
        self.initial = [p.detach().float().clone() for p in self.model.parameters()]
        with torch.random.fork_rng(devices=[]):  # teachers' (overwritten) init must not shift our RNG
            teachers = {j: self.task.build_model(self.names[j]) for j in peers}
        self.teachers = Teachers(teachers, cfg.codistill.teacher_mode)

        self.counter = CommCounter()
        self.ddp = self.wrap(self.model)
        self.exchanger = self.make_exchanger() if peers else None
        self.teacher_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.optimizer = build_optimizer(self.model, cfg)

        _, steps_per_epoch = self.task.train_batches(topo, self.seed)
        self.model_batch = cfg.data.batch_size * topo.replicas
        self.schedules = build_schedules(cfg, steps_per_epoch, self.model_batch)
        self.total_steps = self.schedules.total_steps
        self.eval_every = cfg.train.eval_every or max(1, self.total_steps // 10)

        self.step = 0
        self.skipped_steps = 0
        self._window = torch.zeros(5, dtype=torch.float64, device=self.device)  # task, distill, total, correct, n
        self._window_start = self._t0 = time.perf_counter()
        self._window_steps = 0
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.leader_dir = self.run_dir / f"model_{self.model_index}" if self.run_dir and topo.is_model_leader else None
        if resume:
            self.load_checkpoint()
        self.log = RunLog(self.leader_dir, resumed_at=self.step if resume else None)

    # -- construction -------------------------------------------------------------------------

    def make_exchanger(self):
        c = self.cfg.codistill
        if c.method != "distill":  # DiLoCo / local SGD: periodic outer steps, no teachers
            from .outer_sync import outer_sync_for

            self.teachers = Teachers({})
            sync = outer_sync_for(self.model, self.topo, self.cfg, self.counter)
            sync.start_together()  # one starting point: the distance from initialization is from it
            self.initial = [p.detach().float().clone() for p in self.model.parameters()]
            return sync
        if c.exchange == "storage":
            from .storage_exchange import StorageExchanger

            return StorageExchanger(self.model, self.teachers, self.topo, self.model_index, c.exchange_every,
                                    c.exchange_dir, counter=self.counter)
        return Exchanger(self.model, self.teachers, self.topo, c.exchange_every, c.exchange_delay,
                         counter=self.counter)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over this model's group, counting its all-reduce bytes; no wrapper for one replica."""
        if self.topo.replicas == 1:
            return model
        ddp = DDP(model, process_group=self.topo.model_group,
                  device_ids=[self.device.index] if self.device.type == "cuda" else None)
        ddp.register_comm_hook(self.topo.model_group, counting_allreduce_hook(self.counter))
        return ddp

    # -- the loop -----------------------------------------------------------------------------

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One optimizer step of the codistillation objective at self.step."""
        s, c = self.schedules, self.cfg.codistill
        apply_to_optimizer(self.optimizer, self.step, s.lr, s.weight_decay)
        alpha = s.alpha(self.step)
        logits, targets, teacher_logits = self.forward_all(batch, alpha)
        out = codistillation_loss(logits.float(), [t.float() for t in teacher_logits], targets, alpha=alpha,
                                  kind=c.loss, temperature=c.temperature,
                                  label_smoothing=self.cfg.train.label_smoothing)
        if self.fault and self.fault[0] == "nan" and self.fault[1:] == (self.topo.rank, self.step):
            out["total"] = out["total"] * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        if self.cfg.train.nonfinite == "skip" and not self._grads_finite():
            # Gradients are averaged over the model group, so every replica skips together.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.step += 1
            return out
        self.optimizer.step()
        with torch.no_grad():  # tensors only: no host sync per step
            real = targets != -100  # padding positions of sequence tasks
            n = real.sum().to(torch.float64)
            correct = ((logits.argmax(-1) == targets) & real).sum().to(torch.float64)
            losses = torch.stack([out["task"], out["distill"], out["total"]]).detach().to(torch.float64)
            self._window += torch.cat([losses * n, correct.view(1), n.view(1)])
        self._window_steps += 1
        self.step += 1
        return out

    def forward_all(self, batch, alpha: float):
        """Student logits, targets and (when alpha > 0) the available teachers' logits.

        On CUDA the teachers run on their own stream, overlapping the student's forward pass;
        `train.amp` runs the student under bf16 autocast, `codistill.teacher_precision=bf16` the
        teachers (their effect on accuracy is measured in docs/performance.md, not assumed).
        """
        use_teachers = alpha > 0 and bool(self.teachers.available())
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.amp)
        teacher_amp = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                     enabled=self.cfg.codistill.teacher_precision == "bf16")
        if self.device.type != "cuda" or not use_teachers:
            teacher_logits = []
            if use_teachers:
                with teacher_amp:
                    teacher_logits = self.task.teacher_logits(self.teachers, batch)
            with amp:
                logits, targets = self.task.forward(self.ddp, batch)
            return logits, targets, teacher_logits
        main = torch.cuda.current_stream(self.device)
        self.teacher_stream.wait_stream(main)  # the batch was copied on the main stream
        with torch.cuda.stream(self.teacher_stream), teacher_amp:
            teacher_logits = self.task.teacher_logits(self.teachers, batch)
        with amp:
            logits, targets = self.task.forward(self.ddp, batch)
        main.wait_stream(self.teacher_stream)
        for t in teacher_logits:
            t.record_stream(main)  # allocated on the side stream, used on the main one
        return logits, targets, teacher_logits

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True

    def maybe_exchange(self) -> None:
        if self.exchanger is not None:
            self.exchanger.maybe_exchange(self.step)

    def maybe_log(self) -> None:
        if not (every(self.step, self.cfg.train.log_every) or self.step == self.total_steps):
            return
        task, distill, total, correct = self._window_means()
        elapsed = time.perf_counter() - self._window_start
        s = self.schedules
        self.last_train = {
            "train/task_loss": task, "train/distill_loss": distill, "train/loss": total,
            "train/accuracy": correct, "lr": s.lr(self.step - 1), "weight_decay": s.weight_decay(self.step - 1),
            "alpha": s.alpha(self.step - 1),
            "staleness": self.teachers.staleness(self.step - 1) if len(self.teachers) else 0,
            "bytes/allreduce": self.counter.allreduce_sent, "bytes/exchange": self.counter.exchange_sent,
            "exchange_blocked_s": self.exchanger.blocked_seconds if self.exchanger else 0.0,
            "skipped_steps": self.skipped_steps,
            "samples_per_s": self._window_steps * self.model_batch / max(elapsed, 1e-9),
            "param_distance": parameter_distance(self.model, self.initial),
            "epoch": self.step / s.steps_per_epoch, "time": time.perf_counter() - self._t0,
        }
        self.log.log(self.step, {"model": self.model_index, **self.last_train})
        self._window.zero_()
        self._window_start, self._window_steps = time.perf_counter(), 0

    def _window_means(self) -> list[float]:
        """Mean task, distill, total loss and accuracy since the last log, over the model group;
        raises NonFiniteLossError (before anything is logged or saved) if a loss is not finite."""
        window = self._window.clone()
        if self.topo.replicas > 1:
            dist.all_reduce(window, group=self.topo.model_group)
        means = (window[:4] / window[4].clamp_min(1)).tolist()
        task, distill, total, _ = means
        if not all(math.isfinite(v) for v in (task, distill, total)):
            raise NonFiniteLossError(
                f"non-finite loss (task {task}, distill {distill}) before step {self.step} in model "
                f"{self.model_index} (rank {self.topo.rank}); the last good checkpoint is kept "
                "(train.nonfinite=skip skips such updates instead)")
        return means

    def maybe_eval(self, force: bool = False) -> None:
        if not (force or every(self.step, self.eval_every) or self.step == self.total_steps):
            return
        result = self.task.evaluate(self.model, "val", self.topo)
        result["step"] = self.step
        self.last_eval = result
        mine = result["models"][self.topo.model_index]
        self.log.log(self.step, {"model": self.model_index,
                                 **{f"val/{k}": v for k, v in mine.items()},
                                 "val/ensemble_accuracy": result["ensemble"]["accuracy"],
                                 "val/ensemble_loss": result["ensemble"]["loss"],
                                 "val/disagreement": result["disagreement"],
                                 "time": time.perf_counter() - self._t0})

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
        start = self._t0 = self._window_start = time.perf_counter()
        batches, _ = self.task.train_batches(self.topo, self.seed, start_step=self.step)
        bar = self._progress_bar()
        try:
            while self.step < self.total_steps:
                self.maybe_exchange()
                self.train_step(next(batches))
                if self.step == self.total_steps and self.exchanger is not None:
                    self.exchanger.finish()  # the last transfer / outer step, before the final eval and checkpoint
                self.maybe_log()
                self.maybe_eval()
                self.maybe_checkpoint()
                inject_fault(self.fault, self.topo.rank, self.step)
                if bar is not None:
                    bar.update(1)
                    if self.last_eval and every(self.step, self.cfg.train.log_every):
                        bar.set_postfix(loss=f"{self.last_train['train/task_loss']:.3f}",
                                        val_acc=f"{self.last_eval['models'][0]['accuracy']:.3f}")
            if self.exchanger is not None:
                self.exchanger.finish()
            return self.summarize(time.perf_counter() - start)
        finally:
            if bar is not None:
                bar.close()

    def _progress_bar(self):
        if self.topo.rank != 0 or not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=f"{self.cfg.mode} W={self.topo.grid.world_size}",
                    unit="step", dynamic_ncols=True)

    # -- checkpoints --------------------------------------------------------------------------

    def maybe_checkpoint(self) -> None:
        if self.run_dir is None:
            return
        if every(self.step, self.cfg.train.checkpoint_every) or self.step == self.total_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Every file of this step, then the manifest; never a checkpoint of a diverged model."""
        self._window_means()  # raises on a non-finite loss, so the last good checkpoint stays
        directory = ckpt.step_dir(self.run_dir, self.step)
        hashes = {}
        if self.topo.is_model_leader:
            state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "exchanger": self.exchanger.state_dict() if self.exchanger else {},
                     "initial": self.initial}
            name = f"model_{self.model_index}.pt"
            hashes[name] = ckpt.save_file(state, directory / name)
        elif self.exchanger is not None:
            self.exchanger.state_dict()  # completes a pending transfer, as on the leader
        rank_state = {"rng": ckpt.rng_state(self.device), "counter": self.counter.as_dict(),
                      "skipped_steps": self.skipped_steps, "window": self._window.cpu(),
                      "window_steps": self._window_steps}
        hashes[f"rank_{self.topo.rank}.pt"] = ckpt.save_file(rank_state, directory / f"rank_{self.topo.rank}.pt")
        everyone = [None] * self.topo.grid.world_size
        dist.all_gather_object(everyone, hashes)
        if self.topo.rank == 0:
            ckpt.commit(self.run_dir, self.step, {k: v for h in everyone for k, v in h.items()},
                        self.topo.grid.world_size)
        dist.barrier()

    def load_checkpoint(self) -> None:
        manifest = ckpt.read_latest(self.run_dir)
        if manifest is None:
            raise ckpt.CheckpointError(f"nothing to resume: {self.run_dir} has no checkpoint")
        if manifest.get("world_size", self.topo.grid.world_size) != self.topo.grid.world_size:
            raise ckpt.CheckpointError(f"checkpoint was written by {manifest['world_size']} workers, "
                                       f"this run has {self.topo.grid.world_size}")
        state = ckpt.load_entry(self.run_dir, manifest, f"model_{self.model_index}.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.exchanger is not None:
            self.exchanger.load_state_dict(state["exchanger"])
        self.initial = [t.to(self.device) for t in state["initial"]]
        self.step = state["step"]
        mine = ckpt.load_entry(self.run_dir, manifest, f"rank_{self.topo.rank}.pt")
        ckpt.set_rng_state(mine["rng"], self.device)
        self.counter.load(mine["counter"])
        self.skipped_steps = mine["skipped_steps"]
        self._window = mine["window"].to(self.device)
        self._window_steps = mine["window_steps"]
        if self.leader_dir is not None:  # drop what the interrupted run logged after the checkpoint
            truncate_metrics(self.leader_dir / "metrics.jsonl", self.step)

    # -- the end ------------------------------------------------------------------------------

    def summarize(self, wall_seconds: float) -> dict:
        if self.last_eval.get("step") != self.step:
            self.maybe_eval(force=True)
        val = self.last_eval
        test = self.task.evaluate(self.model, "test", self.topo)
        mine = {"index": self.model_index, "name": self.names[self.model_index],
                "train_loss": self.last_train.get("train/task_loss"),
                "train_accuracy": self.last_train.get("train/accuracy"),
                "param_distance": parameter_distance(self.model, self.initial),
                "counter": self.counter.as_dict(),
                "blocked": self.exchanger.blocked_seconds if self.exchanger else 0.0}
        everyone = [None] * self.topo.grid.world_size
        dist.all_gather_object(everyone, mine)
        leaders = [everyone[self.topo.grid.rank(m, 0)] for m in range(self.topo.n_models)]
        models = []
        for m, info in enumerate(leaders):
            models.append({"index": info["index"], "name": info["name"],
                           **{f"val_{k}": v for k, v in val["models"][m].items()},
                           **{f"test_{k}": v for k, v in test["models"][m].items()},
                           "train_loss": info["train_loss"], "train_accuracy": info["train_accuracy"],
                           "param_distance": info["param_distance"]})
        counters = [e["counter"] for e in everyone]
        mean = lambda key: sum(c[key] for c in counters) / len(counters)  # noqa: E731
        summary = {
            "mode": self.cfg.mode, "n_models": self.cfg.codistill.n_models, "job_models": self.topo.n_models,
            "exchange": self.cfg.codistill.exchange, "world_size": self.topo.grid.world_size,
            "replicas": self.topo.replicas, "steps": self.step, "steps_per_epoch": self.schedules.steps_per_epoch,
            "epochs": self.step / self.schedules.steps_per_epoch, "model_batch": self.model_batch,
            "exchange_every": self.cfg.codistill.exchange_every if self.exchanger else None,
            "teacher_steps": dict(self.teachers.versions), "final_staleness": self.teachers.staleness(self.step),
            "models": models,
            "ensemble_val_accuracy": val["ensemble"]["accuracy"], "ensemble_val_loss": val["ensemble"]["loss"],
            "ensemble_test_accuracy": test["ensemble"]["accuracy"],
            "val_disagreement": val["disagreement"], "test_disagreement": test["disagreement"],
            "bytes_per_worker": {"allreduce": mean("allreduce_sent"), "exchange": mean("exchange_sent"),
                                 "exchange_received": mean("exchange_received"),
                                 "buffer_sync": mean("buffer_sync_sent")},
            "exchanges": counters[0]["exchanges"],
            "exchange_blocked_fraction": max(e["blocked"] for e in everyone) / max(wall_seconds, 1e-9),
            "wall_seconds": wall_seconds,
            "samples_per_s": self.step * self.model_batch * self.topo.n_models / max(wall_seconds, 1e-9),
        }
        if self.topo.rank == 0 and self.run_dir is not None:
            write_json(self.run_dir / "summary.json", summary)
        return summary


def truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


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
