"""Experiment trackers behind one interface: TensorBoard, MLflow, Weights & Biases.

metrics.jsonl (run_log.RunLog) is the source of truth; a tracker gets a copy of each finite number
logged there, at the same step. Each model's first rank opens its trackers (`open_trackers`) in its
model directory; the other ranks log nothing.

- tensorboard: event files in model_<i>/tensorboard/ (a resumed run purges what the interrupted
  run logged after its checkpoint).
- mlflow: one MLflow run per model (named `<run dir>/model_<i>`) in experiment MLFLOW_EXPERIMENT_NAME
  (default `codistill`), at MLFLOW_TRACKING_URI, or by default in a local store in the run
  directory, the SQLite file mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`). The run id is kept in
  model_<i>/mlflow_run_id, so a resumed run logs into the same MLflow run. The steps the interrupted
  run logged after its checkpoint are not sent again (RunLog keeps the last step sent in
  model_<i>/trackers_last_step): MLflow and wandb keep the first copy, which a resume at the same k
  replays bitwise; metrics.jsonl and TensorBoard keep the replay.
- wandb: one wandb run per model, under model_<i>/wandb/; offline (`wandb sync` uploads it later)
  unless the user is logged in, and WANDB_MODE overrides both.
Credentials come only from the environment (or the tools' own login files), never from the config.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Protocol

from .errors import ConfigError

EXTRA = {"mlflow": "trackers", "wandb": "trackers", "tensorboard": None}  # name -> pip extra providing it
MODULE = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}


class Tracker(Protocol):
    keeps_every_point: bool  # True: a point sent twice for one step shows twice (MLflow, wandb)

    def log(self, step: int, metrics: dict[str, float]) -> None: ...  # finite numbers only
    def close(self) -> None: ...


def check_trackers(names: list[str]) -> None:
    """ConfigError for an unknown tracker or one whose package is not installed (at config load)."""
    for name in names:
        if name not in MODULE:
            raise ConfigError(f"train.trackers: unknown tracker {name!r}; allowed: {', '.join(MODULE)}")
        if importlib.util.find_spec(MODULE[name]) is None:
            extra = EXTRA[name]
            how = f"pip install 'codistill[{extra}]'" if extra else f"pip install {MODULE[name]}"
            raise ConfigError(f"train.trackers lists {name}, which is not installed; {how}")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.trackers lists a tracker twice: {names}")


def open_trackers(names: list[str], directory: Path, *, run_dir: Path, run_name: str, config: dict,
                  resumed_at: int | None) -> list[Tracker]:
    """The trackers `names` for one model's log in `directory` (model_<i>/ of `run_dir`)."""
    makers = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
    return [makers[n](directory, run_dir=run_dir, run_name=run_name, config=config, resumed_at=resumed_at)
            for n in names]


def prepare_trackers(names: list[str], run_dir: Path) -> None:
    """Once per run, before the workers start: create the MLflow experiment, so the models' first
    ranks do not race to create it."""
    if "mlflow" in names:
        _mlflow_experiment(_mlflow_client(run_dir))


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1} (the config as tracker parameters)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix == "":
            flat.update(flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics line (bools, None, strings and NaN/inf are left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    keeps_every_point = False  # a resumed writer purges the steps after the checkpoint

    def __init__(self, directory: Path, *, resumed_at: int | None, **_):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def _mlflow_client(run_dir: Path):
    import logging

    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # their INFO lines (creating the store's tables) are not ours to print
        logging.getLogger(name).setLevel(logging.WARNING)

    # MLflow 3 keeps its ./mlruns file store in maintenance mode: a local SQLite file is its own default.
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri)


def _mlflow_experiment(client) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "codistill")
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


class MLflowTracker:
    keeps_every_point = True

    def __init__(self, directory: Path, *, run_dir: Path, run_name: str, config: dict, resumed_at: int | None):
        from mlflow.entities import Param

        self.client = _mlflow_client(run_dir)
        id_file = directory / "mlflow_run_id"
        if resumed_at is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(_mlflow_experiment(self.client), run_name=run_name)
        self.run_id = run.info.run_id
        from .files import atomic_write_text

        atomic_write_text(id_file, self.run_id + "\n")
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def wandb_mode() -> str | None:
    """None when WANDB_MODE decides (wandb reads it), else online only when logged in."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import wandb

    try:
        return "online" if wandb.login(prompt=False, verify=False) else "offline"
    except Exception:  # noqa: BLE001 - any failure to find a login means: offline
        return "offline"


class WandbTracker:
    keeps_every_point = True

    def __init__(self, directory: Path, *, run_name: str, config: dict, resumed_at: int | None, **_):
        import wandb

        id_file = directory / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
        (directory / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "codistill"), name=run_name,
                              dir=str(directory), config=config, mode=wandb_mode(), id=run_id,
                              resume="allow" if run_id else None, reinit="create_new",
                              # no console capture, system stats or code snapshot: metrics only
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                                      save_code=False, disable_git=True))
        if run_id is None:
            from .files import atomic_write_text

            atomic_write_text(id_file, self.run.id + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
