"""Tasks: a dataset's registration names its task, launch asks that task to check the data, and
steps per epoch come from the sampler's arithmetic without starting a DataLoader."""

from __future__ import annotations

import pytest
import torch

from codistill import tasks
from codistill.data import DATASETS, make_splits, register_dataset
from codistill.errors import ConfigError
from codistill.topology import Grid, Topology
from mp_helpers import digits_config


class RecordingTask:
    """A third task, as a plug-in would write it: it only records what is asked of it."""

    checked: list = []

    def __init__(self, cfg, device, run_dir=None):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg, world_size):
        cls.checked.append((cfg.data.name, world_size))

    @classmethod
    def prepare(cls, cfg, run_dir):
        pass

    def build_model(self, name): ...
    def steps_per_epoch(self, topo): return 7
    def train_batches(self, topo, seed, start_step=0): ...
    def forward(self, module, batch): ...
    def evaluate(self, model, split, topo): ...


@pytest.fixture
def plugged_in():
    register_dataset("recorded", lambda root: None, task=RecordingTask)  # the one line a task writes
    RecordingTask.checked.clear()
    yield
    del DATASETS["recorded"]


def test_a_registered_task_is_selected_checked_and_sized(plugged_in):
    from codistill.launch import check_data

    cfg = digits_config(data__name="recorded")  # the config validates against the registry
    assert tasks.task_class(cfg) is RecordingTask and isinstance(tasks.make_task(cfg, "cpu"), tasks.Task)
    check_data(cfg, 4)
    assert RecordingTask.checked == [("recorded", 4)]
    assert tasks.steps_per_epoch(cfg, 4) == 7


def test_datasets_without_a_task_are_classification():
    assert DATASETS["digits"].task is None
    assert tasks.task_class(digits_config()) is tasks.ClassificationTask
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset("digits", lambda root: None)


@pytest.mark.parametrize("split,n_models,world", [("shared", 1, 4), ("shared", 2, 4), ("disjoint", 2, 2)])
def test_steps_per_epoch_starts_no_dataloader(monkeypatch, split, n_models, world):
    cfg = digits_config(data__split=split, codistill__n_models=n_models, data__batch_size=16)
    data = DATASETS["digits"].loader(None)
    train = len(make_splits(data, cfg.data.val_fraction).train_indices)
    replicas = world // n_models
    share = train if split == "shared" else len(range(0, train, n_models))  # model 0's share
    expected = share // (replicas * 16)

    def no_loader(*args, **kwargs):
        raise AssertionError("steps per epoch started a DataLoader")

    monkeypatch.setattr(tasks, "make_loader", no_loader)
    assert tasks.steps_per_epoch(cfg, world) == expected
    monkeypatch.undo()
    # The count the training batches use is the same.
    topo = Topology(Grid(world, n_models), 0, None, None)
    _, steps = tasks.make_task(cfg, torch.device("cpu")).train_batches(topo, seed=0)
    assert steps == expected


def test_a_batch_larger_than_the_data_fails_the_check_without_a_loader(monkeypatch):
    monkeypatch.setattr(tasks, "make_loader", lambda *a, **k: pytest.fail("DataLoader started"))
    with pytest.raises(ConfigError, match="data.batch_size=4096 is too large"):
        tasks.ClassificationTask.check(digits_config(data__batch_size=4096), 4)
