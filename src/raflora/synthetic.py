"""Synthetic federated low-rank regression that shows rank collapse in seconds.

Task: a target update W* (m, n) of rank r* with a chosen spectrum. Client k of LoRA rank r_k
sees inputs x ~ N(0, Σ_k) (non-IID: each Σ_k stresses its own random input directions, so
each client sees W* through a different lens) and minimises, by a few full-batch gradient
steps on its factors B (m, r_k), A (r_k, n),

    L_k(B, A) = ½ E‖(W_base + B A − W*) x‖² = ½ ‖(W_base + B A − W*) Σ_k^{1/2}‖_F².

Each round the server aggregates the sampled clients with one registered method into global
factors (B_g, A_g) and allocates every client its rank by truncated SVD
(``allocate(B_g, A_g, ranks)``: B = U_r S_r, A = V_rᵀ); round 1 starts from LoRA's init
(B = 0, A random). Every method gets the same targets, client sampling, initial factors,
local steps and allocation; only the aggregation differs. Methods in ``merge_methods`` (by
default ``flora``, as its paper intends) instead merge each round's aggregate into W_base, and
their clients restart from LoRA's init every round. With partial participation, raFLoRA keeps
the directions of the global update that no sampled client holds (``carry_over``), as the
federated engine does; the baselines stay as published unless ``carry_over="all"``.

The mechanism: with rank-agnostic averaging, direction i of the global update comes back only
from the clients allocated it (r_k ≥ i), so each round keeps a share c_i = Σ_{r_k ≥ i} p_k of
it and high directions decay geometrically ("rank collapse"). raFLoRA averages partition
(ρ_{j-1}, ρ_j] over the clients that hold it and keeps the full share.

Run: ``raflora synthetic --out runs/synthetic`` or ``raflora.synthetic.run(SyntheticConfig())``.
Outputs: results.json (method → per-round metrics), run.json (config, versions, target, notes),
metrics.csv (long format), plots/partition_energy.png and plots/rel_error.png.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.math import aggregate, available_methods, factored_svd, partition_bounds, truncate
from raflora.math.diagnostics import (
    effective_rank,
    partition_energy,
    predicted_retention,
    top_energy,
)
from raflora.plots import plot_partition_energy, plot_series

log = logging.getLogger(__name__)

SPECTRA = ("flat", "linear", "geometric")
CARRY_OVER = ("raflora", "all", "none")
Factors = tuple[Tensor, Tensor]  # (m, r), (r, n), float64


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic experiment's settings; every field is validated on construction."""

    m: int = 64  # rows of the target update W* (output size of the adapted layer)
    n: int = 64  # columns of W* (input size)
    target_rank: int = 16  # rank r* of W*
    spectrum: str = "linear"  # singular values of W*: "flat", "linear" or "geometric" from 1
    decay: float = 0.5  # σ_{r*} / σ_1 for "linear" and "geometric" (ignored for "flat")
    ranks: tuple[int, ...] = (2, 2, 2, 2, 2, 4, 4, 8, 8, 16)  # LoRA rank of each client
    sizes: tuple[float, ...] | None = None  # data size (aggregation weight) per client; None: equal
    non_iid: float = 0.5  # log-std of each client's input-covariance eigenvalues; 0 = IID
    rounds: int = 40  # federated rounds
    local_steps: int = 10  # full-batch gradient steps per client per round
    lr: float = 0.1  # local learning rate
    fraction: float = 1.0  # share of clients sampled each round (at least one)
    methods: tuple[str, ...] = ()  # methods to compare; empty = all registered
    carry_over: str = "raflora"  # who keeps the global directions (top sampled rank, r_max]
    # when no sampled client holds them (partial participation): "raflora", "all" or "none"
    merge_methods: tuple[str, ...] = ("flora",)  # merged into the base each round (FLoRA style)
    seed: int = 0  # seeds the target, client data, sampling and LoRA inits

    def __post_init__(self) -> None:
        for name in ("ranks", "methods", "merge_methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(float(s) for s in self.sizes))
        for name in ("m", "n", "target_rank", "rounds", "local_steps"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        if self.target_rank > min(self.m, self.n):
            raise ValueError(f"target_rank {self.target_rank} exceeds min(m, n)")
        if not self.ranks:
            raise ValueError("ranks must list at least one client rank")
        for k, r in enumerate(self.ranks):
            _check_int(f"ranks[{k}]", r, low=1, high=min(self.m, self.n))
        if self.sizes is not None and (
            len(self.sizes) != len(self.ranks) or min(self.sizes) < 0 or sum(self.sizes) <= 0
        ):
            raise ValueError("sizes must give one non-negative size per client, not all zero")
        _check_choice("spectrum", self.spectrum, SPECTRA)
        _check_choice("carry_over", self.carry_over, CARRY_OVER)
        for name, value, ok, allowed in [
            ("decay", self.decay, 0 < self.decay <= 1, "in (0, 1]"),
            ("non_iid", self.non_iid, self.non_iid >= 0, "≥ 0"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("fraction", self.fraction, 0 < self.fraction <= 1, "in (0, 1]"),
        ]:
            if not ok:
                raise ValueError(f"{name} = {value!r} must be {allowed}")
        for name in ("methods", "merge_methods"):
            for method in getattr(self, name):
                _check_choice(name, method, tuple(available_methods()))

    @property
    def client_sizes(self) -> tuple[float, ...]:
        return self.sizes if self.sizes is not None else (1.0,) * len(self.ranks)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} = {value!r} must be an integer ≥ {low}")
    if high is not None and value > high:
        raise ValueError(f"{name} = {value} must be at most {high}")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {list(allowed)}")


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Task:
    target: Tensor  # (m, n) W*
    covariances: tuple[Tensor, ...]  # per client (n, n) Σ_k, mean eigenvalue 1


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, round, client) stream."""
    return np.random.default_rng([seed, *stream])


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.diag(r))  # (rows, cols), Haar distributed


def target_singular_values(config: SyntheticConfig) -> np.ndarray:
    """σ_1 = 1 down to σ_{r*} = decay: flat, linearly or geometrically spaced."""
    r = config.target_rank
    if config.spectrum == "flat":
        return np.ones(r)
    if config.spectrum == "linear":
        return np.linspace(1.0, config.decay, r)
    return np.geomspace(1.0, config.decay, r)


def make_task(config: SyntheticConfig) -> Task:
    rng = _rng(config.seed, 0)
    sigma = target_singular_values(config)
    U = _orthonormal(rng, config.m, config.target_rank)  # (m, r*)
    V = _orthonormal(rng, config.n, config.target_rank)  # (n, r*)
    covariances = []
    for k in range(len(config.ranks)):
        crng = _rng(config.seed, 1, k)
        Q = _orthonormal(crng, config.n, config.n)  # (n, n)
        d = np.exp(config.non_iid * crng.standard_normal(config.n))
        covariances.append(torch.from_numpy((Q * (d / d.mean())) @ Q.T))  # (n, n)
    return Task(torch.from_numpy((U * sigma) @ V.T), tuple(covariances))


def lora_init(config: SyntheticConfig, rank: int, round_: int, client: int) -> Factors:
    """LoRA's initialisation: B = 0, A random with rows of norm about 1."""
    rng = _rng(config.seed, 2, round_, client)
    A = rng.standard_normal((rank, config.n)) / np.sqrt(config.n)  # (r, n)
    return torch.zeros(config.m, rank, dtype=torch.float64), torch.from_numpy(A)


def local_train(
    B: Tensor, A: Tensor, base: Tensor | float, task: Task, k: int, config: SyntheticConfig
) -> Factors:
    """Gradient descent on ½‖(base + B A − W*) Σ_k^{1/2}‖²: ∇_B = R Aᵀ, ∇_A = Bᵀ R."""
    Sigma = task.covariances[k]  # (n, n)
    offset = (base - task.target) @ Sigma  # (m, n)
    for _ in range(config.local_steps):
        R = offset + B @ (A @ Sigma)  # (m, n): (base + B A − W*) Σ_k
        B, A = B - config.lr * R @ A.mT, A - config.lr * B.mT @ R
    return B, A


# --------------------------------------------------------------------------- one method


def _client_starts(
    config: SyntheticConfig, global_: Factors | None, clients: Sequence[int], round_: int
) -> list[Factors]:
    """Allocate each client its rank from one SVD of the global update (LoRA init if absent).

    A client whose rank exceeds the global update's available rank gets the available
    directions plus LoRA-initialised extra ones (B columns 0, A rows random).
    """
    if global_ is None:
        return [lora_init(config, config.ranks[k], round_, k) for k in clients]
    U, S, Vt = factored_svd(*global_)
    starts = []
    for k in clients:
        r = config.ranks[k]
        B, A = truncate(U, S, Vt, min(r, len(S)))
        if r > len(S):
            B0, A0 = lora_init(config, r - len(S), round_, k)
            B, A = torch.cat([B, B0], dim=1), torch.cat([A, A0], dim=0)
        starts.append((B, A))
    return starts


def _carried(global_: Factors | None, top: int, r_max: int) -> Factors | None:
    """Directions (top, r_max] of the previous global update, kept when no client held them."""
    if global_ is None or top >= r_max:
        return None
    U, S, Vt = factored_svd(*global_)
    hi = min(r_max, len(S))
    if hi <= top:
        return None
    return U[:, top:hi] * S[top:hi], Vt[top:hi]  # (m, d), (d, n)


def _concat(*parts: Factors | None) -> Factors:
    present = [p for p in parts if p is not None]
    return torch.cat([p[0] for p in present], dim=1), torch.cat([p[1] for p in present], dim=0)


def _compress(g: Factors) -> Factors:
    """Exact re-factorisation when the stacked rank exceeds min(m, n)."""
    k = min(g[0].shape[0], g[1].shape[1])
    if g[0].shape[1] <= k:
        return g
    U, S, Vt = factored_svd(*g)
    return truncate(U, S, Vt, k)


def sample_clients(config: SyntheticConfig, round_: int) -> list[int]:
    """The clients of one round (all of them when fraction = 1), the same for every method."""
    K = len(config.ranks)
    count = max(1, round(config.fraction * K))
    if count >= K:
        return list(range(K))
    return sorted(int(k) for k in _rng(config.seed, 3, round_).choice(K, count, replace=False))


def run_method(config: SyntheticConfig, task: Task, method: str, tick=lambda: None) -> dict:
    """All rounds of one method; per-round metrics of the global update."""
    r_min, r_max = min(config.ranks), max(config.ranks)
    bounds = partition_bounds(config.ranks)
    carry = config.carry_over == "all" or config.carry_over == method
    merge = method in config.merge_methods
    target_norm = torch.linalg.norm(task.target)
    global_: Factors | None = None
    out: dict[str, list] = {k: [] for k in ("round", "rel_error", "top_rmin_energy")}
    out.update(partition_energy=[], effective_rank=[])
    for t in range(1, config.rounds + 1):
        clients = sample_clients(config, t)
        starts = _client_starts(config, None if merge else global_, clients, t)
        base = global_[0] @ global_[1] if merge and global_ is not None else 0.0
        trained = [
            local_train(B, A, base, task, k, config)
            for k, (B, A) in zip(clients, starts, strict=True)
        ]
        new = aggregate(method, trained, [config.client_sizes[k] for k in clients])
        if merge:
            new = _concat(global_, new)
        elif carry:
            new = _concat(new, _carried(global_, max(config.ranks[k] for k in clients), r_max))
        global_ = _compress(new)
        update = global_[0] @ global_[1]  # (m, n): small enough to form here
        sigma = torch.linalg.svdvals(update)  # (min(m, n),)
        error = torch.linalg.norm(update - task.target) / target_norm
        out["round"].append(t)
        out["rel_error"].append(float(error))
        out["top_rmin_energy"].append(top_energy(sigma, r_min))
        out["partition_energy"].append(partition_energy(sigma, bounds))
        out["effective_rank"].append(effective_rank(sigma))
        tick()
    sigma_t = target_singular_values(config)
    out["target_top_rmin_energy"] = top_energy(sigma_t, r_min)
    return out


# --------------------------------------------------------------------------- the experiment


def methods_to_run(config: SyntheticConfig) -> tuple[list[str], dict[str, str]]:
    """The methods to compare and the ones skipped, with the reason."""
    requested = list(config.methods) or available_methods()
    skipped = {}
    if "fedit" in requested and len(set(config.ranks)) > 1:
        skipped["fedit"] = "fedit needs equal client ranks; these ranks differ"
    return [m for m in requested if m not in skipped], skipped


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: for 64×64 matrices extra threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        yield lambda description: lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = [*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), transient=False) as bar:
        task_id = bar.add_task("synthetic", total=total)

        def for_method(description: str):
            bar.update(task_id, description=f"synthetic: {description}")
            return lambda: bar.advance(task_id)

        yield for_method


