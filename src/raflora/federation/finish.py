"""After the last round: plots, the final PEFT adapter and a run summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raflora.config import Config
from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint
from raflora.federation.export import export_run
from raflora.federation.outputs import versions, write_atomic, write_plots

log = logging.getLogger("raflora")


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Last server accuracy and the best after a trained round (round 0, the untrained start,
    does not count), last diagnostics, bytes per round."""
    evaluated = [r for r in history if r.get("server_accuracy") is not None]
    trained = [r for r in history if r["round"] > 0 and not r.get("skipped")]
    last = trained[-1] if trained else {}
    return {
        "rounds": max((r["round"] for r in history), default=0),
        "final_accuracy": evaluated[-1]["server_accuracy"] if evaluated else None,
        "best_accuracy": max(
            (r["server_accuracy"] for r in evaluated if r["round"] > 0), default=None
        ),
        "final_loss": evaluated[-1]["server_loss"] if evaluated else None,
        "top_rmin_energy": last.get("top_rmin_energy"),
        "effective_rank": last.get("effective_rank"),
        "norm": last.get("norm"),
        "bytes_per_round": (
            sum(r["bytes_sent"] + r["bytes_received"] for r in trained) / len(trained)
            if trained
            else 0
        ),
        "failed_clients": sum(r.get("failed", 0) for r in history),
        "rejected_updates": sum(r.get("rejected", 0) for r in history),
        "skipped_rounds": sum(1 for r in history if r.get("skipped")),
    }


def run_problems(history: list[dict[str, Any]], min_clients: int) -> list[str]:
    """Why a run that finished is not a success, one line each: rounds skipped for fewer than
    ``min_clients`` valid replies, and clients that failed or were rejected in every round they
    were sampled in (they never contributed; the first reason is quoted)."""
    trained = [r for r in history if r["round"] > 0]
    problems = []
    skipped = [r["round"] for r in trained if r.get("skipped")]
    if skipped:
        problems.append(
            f"{len(skipped)} of {len(trained)} round(s) skipped (rounds "
            f"{', '.join(map(str, skipped))}): fewer than federation.min_clients={min_clients} "
            "valid replies; see failures and rejections in metrics.json"
        )
    outcomes: dict[str, list[str | None]] = {}  # client → per sampled round: why not, or None
    for record in trained:
        for pid in record.get("clients", []):
            outcomes.setdefault(str(pid), []).append(None)
        for kind in ("failures", "rejections"):
            for pid, reason in record.get(kind, {}).items():
                outcomes.setdefault(str(pid), []).append(reason)
    for pid, reasons in sorted(outcomes.items(), key=lambda item: int(item[0])):
        if reasons and all(reason is not None for reason in reasons):
            problems.append(
                f"client {pid} failed in every round it was sampled in ({len(reasons)}): "
                f"{' '.join(str(reasons[0]).split())[:300]}"
            )
    return problems


def finish_run(config: Config, run_dir: Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """Write plots, ``adapter/`` (full-rank global update, PEFT format) and ``run.json``."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: the run wrote no checkpoint")
    _, meta = load_checkpoint(checkpoint)
    history = meta["history"]
    write_plots(run_dir, history, meta["bounds"], config.federation.method)
    adapter_rank = None
    try:
        _, adapter_rank = export_run(run_dir, run_dir / "adapter")
    except ValueError as error:  # e.g. every round skipped: nothing to export
        log.warning("no adapter exported: %s", error)
    summary = {
        "name": config.run.name,
        "method": config.federation.method,
        "seed": config.run.seed,
        "ranks": meta["ranks"],
        "bounds": meta["bounds"],
        "adapter_rank": adapter_rank,
        "wall_seconds": wall_seconds,
        "versions": versions(),
        "config": config.to_dict(),
        **final_metrics(history),
        "problems": run_problems(history, config.federation.min_clients),
    }
    write_atomic(run_dir / "run.json", json.dumps(summary, indent=1))
    return summary
