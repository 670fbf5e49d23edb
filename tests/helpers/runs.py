"""Run a whole federation in this process (FakeGrid) and check a run folder's outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from helpers.fakegrid import FakeGrid, task_identity
from raflora.config import Config, load_config
from raflora.federation.checkpoint import load_checkpoint
from raflora.federation.finish import finish_run
from raflora.federation.record import CSV_COLUMNS as SCALARS
from raflora.federation.server import FederatedRun

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.toml"
TIMING = {"seconds"}  # wall-clock fields: the only ones allowed to differ between equal runs


def tiny_config(model_dir: Path, *overrides: str) -> Config:
    """examples/tiny.toml on a tiny local model with a few examples (seconds per run)."""
    return load_config(
        TINY,
        [
            f"model.path={model_dir}",
            "data.train_size=120",
            "data.test_size=40",
            "model.max_length=24",
            "train.local_steps=2",
            "train.batch_size=8",
            *overrides,
        ],
    )


def run_in_process(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    grid: FakeGrid | None = None,
    finish: bool = True,
) -> dict[str, Any]:
    """What `run_federated` does, with the ClientApp served in-process instead of by Ray."""
    grid = grid or FakeGrid([{"partition-id": i} for i in range(config.clients.num_clients)])
    with task_identity():
        state = FederatedRun(config, run_dir, resume=resume).main(grid)
    summary = finish_run(config, run_dir) if finish else None
    history = json.loads((run_dir / "metrics.json").read_text())
    return {"state": state, "history": history, "summary": summary, "grid": grid}


def without_timing(value: Any) -> Any:
    """A metrics record (or history) with the wall-clock fields removed, recursively."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def is_png(path: Path) -> bool:
    from PIL import Image

    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or b"IEND" not in data[-12:]:
        return False
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size[0] > 50 and image.size[1] > 50


def check_run_outputs(run_dir: Path, rounds: int, *, adapter: bool = True) -> list[dict]:
    """Everything DESIGN.md promises in a run folder; returns metrics.json."""
    config = load_config(run_dir / "config.toml")
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in history] == list(range(rounds + 1))
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == list(range(rounds + 1))
    columns = set(rows[0])
    assert set(SCALARS) <= columns
    summary = json.loads((run_dir / "run.json").read_text())
    energy = [c for c in columns if c.startswith("energy_")]
    assert len(energy) == len(summary["bounds"]) + 1  # one per rank partition, plus the tail
    for record, row in zip(history, rows, strict=True):
        for key in ("server_accuracy", "bytes_sent", "bytes_received"):
            if record[key] is not None:
                assert float(row[key]) == float(record[key])
    for name in ("accuracy.png", "loss.png", "partition_energy.png"):
        assert is_png(run_dir / "plots" / name), name
    for r in range(1, rounds + 1):
        state, meta = load_checkpoint(run_dir / "checkpoints" / f"round_{r:03d}")
        assert state.round == r and meta["history"] == history[: r + 1]
    assert summary["rounds"] == rounds
    assert summary["final_accuracy"] == history[-1]["server_accuracy"]
    assert summary["method"] == config.federation.method
    if adapter:
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert summary["adapter_rank"] >= 1
    return history
