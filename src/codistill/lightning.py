"""Codistillation in a PyTorch Lightning script: a `Strategy` (pip install codistill[lightning]).

    from codistill.lightning import CodistillStrategy

    trainer = pl.Trainer(strategy=CodistillStrategy(n_models=2, every=50), devices=4, ...)

    # in training_step, instead of `loss = F.cross_entropy(logits, y)`:
    loss = self.trainer.strategy.codistill_loss(logits, y, teacher_inputs=x)["total"]

The strategy is Lightning's `DDPStrategy` on the codistillation grid. After the process group exists
it builds the grid (`topology.build_topology`): n model groups of world / n workers. It wraps the
LightningModule in DDP over its own model group only (gradients are all-reduced inside a model,
never across models), shards the data per replica with the model's seed (Lightning's
`DistributedSampler` gets `distributed_sampler_kwargs`), and hands everything codistillation adds
to the one component, `codistill.Codistillation`: the teachers (copies of the module), their
exchange every `every` optimizer steps (a hook on the optimizer), the distillation loss.

Models differ by their data order and, when built in `configure_model` or with dropout, by their
seed: after setup every rank is seeded with its model's seed (`model_seed(seed, j)`, `seed` being
the `seed_everything` seed), the same for all replicas of one model, as Lightning seeds all ranks.

DDP only: sharded model groups (`parallel='fsdp'`) need codistill's trainer or your own loop with
`Codistillation`; passing it here is an error.

Not covered: Lightning checkpoints hold the module and optimizer of global rank 0 (model 0); the
teachers are not saved, so a resumed run distills only after its next exchange.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from .accounting import CommCounter, counting_allreduce_hook
from .codistillation import Codistillation
from .topology import Topology, build_topology, model_seed


class CodistillStrategy(DDPStrategy):
    """`DDPStrategy` where the world trains `n_models` models by codistillation.

    n_models, every, alpha: n (1 is plain data parallelism), the exchange period T in optimizer
        steps, the distillation weight (a float or a function of the step).
    codistill_options: the rest of `Codistillation`'s options (loss, temperature, delay,
        teacher_mode, teacher_precision, label_smoothing, graph, peers).
    teacher_forward: forward(teacher, inputs) -> logits; default teacher(inputs), i.e. the
        LightningModule's `forward`.
    Other keyword arguments go to `DDPStrategy`.
    """

    strategy_name = "codistill"

    def __init__(self, n_models: int = 2, every: int = 50, alpha: float | Callable[[int], float] = 1.0, *,
                 codistill_options: dict | None = None, teacher_forward: Callable | None = None, **ddp_kwargs: Any):
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if (codistill_options or {}).get("parallel", "ddp") != "ddp":
            # Lightning's sharded strategies are other Strategy classes; this one is DDP's.
            raise ValueError("CodistillStrategy is DDP-only: parallel='fsdp' (sharded model groups) works in "
                             "codistill's trainer and in your own loop with codistill.Codistillation")
        if "process_group" in ddp_kwargs:
            raise ValueError("CodistillStrategy sets DDP's process_group (each model's own group)")
        super().__init__(**ddp_kwargs)
        self.n_models, self.every, self.alpha = n_models, every, alpha
        self.codistill_options = dict(codistill_options or {})
        self.teacher_forward = teacher_forward
        self.topo: Topology | None = None
        self.codist: Codistillation | None = None
        self.counter = CommCounter()
        self._attached = None

    # -- the grid, after the process group exists -------------------------------------------

    def setup_distributed(self) -> None:
        super().setup_distributed()
        world = self.world_size
        if world % self.n_models:
            raise ValueError(f"{world} processes cannot be split into n_models={self.n_models} equal model groups")
        self.topo = build_topology(self.n_models)
        torch.manual_seed(self.model_seed)  # configure_model and dropout: this model's seed

    @property
    def base_seed(self) -> int:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    @property
    def model_index(self) -> int:
        return self.topo.model_index

    @property
    def model_seed(self) -> int:
        return model_seed(self.base_seed, self.topo.model_index)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Shards over the replicas of this model only, shuffled with this model's seed."""
        return {"num_replicas": self.topo.replicas, "rank": self.topo.replica_index, "seed": self.model_seed}

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        """DDP over this model's group (not the world), counting its all-reduce bytes."""
        device_ids = self.determine_ddp_device_ids()
        ddp = DistributedDataParallel(module=model, device_ids=device_ids, process_group=self.topo.model_group,
                                      **self._ddp_kwargs)
        ddp.register_comm_hook(self.topo.model_group, counting_allreduce_hook(self.counter))
        return ddp

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.codist is not None or trainer.state.fn != "fit":
            return
        module = self.lightning_module
        own = self.topo.model_index
        # Teachers are copies of the module (their weights are replaced at every exchange).
        self.codist = Codistillation(lambda j: module if j == own else copy.deepcopy(module), self.n_models,
                                     self.every, self.alpha, seed=self.base_seed, device=self.root_device,
                                     topology=self.topo, counter=self.counter, wrap=False,
                                     **self.codistill_options)
        if len(self.optimizers) != 1:
            raise ValueError(f"CodistillStrategy needs exactly one optimizer, got {len(self.optimizers)}")
        self._attached = self.codist.attach(self.optimizers[0])  # counts steps, runs the exchange

    # -- each step ------------------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any):
        self.codist.maybe_exchange()  # before the forward: teachers for this step, state after s updates
        return super().training_step(*args, **kwargs)

    def codistill_loss(self, logits: torch.Tensor, targets: torch.Tensor, *, teacher_inputs=None,
                       teacher_logits: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"total", "task", "distill"}: the task loss plus alpha times the distillation toward the
        teachers (the same loss as `codistill train`); use ["total"] as the training loss."""
        if teacher_logits is None:
            if teacher_inputs is None:
                raise TypeError("codistill_loss needs teacher_inputs (the batch's inputs) or teacher_logits")
            teacher_logits = self.codist.teacher_logits(teacher_inputs, self.teacher_forward)
        return self.codist.loss(logits, targets, teacher_logits)

    @property
    def teachers(self):
        """The frozen copies of the other models (`codistill.exchange.Teachers`)."""
        return self.codist.teachers

    def on_exception(self, exception: BaseException) -> None:
        if self._attached is not None:  # a peer may be gone: remove the hook without waiting on it
            self._attached.handle.remove()
            self._attached = None
        super().on_exception(exception)

    def teardown(self) -> None:
        if self._attached is not None:
            self._attached.__exit__(None, None, None)  # finish a transfer in flight, remove the hook
            self._attached = None
        super().teardown()