def run(config: SyntheticConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Run every method on the same synthetic task; write outputs to ``out_dir`` if given.

    Returns ``{method: {"round", "rel_error", "top_rmin_energy", "target_top_rmin_energy",
    "partition_energy", "effective_rank"}}`` (the content of results.json).
    """
    start = time.perf_counter()
    methods, skipped = methods_to_run(config)
    for method, reason in skipped.items():
        log.warning("skipping %s: %s", method, reason)
    task = make_task(config)
    results = {}
    with _single_thread(), _progress(progress, len(methods) * config.rounds) as for_method:
        for method in methods:
            results[method] = run_method(config, task, method, for_method(method))
    if out_dir is not None:
        write_outputs(Path(out_dir), config, results, skipped, time.perf_counter() - start)
    return results


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def write_outputs(
    out_dir: Path, config: SyntheticConfig, results: dict, skipped: dict, wall_s: float
) -> None:
    """results.json, run.json, metrics.csv and plots/*.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = partition_bounds(config.ranks)
    sigma = target_singular_values(config)
    target = partition_energy(sigma, bounds)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    run_info = {
        "config": dataclasses.asdict(config),
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("raflora", "numpy", "torch")},
        },
        "methods": list(results),
        "skipped": skipped,
        "partition_bounds": bounds,
        "target": {"singular_values": sigma.tolist(), "partition_energy": target},
        "predicted_retention": predicted_retention(config.ranks, config.client_sizes),
        "notes": {
            m: "merged into the base each round; clients restart from LoRA init"
            for m in results
            if m in config.merge_methods
        },
        "wall_time_s": round(wall_s, 3),
    }
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    _write_csv(out_dir / "metrics.csv", results, bounds)
    plots = out_dir / "plots"
    energy = {m: r["partition_energy"] for m, r in results.items()}
    title = "Energy share of the global update per rank partition"
    plot_partition_energy(
        energy, bounds, plots / "partition_energy.png", target=target, title=title
    )
    errors = {m: r["rel_error"] for m, r in results.items()}
    plot_series(errors, plots / "rel_error.png", ylabel="‖ΔW − W*‖ / ‖W*‖", log=True)


def _write_csv(path: Path, results: dict, bounds: Sequence[int]) -> None:
    lows = [0, *bounds[:-1]]
    energy_cols = [f"energy_{lo + 1}-{hi}" for lo, hi in zip(lows, bounds, strict=True)]
    energy_cols.append(f"energy_gt{bounds[-1]}")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method", "round", "rel_error", "top_rmin_energy", "effective_rank", *energy_cols]
        )
        keys = ("round", "rel_error", "top_rmin_energy", "effective_rank", "partition_energy")
        for method, r in results.items():
            for *values, energy in zip(*(r[k] for k in keys), strict=True):
                writer.writerow([method, *values, *energy])


def summarize(results: dict) -> str:
    """A short table of the final round per method."""
    w = max(len("method"), *map(len, results))  # method names: column as wide as the longest
    columns = f"{'rel. error':>10} {'top-r_min energy':>17} {'target':>7} {'eff. rank':>9}"
    header = f"{'method':<{w}} {columns}"
    lines = [header, "-" * len(header)]
    for method, r in results.items():
        lines.append(
            f"{method:<{w}} {r['rel_error'][-1]:>10.4f} {r['top_rmin_energy'][-1]:>17.3f} "
            f"{r['target_top_rmin_energy']:>7.3f} {r['effective_rank'][-1]:>9.2f}"
        )
    return "\n".join(lines)
