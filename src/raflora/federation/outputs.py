"""A run's files: resolved config, per-round metrics (JSON + CSV), run info, PNG plots."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

from raflora.config import Config
from raflora.federation.record import CSV_COLUMNS
from raflora.plots import partition_labels, plot_partition_energy, plot_series


def versions() -> dict[str, str]:
    """Versions of the pieces that decide the numbers."""
    import flwr
    import numpy
    import peft
    import torch
    import transformers

    import raflora

    return {
        "raflora": raflora.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "flwr": flwr.__version__,
        "platform": platform.platform(),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(run_dir: Path, config: Config) -> None:
    write_atomic(run_dir / "config.toml", config.to_toml())


def csv_rows(history: list[dict[str, Any]], bounds: list[int]) -> list[dict[str, Any]]:
    """One flat row per round: the scalars plus one column per rank partition's energy."""
    labels = [f"energy_{label.replace(' ', '_')}" for label in partition_labels(bounds)]
    rows = []
    for record in history:
        row = {key: record.get(key, "") for key in CSV_COLUMNS}
        for label, share in zip(labels, record.get("partition_energy") or [], strict=False):
            row[label] = share
        rows.append(row)
    return rows


def write_metrics(run_dir: Path, history: list[dict[str, Any]], bounds: list[int]) -> None:
    write_atomic(run_dir / "metrics.json", json.dumps(history, indent=1))
    rows = csv_rows(history, bounds)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(run_dir / "metrics.csv", buffer.getvalue())


def write_plots(run_dir: Path, history: list[dict[str, Any]], bounds: list[int], name: str):
    """accuracy.png, loss.png and partition_energy.png under ``<run>/plots``."""
    plots = run_dir / "plots"
    evaluated = [r for r in history if r.get("server_accuracy") is not None]
    if evaluated:
        rounds = [r["round"] for r in evaluated]
        plot_series(
            {name: [r["server_accuracy"] for r in evaluated]},
            plots / "accuracy.png",
            rounds=rounds,
            ylabel="server test accuracy",
        )
    trained = [r for r in history if r["round"] > 0 and not r.get("skipped")]
    if trained:
        rounds = [r["round"] for r in trained]
        loss = {"train (clients)": [r["train_loss"] for r in trained]}
        if all(r.get("server_loss") is not None for r in trained):
            loss["test (server)"] = [r["server_loss"] for r in trained]
        plot_series(loss, plots / "loss.png", rounds=rounds, ylabel="loss")
        plot_partition_energy(
            {name: [r["partition_energy"] for r in trained]},
            bounds,
            plots / "partition_energy.png",
            rounds=rounds,
            title="energy of the global update per rank partition",
        )
