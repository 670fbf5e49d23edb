"""Compare finished runs: a table (terminal and markdown) and side-by-side plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from raflora.plots import plot_partition_energy, plot_series

COLUMNS = (
    ("final_accuracy", "final acc", ".3f"),
    ("best_accuracy", "best acc", ".3f"),
    ("top_rmin_energy", "top-r_min energy", ".3f"),
    ("effective_rank", "eff. rank", ".2f"),
    ("norm", "‖ΔW‖_F", ".3f"),
    ("bytes_per_round", "bytes/round", ",.0f"),
    ("wall_seconds", "wall s", ".0f"),
)


def load_run(run_dir: Path) -> dict[str, Any]:
    """``run.json`` plus the per-round history of a finished run."""
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / "run.json", run_dir / "metrics.json"
    if not summary_path.is_file() or not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a finished run (needs run.json and metrics.json)")
    run = json.loads(summary_path.read_text())
    run["history"] = json.loads(metrics_path.read_text())
    run["dir"] = str(run_dir)
    return run


def _cell(value: Any, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def label_of(run: dict[str, Any]) -> str:
    return run.get("label") or run["name"]


def comparison_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="runs compared")
    table.add_column("run")
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="right")
    for run in runs:
        table.add_row(label_of(run), *(_cell(run.get(key), fmt) for key, _, fmt in COLUMNS))
    return table


def comparison_markdown(runs: list[dict[str, Any]]) -> str:
    header = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for run in runs:
        cells = [_cell(run.get(key), fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {label_of(run)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy.png (server accuracy vs round) and partition_energy.png (one panel per run)."""
    out_dir = Path(out_dir)
    paths = []
    accuracy, rounds = {}, None
    for run in runs:
        evaluated = [r for r in run["history"] if r.get("server_accuracy") is not None]
        accuracy[label_of(run)] = [r["server_accuracy"] for r in evaluated]
        rounds = [r["round"] for r in evaluated]
    if rounds:
        paths.append(
            plot_series(accuracy, out_dir / "accuracy.png", rounds=rounds, ylabel="test accuracy")
        )
    energy, bounds = {}, runs[0].get("bounds") if runs else None
    for run in runs:
        trained = [r for r in run["history"] if r["round"] > 0 and r.get("partition_energy")]
        if trained and run.get("bounds") == bounds:
            energy[label_of(run)] = [r["partition_energy"] for r in trained]
            rounds = [r["round"] for r in trained]
    if energy and bounds:
        paths.append(
            plot_partition_energy(
                energy,
                bounds,
                out_dir / "partition_energy.png",
                rounds=rounds,
                title="energy of the global update per rank partition",
            )
        )
    return paths
