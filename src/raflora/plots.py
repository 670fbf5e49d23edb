"""PNG plots shared by the synthetic experiment and the federated engine.

Matplotlib's object API (``Figure`` + Agg canvas) is used directly, so nothing touches pyplot's
global state or the backend setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def partition_labels(bounds: Sequence[int]) -> list[str]:
    """Legend labels of the rank partitions (ρ_{j-1}, ρ_j] and the bucket beyond ρ_M."""
    lows = [0, *bounds[:-1]]
    labels = [
        f"direction {hi}" if hi == lo + 1 else f"directions {lo + 1}–{hi}"
        for lo, hi in zip(lows, bounds, strict=True)
    ]
    return [*labels, f"beyond {bounds[-1]}"]


def round_axis(ax: Axes) -> None:
    """Label an x axis of rounds, with integer ticks only (there is no round 1.5)."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_partition_energy(
    energy: Mapping[str, Sequence[Sequence[float]]],
    bounds: Sequence[int],
    path: Path,
    rounds: Sequence[int] | None = None,
    target: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Stacked energy share per rank partition vs round, one panel per method.

    Args:
        energy: ``{method: [[share per partition (len(bounds) + 1)] per round]}``.
        bounds: partition upper bounds ρ_1 < … < ρ_M (the last bucket is "beyond ρ_M").
        path: output PNG path (parent folders are created).
        rounds: x values (default 1, 2, …).
        target: shares of the target/reference update per partition, drawn as dashed lines
            at their cumulative values (where the band edges should sit without collapse).
        title: optional figure title.
    """
    methods = list(energy)
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    labels = partition_labels(bounds)
    for ax, method in zip(axes.flat, methods, strict=False):
        shares = np.asarray(energy[method], dtype=float).reshape(-1, len(labels))  # (T, M + 1)
        x = np.arange(1, len(shares) + 1) if rounds is None else np.asarray(rounds)
        ax.stackplot(x, shares.T, labels=labels, alpha=0.85)
        if target is not None:
            for level in np.cumsum(target)[:-1]:
                ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(method)
        if x[-1] > x[0]:  # one round: matplotlib refuses equal limits, keep its default
            ax.set_xlim(x[0], x[-1])
        ax.set_ylim(0, 1)
        round_axis(ax)
        ax.set_ylabel("energy share")
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize="small")
    if title:
        fig.suptitle(title + ("  (dashed: target)" if target is not None else ""))
    return _save(fig, path)


def plot_series(
    series: Mapping[str, Sequence[float]],
    path: Path,
    rounds: Sequence[int] | None = None,
    ylabel: str = "",
    title: str | None = None,
    log: bool = False,
) -> Path:
    """One line per method of a per-round metric (e.g. relative error vs round)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method, values in series.items():
        x = np.arange(1, len(values) + 1) if rounds is None else np.asarray(rounds)
        ax.plot(x, values, label=method)
    if log:
        ax.set_yscale("log")
    round_axis(ax)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)
