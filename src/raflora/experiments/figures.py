"""The suite report's plots (matplotlib's object API, nothing global, as `raflora.plots`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from raflora.plots import _save, partition_labels, plot_partition_energy, round_axis


def plot_mean_band(
    curves: Mapping[str, tuple[Sequence[int], np.ndarray]],
    path: Path,
    *,
    ylabel: str,
    title: str | None = None,
    log: bool = False,
) -> Path:
    """One line per method: the mean over seeds, with a ±1 std band when there are several.

    ``curves[method] = (rounds, values (seeds, rounds))``.
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for method, (rounds, values) in curves.items():
        mean = values.mean(axis=0)
        (line,) = ax.plot(rounds, mean, label=method, marker="o", markersize=3)
        if len(values) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    if log:
        ax.set_yscale("log")
    round_axis(ax)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def plot_energy(
    energy: Mapping[str, tuple[Sequence[int], np.ndarray]],
    bounds: Sequence[int],
    path: Path,
    title: str,
) -> Path:
    """Stacked energy share per rank partition vs round, one panel per method (seed mean)."""
    shares = {method: values.mean(axis=0) for method, (_, values) in energy.items()}
    rounds = next(iter(energy.values()))[0]
    return plot_partition_energy(shares, bounds, path, rounds=rounds, title=title)


def plot_sensitivity(
    points: Mapping[str, Mapping[str, tuple[float, float]]],
    configs: Sequence[str],
    path: Path,
    title: str,
    score: str = "final test accuracy",
) -> Path:
    """The final ``score`` (accuracy, or −loss) vs rank configuration, one line per method,
    with error bars.

    ``points[method][config] = (mean, half-width)``: the report passes the half-width of the
    95% t-interval over seeds (0 for a single seed)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(configs))
    for i, (method, by_config) in enumerate(points.items()):
        offset = (i - (len(points) - 1) / 2) * 0.04  # keep error bars apart
        xs = [x[j] + offset for j, c in enumerate(configs) if c in by_config]
        mean = [by_config[c][0] for c in configs if c in by_config]
        half = [by_config[c][1] for c in configs if c in by_config]
        ax.errorbar(xs, mean, yerr=half, label=method, marker="o", capsize=3)
    ax.set_xticks(x, list(configs))
    ax.set_xlabel("rank configuration")
    ax.set_ylabel(f"{score} (mean, 95% CI over seeds)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def plot_retention(
    measured: Mapping[str, np.ndarray],
    predicted: np.ndarray,
    bounds: Sequence[int],
    path: Path,
    title: str,
) -> Path:
    """Left: retention per direction i, measured (mean ± std over rounds and seeds) vs the
    predicted c_i. Right: per round, measured retention averaged inside each rank partition
    (solid) vs predicted (dashed), for the first method (FlexLoRA).

    ``measured[method]`` is (samples, rounds, r) — samples are seeds; ``predicted`` (rounds, r).
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    r = predicted.shape[-1]
    i = np.arange(1, r + 1)
    left.step(
        i,
        predicted.mean(axis=0),
        where="mid",
        color="black",
        linestyle="--",
        label="predicted c_i = Σ_{r_k≥i} p_k",
    )
    for method, values in measured.items():
        flat = values.reshape(-1, values.shape[-1])
        left.errorbar(
            i[: flat.shape[1]],
            flat.mean(0),
            yerr=flat.std(0),
            marker="o",
            markersize=3,
            capsize=2,
            label=f"{method} (measured)",
        )
    left.set_xlabel("direction i of the previous global update")
    left.set_ylabel("share kept by the next aggregate")
    top = max(1.25, 1.05 * max(float(v.mean(axis=(0, 1)).max()) for v in measured.values()))
    left.set_ylim(0, top)
    left.grid(alpha=0.3)
    left.legend(fontsize="small")
    first = next(iter(measured))
    values = measured[first].mean(axis=0)  # (rounds, r)
    rounds = np.arange(2, 2 + values.shape[0])
    labels = partition_labels(bounds)
    lows = [0, *bounds[:-1]]
    for (lo, hi), label in zip(zip(lows, bounds, strict=True), labels, strict=False):
        if lo >= values.shape[1]:
            break
        (line,) = right.plot(
            rounds, values[:, lo:hi].mean(1), marker="o", markersize=3, label=label
        )
        right.plot(rounds, predicted[:, lo:hi].mean(1), linestyle="--", color=line.get_color())
    round_axis(right)
    right.set_ylabel(f"{first}: share kept (dashed: predicted)")
    right.set_ylim(0, top)
    right.grid(alpha=0.3)
    right.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
