"""What the trainer reports about itself: the summary's staleness as the log's, and no DataLoader
workers started before training (steps per epoch is arithmetic)."""

from __future__ import annotations

import pytest
import torch

from mp_helpers import digits_config, run_workers

pytestmark = pytest.mark.timeout(300)


def _train(rank: int, world: int) -> dict:
    import multiprocessing

    from torch.utils.data import dataloader

    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    multiprocessing.set_start_method("fork", force=True)  # DataLoader workers start at once
    started = []
    original = dataloader._MultiProcessingDataLoaderIter.__init__

    def counting(self, loader):
        started.append(loader.num_workers)
        original(self, loader)

    dataloader._MultiProcessingDataLoaderIter.__init__ = counting
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=4, train__steps=10,
                        train__eval_every=100, data__num_workers=2)
    trainer = Trainer(cfg, DistContext(rank, world, rank, "gloo", torch.device("cpu")))
    workers_at_init = len(started)
    summary = trainer.fit()
    return {"workers_at_init": workers_at_init, "workers_in_fit": len(started) - workers_at_init,
            "final_staleness": summary["final_staleness"], "logged_staleness": trainer.last_train["staleness"],
            "teacher_step": summary["teacher_steps"][1 - rank]}


def test_summary_staleness_is_the_logs_and_no_workers_start_before_training(tmp_path):
    for r in run_workers(_train, 2, tmp_path):
        assert r["workers_at_init"] == 0  # was a whole DataLoader iterator, to read steps_per_epoch
        assert r["workers_in_fit"] >= 1  # training (and evaluation) do start them
        # Exchanges at steps 0, 4, 8: the last step (index 9) used the teacher of step 8.
        assert r["teacher_step"] == 8
        assert r["final_staleness"] == r["logged_staleness"] == 9 - 8
