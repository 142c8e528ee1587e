"""Backend choice from the GPUs this machine has (device count mocked: runs without a GPU)."""

import pytest
import torch

from codistill.distributed import resolve_backend
from codistill.errors import UserError


def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("gpus, workers, expected", [(0, 4, "gloo"), (4, 4, "nccl"), (8, 2, "nccl"),
                                                     (2, 4, "gloo"), (1, 2, "gloo")])
def test_auto_takes_nccl_only_with_one_gpu_per_local_worker(monkeypatch, capsys, gpus, workers, expected):
    _gpus(monkeypatch, gpus)
    assert resolve_backend("auto", workers) == expected
    warned = "codistill: warning:" in capsys.readouterr().err
    assert warned == (0 < gpus < workers)  # the fallback is said, not silent


def test_explicit_nccl_with_more_workers_than_gpus_is_one_clear_error(monkeypatch):
    _gpus(monkeypatch, 2)
    with pytest.raises(UserError, match="one GPU per worker: 4 local workers, 2 GPU"):
        resolve_backend("nccl", 4)
    _gpus(monkeypatch, 0)
    with pytest.raises(UserError, match="no GPU is visible"):
        resolve_backend("nccl", 1)


def test_gloo_is_always_allowed(monkeypatch):
    _gpus(monkeypatch, 1)
    assert resolve_backend("gloo", 16) == "gloo"
