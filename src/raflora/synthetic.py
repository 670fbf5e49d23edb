"""Synthetic federated low-rank regression that shows rank collapse in seconds.

Task: a target update W* (m, n) of rank r* with a chosen spectrum. Client k of LoRA rank r_k
sees inputs x ~ N(0, Σ_k) (non-IID: each Σ_k stresses its own random input directions, so
each client sees W* through a different lens) and minimises, by a few full-batch gradient
steps on its factors B (m, r_k), A (r_k, n),

    L_k(B, A) = ½ E‖(W_base + B A − W*) x‖² = ½ ‖(W_base + B A − W*) Σ_k^{1/2}‖_F².

Each round the server runs the same round step as the federated engine
(:func:`raflora.math.round.aggregate_round`) with each method's own protocol: what it keeps,
what a client of rank r starts from (the best rank-r truncation, or the leading r columns of
the averaged factors; columns beyond what the server has are LoRA-initialised), whether it
merges into the base (FLoRA: clients restart from LoRA's init every round) or folds a
residual into it (FedEx-LoRA: clients train on W_base + D) and whether it carries the
directions no sampled client holds (``carry_over``: None = the method's default, on for raflora
only). Round 1 starts from LoRA's init (B = 0, A random). Every method gets the
same targets, client sampling, initial factors and local steps. Client-side hooks (HetLoRA's
regulariser and self-pruning) are not modelled here: the task compares the server protocols;
a frozen-A method (FFA-LoRA, ``Method.frozen_a``) trains B only, with every client's A the
first r_k rows of one shared draw of LoRA's init.

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

from raflora.math import available_methods, get_method, partition_bounds
from raflora.math.diagnostics import (
    effective_rank,
    partition_energy,
    predicted_retention,
    top_energy,
)
from raflora.math.round import ClientUpdate, GlobalState, RoundSettings, aggregate_round
from raflora.plots import plot_partition_energy, plot_series

log = logging.getLogger(__name__)

SPECTRA = ("flat", "linear", "geometric")
APPLY = ("adapter", "merge")
MODULE = "w"  # the synthetic task's one adapted matrix
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
    carry_over: bool | None = None  # keep the directions (top sampled rank, r_max] no sampled
    # client holds (partial participation); None: each method's default (raflora only)
    apply: str | None = None  # "adapter" | "merge" for every method; None: each method's own
    seed: int = 0  # seeds the target, client data, sampling and LoRA inits

    def __post_init__(self) -> None:
        for name in ("ranks", "methods"):
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
        if self.carry_over not in (None, True, False):
            raise ValueError(f"carry_over: {self.carry_over!r} must be true, false or unset")
        if self.apply is not None:
            _check_choice("apply", self.apply, APPLY)
        for name, value, ok, allowed in [
            ("decay", self.decay, 0 < self.decay <= 1, "in (0, 1]"),
            ("non_iid", self.non_iid, self.non_iid >= 0, "≥ 0"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("fraction", self.fraction, 0 < self.fraction <= 1, "in (0, 1]"),
        ]:
            if not ok:
                raise ValueError(f"{name} = {value!r} must be {allowed}")
        for method in self.methods:
            _check_choice("methods", method, tuple(available_methods()))

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


def frozen_a(config: SyntheticConfig, rank: int) -> Tensor:
    """The shared frozen A_0[:rank] (rank, n) of a frozen-A method (FFA-LoRA): one draw of
    LoRA's init for the largest rank, the same for every client and round."""
    rng = _rng(config.seed, 4)
    A = rng.standard_normal((max(config.ranks), config.n)) / np.sqrt(config.n)  # (r_max, n)
    return torch.from_numpy(A[:rank].copy())


def local_train(
    B: Tensor,
    A: Tensor,
    base: Tensor | float,
    task: Task,
    k: int,
    config: SyntheticConfig,
    train_a: bool = True,
) -> Factors:
    """Gradient descent on ½‖(base + B A − W*) Σ_k^{1/2}‖²: ∇_B = R Aᵀ, ∇_A = Bᵀ R (A kept
    fixed when ``train_a`` is false: frozen-A methods)."""
    Sigma = task.covariances[k]  # (n, n)
    offset = (base - task.target) @ Sigma  # (m, n)
    for _ in range(config.local_steps):
        R = offset + B @ (A @ Sigma)  # (m, n): (base + B A − W*) Σ_k
        B, A = B - config.lr * R @ A.mT, (A - config.lr * B.mT @ R) if train_a else A
    return B, A


