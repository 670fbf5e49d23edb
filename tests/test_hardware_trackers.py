"""`run.trackers`: TensorBoard and MLflow receive metrics.csv's rows and the energy plot (read
back from the event files and the local MLflow store); a missing package is one line."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from helpers.runs import run_in_process, tiny_config
from raflora.config import load_config
from raflora.federation.preflight import RunSetupError, check_run
from raflora.federation.trackers import metric_name, tracker_metrics

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_tracker_record_is_the_csv_row() -> None:
    record = {
        "round": 3,
        "sampled": 4,
        "skipped": False,
        "train_loss": 0.5,
        "server_accuracy": None,
        "norm": float("nan"),
        "partition_energy": [0.5, 0.3, 0.2, 0.0],
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "per_module": {"q": {}},
    }
    metrics = tracker_metrics(record, [2, 4, 8])
    assert metrics == {
        "sampled": 4.0,
        "skipped": 0.0,
        "train_loss": 0.5,
        "energy_directions_1-2": 0.5,
        "energy_directions_3-4": 0.3,
        "energy_directions_5-8": 0.2,
        "energy_beyond_8": 0.0,
        "bytes_sent": 1000.0,
        "bytes_received": 2000.0,
    }


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_missing_tracker_package_is_one_line(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *a: None if module == name else real(module)
    )
    config = load_config(None, [f'run.trackers=["{name}"]'])
    with pytest.raises(RunSetupError) as error:
        check_run(config, tmp_path)
    message = str(error.value)
    assert message.startswith(f"run.trackers: {name!r} needs the {name} package")
    assert "pip install 'raflora[track]'" in message and "\n" not in message


def test_unknown_tracker_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"run\.trackers\.0"):
        load_config(None, ['run.trackers=["neptune"]'])


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_tensorboard_and_mlflow_read_back(tiny_bert_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; CI installs it")
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra; CI installs it")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tiny_bert_dir, 'run.trackers=["tensorboard", "mlflow"]')
    run_dir = tmp_path / "run"
    run_in_process(config, run_dir, finish=False)
    rows = _csv(run_dir)
    keys = ["train_loss", "server_accuracy", "top_rmin_energy", "effective_rank", "bytes_sent"]
    energy = [key for key in rows[-1] if key.startswith("energy_")]
    assert energy

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for key in [*keys, *energy]:
        expected = {int(r["round"]): float(r[key]) for r in rows if r[key] not in ("", "None")}
        got = {event.step: event.value for event in events.Scalars(metric_name(key))}
        assert got == pytest.approx(expected, rel=1e-6), key
    images = events.Images("partition_energy")
    assert [image.step for image in images] == [1, 2]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")

    store = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in store.search_experiments() if e.name == config.run.name]
    (run,) = store.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    for key in [*keys, *energy]:
        expected = {int(r["round"]): float(r[key]) for r in rows if r[key] not in ("", "None")}
        history = store.get_metric_history(run.info.run_id, metric_name(key))
        got = {m.step: m.value for m in history}
        assert got == pytest.approx(expected, rel=1e-6), key
    artifacts = [a.path for a in store.list_artifacts(run.info.run_id, "plots")]
    assert artifacts == ["plots/partition_energy.png"]
