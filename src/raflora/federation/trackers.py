"""Experiment trackers (`run.trackers`): TensorBoard, MLflow, W&B get what metrics.csv gets.

Each round the server hands every tracker the same flat record as metrics.csv's row
(:func:`tracker_metrics`: counts, losses, accuracies, collapse diagnostics, bytes, one
``energy_<partition>`` per rank partition; empty and non-numeric cells dropped) with the round
as the step, and the energy-per-partition plot so far as an image. Everything is written under
the run folder, offline:

- ``tensorboard``: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>``);
- ``mlflow``: a local file store ``<run>/mlruns``, experiment = ``run.name``
  (``mlflow ui --backend-store-uri <run>/mlruns``); a resumed run continues its MLflow run;
- ``wandb``: an offline run in ``<run>/wandb`` (``wandb sync <run>/wandb/offline-run-*``).

The packages are optional (``pip install 'raflora[track]'``); asking for a tracker whose
package is missing is a one-line `TrackerError` before the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from raflora.config import Config
from raflora.federation.outputs import csv_rows

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
IMAGE = "partition_energy"


class TrackerError(ValueError):
    """A requested tracker cannot be used (one line naming run.trackers and the fix)."""


class Tracker(Protocol):
    def log_round(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_image(self, step: int, path: Path) -> None: ...
    def close(self) -> None: ...


def metric_name(column: str) -> str:
    """A metrics.csv column as a name every tracker accepts (MLflow allows alphanumerics and
    ``_-. :/`` only): ``energy_directions_1–2`` → ``energy_directions_1-2``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", column.replace("–", "-"))


def tracker_metrics(record: dict[str, Any], bounds: list[int]) -> dict[str, float]:
    """metrics.csv's row of one round record as ``{metric_name(column): float}``, without the
    round itself, empty cells and non-finite values (``skipped`` becomes 0/1)."""
    row = csv_rows([record], bounds)[0]
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or value is None or value == "":
            continue
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[metric_name(key)] = float(value)
    return out


def check_trackers(names: list[str]) -> None:
    """Raise `TrackerError` for a requested tracker whose package is not installed."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TrackerError(
                f"run.trackers: {name!r} needs the {PACKAGES[name]} package, which is not "
                f"installed; pip install 'raflora[track]' (or {PACKAGES[name]}), or drop it"
            )


class TensorBoardTracker:
    """Scalars and the energy plot as TensorBoard event files under ``<run>/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, step: int, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(IMAGE, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """Metrics and the energy plot in a local MLflow file store ``<run>/mlruns``."""

    def __init__(self, run_dir: Path, name: str) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        saved = run_dir / "mlflow_run.json"  # a resumed run continues its MLflow run
        if saved.is_file():
            self.run_id = json.loads(saved.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            saved.write_text(json.dumps({"run_id": self.run_id}))

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_image(self, step: int, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """An offline W&B run under ``<run>/wandb`` (sync it later with ``wandb sync``)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="raflora", name=name, dir=str(run_dir), mode="offline", config=config
        )

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, step: int, path: Path) -> None:
        self.run.log({IMAGE: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers, fed one round record at a time; no-op when none is configured."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        names = list(dict.fromkeys(config.run.trackers))
        check_trackers(names)
        self.trackers: list[Tracker] = []
        for name in names:
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(run_dir))
            elif name == "mlflow":
                self.trackers.append(MLflowTracker(run_dir, config.run.name))
            else:
                self.trackers.append(WandbTracker(run_dir, config.run.name, config.to_dict()))

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_round(self, record: dict[str, Any], bounds: list[int], image: Path | None) -> None:
        """One round: its metrics.csv row, and the energy plot when one was drawn."""
        metrics = tracker_metrics(record, bounds)
        for tracker in self.trackers:
            tracker.log_round(int(record["round"]), metrics)
            if image is not None and image.is_file():
                tracker.log_image(int(record["round"]), image)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
