"""Read a suite's finished runs and reduce them to what the report shows.

Diagnostics are re-binned with the rank partitions of the *setting* a run is compared in (its
rank configuration), not the run's own: the homogeneous reference fedit@r_max has one
partition of its own, but in the table of the uniform {2, 4, 8, 16} configuration its
top-r_min energy is the share of its top 2 directions, like everybody else's. Each round
record holds, per module, the normalised energies σ_i²/Σσ² of the global update
(``energy_spectrum``); shares are averaged over modules, as the engine does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raflora.experiments.suite import Cell, Plan, SuiteError

METRICS = (
    "final_accuracy",
    "best_accuracy",
    "top_rmin_energy",
    "effective_rank",
    "norm",
    "bytes_per_round",
    "wall_seconds",
)


@dataclass
class RunResult:
    run_id: str
    summary: dict[str, Any]  # run.json
    history: list[dict[str, Any]]  # metrics.json

    @property
    def trained(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r["round"] > 0 and not r.get("skipped")]

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r.get("server_accuracy") is not None]


def load_results(plan: Plan, runs_dir: Path) -> dict[str, RunResult]:
    """The finished runs of the plan (unfinished or failed ones are absent)."""
    from raflora.report import load_run

    results = {}
    for run_id in plan.configs:
        try:
            run = load_run(Path(runs_dir) / run_id)
        except FileNotFoundError:
            continue
        history = run.pop("history")
        results[run_id] = RunResult(run_id, run, history)
    return results


def bounds_of(ranks: Sequence[int]) -> list[int]:
    return sorted(set(ranks))


def rebin(spectrum: Sequence[float], bounds: Sequence[int]) -> list[float]:
    """Energy shares per partition (ρ_{j-1}, ρ_j], then beyond ρ_M, from σ_i²/Σσ²."""
    e = np.asarray(spectrum, dtype=np.float64)
    lows = [0, *bounds[:-1]]
    shares = [float(e[lo:hi].sum()) for lo, hi in zip(lows, bounds, strict=True)]
    beyond = max(0.0, 1.0 - sum(shares)) if e.sum() > 0 else 0.0
    return [*shares, beyond]


def partition_energy(record: dict[str, Any], bounds: Sequence[int]) -> list[float] | None:
    """Mean over modules of the energy per partition of ``bounds`` in one round record."""
    modules = list((record.get("per_module") or {}).values())
    if modules and all("energy_spectrum" in m for m in modules):
        return [
            float(x) for x in np.mean([rebin(m["energy_spectrum"], bounds) for m in modules], 0)
        ]
    return None


def retention_series(result: RunResult) -> tuple[np.ndarray, np.ndarray] | None:
    """(measured (T, r), predicted (T, r)) retention per round and direction, over modules.

    Rounds without a measurement (the first, merge mode) are left out.
    """
    measured, predicted = [], []
    for record in result.trained:
        modules = [
            m["retention"] for m in (record.get("per_module") or {}).values() if "retention" in m
        ]
        c = record.get("predicted_retention")
        if not modules or not c:
            continue
        width = min(len(c), min(len(m) for m in modules))
        measured.append(np.mean([m[:width] for m in modules], axis=0))
        predicted.append(np.asarray(c[:width]))
    if not measured:
        return None
    width = min(len(m) for m in measured)
    return np.array([m[:width] for m in measured]), np.array([p[:width] for p in predicted])


def task_accuracies(result: RunResult) -> dict[str, float]:
    """Per-task accuracy at the last evaluation (multiple-choice mixtures)."""
    if not result.evaluated:
        return {}
    metrics = result.evaluated[-1].get("server_metrics") or {}
    return {
        key.split("/", 1)[1]: float(value)
        for key, value in metrics.items()
        if key.startswith("accuracy/") and isinstance(value, (int, float))
    }


def score(summary: dict[str, Any], metric: str = "accuracy") -> float | None:
    """The number the statistics compare, higher is better: the final test accuracy, or minus
    the final test loss (``metric = "loss"``)."""
    if metric == "accuracy":
        return summary.get("final_accuracy")
    loss = summary.get("final_loss")
    return None if loss is None else -float(loss)


def run_metrics(
    result: RunResult, bounds: Sequence[int], metric: str = "accuracy"
) -> dict[str, Any]:
    """The table's numbers for one run, with top-r_min energy for the setting's ``bounds``, and
    its ``score`` (`score`)."""
    s = result.summary
    out = {key: s.get(key) for key in METRICS}
    out["score"] = score(s, metric)
    # every round once, also when the run was interrupted and resumed (run.json's wall time
    # covers the last attempt only); model loading and start-up are not included
    seconds = [r.get("seconds") for r in result.history if r["round"] > 0]
    if seconds and all(isinstance(x, (int, float)) for x in seconds):
        out["wall_seconds"] = float(sum(seconds))
    if result.trained:
        shares = partition_energy(result.trained[-1], bounds)
        if shares is not None:
            out["top_rmin_energy"] = shares[0]
    out["tasks"] = task_accuracies(result)
    return out


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample std (0 for one value), n) of the values that are numbers."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return None
    std = float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0
    return float(np.mean(clean)), std, len(clean)


def series(
    results: Sequence[RunResult], value: Any, *, evaluated: bool = False
) -> tuple[list[int], np.ndarray] | None:
    """Rounds and a (seeds, rounds, ...) array of ``value(record)`` over the rounds that every
    run has (evaluated rounds for accuracy, trained rounds otherwise)."""
    rows = []
    for result in results:
        records = result.evaluated if evaluated else result.trained
        rows.append({r["round"]: value(r) for r in records if value(r) is not None})
    if not rows:
        return None
    rounds = sorted(set.intersection(*(set(r) for r in rows)))
    if not rounds:
        return None
    return rounds, np.array([[row[t] for t in rounds] for row in rows], dtype=np.float64)


def group_cells(plan: Plan, grid: str | None = None) -> dict[tuple, dict[str, list[Cell]]]:
    """{setting: {method label: [cells over seeds]}} of one grid (or of all grids, where a run
    shared by several grids counts once), in the order the grids list them."""
    out: dict[tuple, dict[str, list[Cell]]] = {}
    for cell in plan.cells:
        if grid is None or cell.grid == grid:
            cells = out.setdefault(cell.setting, {}).setdefault(cell.method, [])
            if all(c.run_id != cell.run_id for c in cells):
                cells.append(cell)
    return out


SeedMetrics = dict[tuple, dict[str, dict[int, dict[str, Any]]]]


def seed_metrics(plan: Plan, results: dict[str, RunResult], grid: str | None = None) -> SeedMetrics:
    """``{setting: {method label: {seed: run_metrics}}}`` of the finished runs of one grid (or
    all grids): what the paired statistics work on. A seed's metrics use the setting's rank
    partitions (`run_metrics`), so a shared fedit@r_max run is re-binned per setting."""
    out: SeedMetrics = {}
    for setting, by_method in group_cells(plan, grid).items():
        bounds = bounds_of(plan.suite.rank_configs[setting[0]])
        for method, cells in by_method.items():
            seeds = out.setdefault(setting, {}).setdefault(method, {})
            runs: dict[int, str] = {}
            for cell in cells:
                if runs.setdefault(cell.seed, cell.run_id) != cell.run_id:
                    raise SuiteError(
                        f"grids put two different runs ({runs[cell.seed]}, {cell.run_id}) in "
                        f"one table cell ({method}, {cell.rank_config}, seed {cell.seed}): give "
                        f"the grids different rank-configuration names, α or fractions"
                    )
                if cell.run_id in results:
                    seeds[cell.seed] = run_metrics(
                        results[cell.run_id], bounds, plan.suite.suite.metric
                    )
    return out
