"""A plain Lightning training script on scikit-learn's digits, run by tests/test_lightning.py under
torchrun (CPU, gloo). `--strategy ddp` is Lightning's DDPStrategy; `--strategy codistill` is the
same script with the three changed lines of the README's Lightning section.

Each rank writes OUT/rank{r}.json: its training losses per step, its model's final validation
accuracy, and, with codistillation, what its teachers held after each exchange compared with
the other models' weights at that step.
"""

from __future__ import annotations

import argparse
import json
import os

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from codistill.data import load_dataset, make_splits
from codistill.lightning import CodistillStrategy
from codistill.models import build_model
from codistill.topology import model_seed


class Classifier(pl.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.net = build_model("mlp", 10, (1, 8, 8), hidden=64)
        self.lr = lr
        self.losses: list[float] = []
        self.val_correct = torch.zeros(2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        logits = self(x)
        if isinstance(self.trainer.strategy, CodistillStrategy):
            loss = self.trainer.strategy.codistill_loss(logits, y, teacher_inputs=x)["total"]
        else:
            loss = F.cross_entropy(logits, y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.val_correct += torch.tensor([(self(x).argmax(-1) == y).sum().item(), len(y)])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class CheckExchange(pl.Callback):
    """At step s = T, 2T, ...: every model's weights before the exchange, then the teachers after it."""

    def __init__(self, every: int):
        self.every, self.expected, self.checks = every, None, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        s = trainer.global_step
        if s and s % self.every == 0:
            strategy = trainer.strategy
            own = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            gathered = [torch.empty_like(own) for _ in range(strategy.n_models)]
            dist.all_gather(gathered, own, group=strategy.topo.exchange_group)
            self.expected = gathered

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.expected is None:
            return
        strategy = trainer.strategy
        for j, teacher in strategy.teachers.modules.items():
            held = torch.cat([p.detach().reshape(-1) for p in teacher.parameters()])
            self.checks.append({"step": trainer.global_step - 1, "teacher": j,
                                "max_abs_diff": (held - self.expected[j]).abs().max().item(),
                                "own_diff": (held - self.expected[strategy.model_index]).abs().max().item()})
        self.expected = None


class SeededDDP(DDPStrategy):
    """Lightning's DDP with the sampler seed given, as CodistillStrategy gives it (Lightning's own
    comes from seed_everything, which takes 32 bits), and the RNG seeded with it at setup."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def setup_distributed(self) -> None:
        super().setup_distributed()
        torch.manual_seed(self.seed)

    @property
    def distributed_sampler_kwargs(self) -> dict:
        return {**super().distributed_sampler_kwargs, "seed": self.seed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=("ddp", "codistill"), required=True)
    p.add_argument("--n-models", type=int, default=2)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    sp = make_splits(load_dataset("digits"), val_fraction=0.2)
    train = TensorDataset(*[torch.stack(t) for t in zip(*(sp.train[int(i)] for i in sp.train_indices))])
    val = TensorDataset(*[torch.stack(t) for t in zip(*(sp.val[int(i)] for i in sp.val_indices))])
    train.tensors = (train.tensors[0], train.tensors[1].long())
    val.tensors = (val.tensors[0], val.tensors[1].long())

    model = Classifier(lr=0.05)
    world = int(os.environ["WORLD_SIZE"])
    callbacks = []
    if args.strategy == "codistill":
        strategy = CodistillStrategy(n_models=args.n_models, every=args.every)
        callbacks.append(CheckExchange(args.every))
    else:
        # What CodistillStrategy does for model 0: its own seed (codistill.seeds, not the run's seed
        # itself) for the sampler's shuffle and the RNG from setup on.
        strategy = SeededDDP(model_seed(args.seed, 0))
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=args.steps,
                         callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
                         val_check_interval=args.steps, deterministic=True)
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=64))
    correct, count = model.val_correct.tolist()
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": model.losses, "val_correct": correct, "val_count": count,
                   "checks": callbacks[0].checks if callbacks else [],
                   "model_index": strategy.model_index if callbacks else 0}, f)


if __name__ == "__main__":
    main()