# --------------------------------------------------------------------------- one method


def _client_start(
    config: SyntheticConfig, state: GlobalState, settings: RoundSettings, k: int, round_: int
) -> Factors:
    """Client k's start: the method's allocation of the kept update (LoRA init if absent),
    with LoRA-initialised extra directions where the update has fewer than r_k."""
    r = config.ranks[k]
    if settings.method.frozen_a:  # the received B (zero beyond it) with the shared A_0[:r]
        B = np.zeros((config.m, 0))
        if state.adapter and settings.apply == "adapter":
            B = state.client_payload(r, "us", settings.method.allocation)[MODULE][0]
        B = torch.from_numpy(np.asarray(B, np.float64))
        return torch.cat([B, torch.zeros(config.m, r - B.shape[1], dtype=B.dtype)], 1), frozen_a(
            config, r
        )
    if not state.adapter:
        return lora_init(config, r, round_, k)
    B, A = state.client_payload(r, "us", settings.method.allocation)[MODULE]
    B, A = torch.from_numpy(np.asarray(B, np.float64)), torch.from_numpy(np.asarray(A, np.float64))
    if B.shape[1] < r:
        B0, A0 = lora_init(config, r - B.shape[1], round_, k)
        B, A = torch.cat([B, B0], dim=1), torch.cat([A, A0], dim=0)
    return B, A


def _product(state: GlobalState, merged: bool = False) -> Tensor | float:
    """The global update B A (m, n) the state defines (``merged``: only the part merged into
    the base, merge mode or a method's residual), or 0 before there is one."""
    total = state.merged if merged else state.total_update()
    if not total:
        return 0.0
    B, A = total[MODULE].whole()
    return torch.from_numpy(np.asarray(B, np.float64) @ np.asarray(A, np.float64))


def sample_clients(config: SyntheticConfig, round_: int) -> list[int]:
    """The clients of one round (all of them when fraction = 1), the same for every method."""
    K = len(config.ranks)
    count = max(1, round(config.fraction * K))
    if count >= K:
        return list(range(K))
    return sorted(int(k) for k in _rng(config.seed, 3, round_).choice(K, count, replace=False))


def run_method(config: SyntheticConfig, task: Task, method: str, tick=lambda: None) -> dict:
    """All rounds of one method through the shared round step; per-round metrics."""
    r_min = min(config.ranks)
    bounds = partition_bounds(config.ranks)
    settings = RoundSettings.of(
        get_method(method),
        apply=config.apply,
        carry_over=config.carry_over,
        bounds=tuple(bounds),
        dtype=np.float64,
    )
    merge = settings.apply == "merge"
    target_norm = torch.linalg.norm(task.target)
    state = GlobalState(round=0, adapter={}, merged={}, dense={}, ranks={})
    out: dict[str, list] = {k: [] for k in ("round", "rel_error", "top_rmin_energy")}
    out.update(partition_energy=[], effective_rank=[])
    for t in range(1, config.rounds + 1):
        clients = sample_clients(config, t)
        base = _product(state, merged=True)  # W_base + D: merge mode, FedEx's residuals
        updates = []
        frozen = settings.method.frozen_a
        for k in clients:
            start = lora_init(config, config.ranks[k], t, k) if merge and not frozen else None
            B, A = start or _client_start(config, state, settings, k, t)
            B, A = local_train(B, A, base, task, k, config, train_a=not frozen)
            factors = {MODULE: (B.numpy(), A.numpy())}
            updates.append(ClientUpdate(k, config.ranks[k], config.client_sizes[k], factors))
        state, _ = aggregate_round(state, updates, settings)
        update = _product(state)  # (m, n): small enough to form here
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


def _note(config: SyntheticConfig, method: str) -> str:
    """How a method's global model differs from its adapter, for run.json ("" if it does not)."""
    if (config.apply or get_method(method).apply) == "merge":
        return "merged into the base each round; clients restart from LoRA init"
    if get_method(method).residual is not None:
        return "its residual is folded into the base each round; clients restart from its slices"
    return ""


def methods_to_run(config: SyntheticConfig) -> tuple[list[str], dict[str, str]]:
    """The methods to compare and the ones skipped, with the reason."""
    requested = list(config.methods) or available_methods()
    skipped = {}
    for name in requested:
        method = get_method(name)
        try:
            method.check_ranks(method.build_options(), config.ranks)
        except ValueError as error:
            skipped[name] = str(error)
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
        "notes": {m: note for m in results if (note := _note(config, m))},
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
