"""The server's round step of a heterogeneous-rank LoRA federation, independent of Flower.

:func:`aggregate_round` is the one round step (aggregate with the run's method, keep, carry
over, diagnostics) used by the Flower strategy, the synthetic task and the benchmarks. It runs
module by module (:func:`aggregate_streamed`): given a :class:`ModuleSource` that loads every
client's factors of one module at a time (replies in memory, or spooled to disk by the
federation layer), only that module's factors, stack and decomposition are in memory besides
the kept state; with ``RoundSettings.keep = "leading"`` an SVD-allocated update is kept as its
first r_cap triplets only (:func:`_kept`), so that state is bounded too.

Per target module the server keeps an update ``ΔW`` (m×n, never formed) as factors with its
leading thin SVD. What a client of rank ``r`` starts from is the method's ``allocation``:
``"svd"``, the best rank-r truncation ``B_r = U_r S_r``, ``A_r = V_rᵀ`` (split "us", FlexLoRA)
or ``U_r √S_r``, ``√S_r V_rᵀ`` (split "sqrt"); or ``"slice"``, the leading columns of the kept
factors ``B[:, :r]``, ``A[:r, :]`` (factor-averaging methods: FedIT, zero-padding, HetLoRA,
RB-LoRA keep the averaged padded factors B̄ (m, r_max), Ā (r_max, n)). Two forms:

- :class:`StackedUpdate` (adapter mode): the round's global factors ``B (m, R)``, ``A (R, n)``
  (stacked, ``R ≤ Σ_k r_k``, or averaged padded factors, ``R = r_max``; + the carried tail),
  whose product is the update, plus its first
  ``t = r_cap`` singular triplets and every significant singular value, all from one R×R
  eigendecomposition (:func:`decompose`, `leading_svd`): the cost of FlexLoRA's allocation.
- :class:`SVDUpdate` (merge mode, whose merged sum keeps growing, and checkpoints of earlier
  versions): the thin SVD of every significant direction, ``U (m, k)``, ``S (k,)``,
  ``Vt (k, n)`` (:func:`compress`).

Two ways to apply the aggregate of a round (DESIGN.md):
- adapter mode (FlexLoRA): the aggregate *is* the new global update; clients start from its
  rank-r_k truncation.
- merge mode (FLoRA): the aggregate is added to the accumulated update merged into the base
  weights, ``D_t = D_{t-1} + ΔW_t``; clients start each round from a fresh LoRA.

A method with a ``residual`` (FedEx-LoRA) does both: its aggregate is the adapter and the
residual is merged, ``D_t = D_{t-1} + residual_t``; the global model is ``W + D_t + B A``.
Whatever a round merges is also kept as that round's own factors (``GlobalState.
merged_rounds``): what a client that has merged the earlier rounds needs to catch up.

Carry-over (adapter mode): when the largest sampled rank ``r_s`` is below the largest rank in
the federation ``r_cap``, directions ``(r_s, r_cap]`` of the previous global update are trained
by nobody this round. With carry-over they are kept unchanged, ``ΔW_t = agg_t + U_{(r_s,r_cap]}
S V_{(r_s,r_cap]}ᵀ`` (slice allocation: the kept factors' columns ``(r_s, r_cap]``): the
natural extension of "a partition is averaged over the clients that
cover it" (here: none, so it keeps its value). Without it they vanish, as in the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from raflora.math._arrays import validate_factors
from raflora.math.device import on_device, on_host
from raflora.math.diagnostics import (
    effective_rank,
    partition_energy,
    predicted_retention,
    stable_rank,
    top_energy,
)
from raflora.math.lowrank import factored_norm, leading_svd, significant_svd, significant_values
from raflora.math.methods import Method

Factors = tuple[np.ndarray, np.ndarray]  # (B (m, r), A (r, n)), LoRA scaling folded in
KEEP = ("all", "leading")  # what the server keeps of an SVD-allocated round update


class _Triplets:
    """What both forms share: every significant singular value ``S (k,)`` and the first t
    triplets ``U (m, t)``, ``Vt (t, n)`` (t = k for a thin SVD of every direction)."""

    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray

    @property
    def rank(self) -> int:
        """How many significant directions the update has (k)."""
        return int(self.S.shape[0])

    @property
    def leading(self) -> int:
        """How many singular triplets are stored (t)."""
        return int(self.U.shape[1])

    @property
    def norm(self) -> float:
        return float(np.sqrt(np.sum(self.S.astype(np.float64) ** 2)))

    def _leading_factors(self, r: int, split: str) -> Factors:
        """Rank-r factors (r ≤ t): (U_r S_r, V_rᵀ) or (U_r √S_r, √S_r V_rᵀ)."""
        U, S, Vt = self.U[:, :r], self.S[:r], self.Vt[:r]
        if split == "us":
            return U * S, Vt.copy()
        root = np.sqrt(S)
        return U * root, root[:, None] * Vt

    def tail(self, start: int, stop: int) -> Factors:
        """Directions ``(start, stop]`` (1-based, inclusive) as factors ``(U S, Vt)``; they
        must lie within the stored triplets (stop ≤ t, or the update has no more)."""
        if min(stop, self.rank) > self.leading:
            raise ValueError(
                f"directions up to {stop} requested, only {self.leading} singular triplets "
                "are stored (decompose with a larger `top`)"
            )
        return self.U[:, start:stop] * self.S[start:stop], self.Vt[start:stop].copy()


@dataclass(frozen=True)
class SVDUpdate(_Triplets):
    """``U diag(S) Vt`` of one module's update; ``U (m, k)``, ``S (k,)``, ``Vt (k, n)``."""

    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray

    def factors(self, rank: int | None = None, split: str = "us") -> Factors:
        """Best rank-`rank` factors (Eckart–Young): a slice of the stored SVD."""
        return self._leading_factors(self.rank if rank is None else min(rank, self.rank), split)

    def whole(self) -> Factors:
        """Factors whose product is the whole update: ``(U S, Vt)``, k columns."""
        return self.factors()


@dataclass(frozen=True)
class StackedUpdate(_Triplets):
    """One module's update kept as factors ``ΔW = B A``, ``B (m, R)``, ``A (R, n)`` (the
    round's stacked aggregate), with its first t singular triplets ``U (m, t)``, ``S[:t]``,
    ``Vt (t, n)`` and all k significant singular values ``S (k,)``, t ≤ k ≤ R.

    Payloads, the carried tail and retention read the leading triplets, evaluation the whole
    product, diagnostics the spectrum; a truncation beyond t (an export at a rank above the
    federation's largest) decomposes ``B A`` once more (:func:`compress`)."""

    B: np.ndarray
    A: np.ndarray
    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray

    def factors(self, rank: int | None = None, split: str = "us") -> Factors:
        """Best rank-`rank` factors (Eckart–Young): a slice of the leading triplets, or for a
        rank above t, of a new thin SVD of ``B A``."""
        r = self.rank if rank is None else min(rank, self.rank)
        if r <= self.leading:
            return self._leading_factors(r, split)
        return compress(self.B, self.A).factors(r, split)

    def whole(self) -> Factors:
        """Factors whose product is the whole update: ``(B, A)``, R columns."""
        return self.B, self.A

    def columns(self, start: int, stop: int) -> Factors:
        """The kept factors' columns ``(start, stop]``: ``B[:, start:stop]``, ``A[start:stop]``
        (slice allocation: what a client of rank ``stop`` gets beyond rank ``start``)."""
        return self.B[:, start:stop].copy(), self.A[start:stop].copy()


Update = SVDUpdate | StackedUpdate


def _float64_with_threshold(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """B, A in float64 (the server decomposes in float64) and the relative threshold below
    which σ is numerically zero: ``max(m, n) · eps(float32)`` (as `numpy.linalg.matrix_rank`)."""
    rtol = max(B.shape[0], A.shape[1]) * float(np.finfo(np.float32).eps)
    return np.asarray(B, np.float64), np.asarray(A, np.float64), rtol


def compress(B: np.ndarray, A: np.ndarray, dtype: type = np.float32) -> SVDUpdate:
    """Thin SVD of ``B @ A`` without forming it, dropping the numerically zero directions
    (:func:`_float64_with_threshold`); computed in float64, accurate to ``dtype``
    (`significant_svd`)."""
    B64, A64, rtol = _float64_with_threshold(B, A)
    U, S, Vt = on_host(*significant_svd(*on_device(B64, A64), rtol, dtype))
    return SVDUpdate(U.astype(dtype), S.astype(dtype), Vt.astype(dtype))


def decompose(B: np.ndarray, A: np.ndarray, top: int, dtype: type = np.float32) -> StackedUpdate:
    """``B @ A`` kept as its factors with its first ``top`` singular triplets and every
    significant singular value (:func:`_float64_with_threshold`), from one decomposition
    (`leading_svd`, computed in float64, stored in ``dtype``)."""
    B64, A64, rtol = _float64_with_threshold(B, A)
    U, S, Vt = on_host(*leading_svd(*on_device(B64, A64), top, rtol))
    B, A, U, S, Vt = (np.asarray(x, dtype) for x in (B, A, U, S, Vt))
    return StackedUpdate(B, A, U, S, Vt)


def compressed_values(B: np.ndarray, A: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``compress(B, A, dtype).S`` without the singular vectors (`significant_values`)."""
    B64, A64, rtol = _float64_with_threshold(B, A)
    (S,) = on_host(significant_values(*on_device(B64, A64), rtol))
    return S.astype(dtype)


def empty_update(m: int, n: int) -> SVDUpdate:
    return SVDUpdate(
        np.zeros((m, 0), np.float32), np.zeros(0, np.float32), np.zeros((0, n), np.float32)
    )


def stack(*parts: Factors) -> Factors:
    """``Σ_i B_i A_i`` as one pair of factors ``[B_1 … B_p]``, ``[A_1; …; A_p]`` (the pair
    itself, not a copy, for one part)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([b for b, _ in parts], axis=1), np.concatenate(
        [a for _, a in parts], axis=0
    )


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: folded LoRA factors per module, dense trainables, counts."""

    partition_id: int
    rank: int
    num_examples: int
    factors: dict[str, Factors]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GlobalState:
    """Everything the server needs to continue a run after round `round`."""

    round: int
    adapter: dict[str, Update]  # global LoRA update (adapter mode); empty in merge mode
    merged: dict[str, SVDUpdate]  # update merged into the base weights (merge mode)
    dense: dict[str, np.ndarray]  # non-LoRA trainables (classifier head), FedAvg'ed
    ranks: dict[int, int]  # partition-id → rank the client trains next (HetLoRA may prune)
    # round t → module → the factors (B_t (m, R_t), A_t (R_t, n)) that round merged into the
    # base; Σ_t B_t A_t = ``merged`` (rounds that merged nothing are absent)
    merged_rounds: dict[int, dict[str, Factors]] = field(default_factory=dict)

    def client_payload(self, rank: int, split: str, allocation: str = "svd") -> dict[str, Factors]:
        """The factors a client of rank `rank` starts from (adapter mode; empty otherwise):
        the best rank-r truncation (``"svd"``) or the kept factors' first r columns
        (``"slice"``, at most as many as are kept; the client initialises the rest)."""
        if allocation == "slice":
            return {name: _leading_columns(u, rank) for name, u in self.adapter.items()}
        return {name: update.factors(rank, split) for name, update in self.adapter.items()}

    def total_update(self) -> dict[str, Update]:
        """The update that defines the global model: the adapter, the merged sum, or (a method
        with a residual) the thin SVD of both, ``D + B A``."""
        if not (self.adapter and self.merged):
            return self.adapter if self.adapter else self.merged
        return {name: _sum(self.merged.get(name), update) for name, update in self.adapter.items()}


def _sum(merged: SVDUpdate | None, adapter: Update) -> Update:
    """``D + B A`` of one module as a thin SVD (the adapter alone if nothing was merged)."""
    if merged is None or merged.rank == 0:
        return adapter
    B, A = stack(merged.whole(), adapter.whole())
    return compress(B, A, dtype=B.dtype.type)


def _leading_columns(update: Update, rank: int) -> Factors:
    """``B[:, :r]``, ``A[:r]`` of the kept factors (``U S``, ``Vt`` for a thin SVD)."""
    B, A = update.whole()
    return B[:, :rank].copy(), A[:rank].copy()


def weighted_dense_average(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """FedAvg of the dense trainables: ``Σ_k n_k x_k / Σ_k n_k`` (float64 sum, float32 out)."""
    names = sorted({name for u in updates for name in u.dense})
    total = float(sum(u.num_examples for u in updates))
    averaged = {}
    for name in names:
        holders = [u for u in updates if name in u.dense]
        weight = float(sum(u.num_examples for u in holders)) or total
        acc = sum(u.dense[name].astype(np.float64) * u.num_examples for u in holders)
        averaged[name] = (acc / weight).astype(np.float32)
    return averaged


def module_diagnostics(S: np.ndarray, bounds: tuple[int, ...]) -> dict[str, float | list[float]]:
    """Collapse diagnostics of one update from its singular values; `bounds` are the rank
    partitions' upper ends ρ_1 < … < ρ_M (the federation's distinct ranks)."""
    return {
        "top_rmin_energy": float(top_energy(S, bounds[0])),
        "effective_rank": float(effective_rank(S)),
        "stable_rank": float(stable_rank(S)),
        "norm": float(np.sqrt(np.sum(np.asarray(S, np.float64) ** 2))),
        "partition_energy": [float(x) for x in partition_energy(S, bounds)],
        # e_i = σ_i² / Σ σ² for i ≤ 2 ρ_M: enough to re-bin the energy for any partitions
        "energy_spectrum": [float(x) for x in energy_spectrum(S, 2 * bounds[-1])],
    }


def energy_spectrum(S: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` normalised energies ``σ_i² / Σ σ²`` (fewer if the rank is lower)."""
    e = np.sort(np.asarray(S, np.float64))[::-1] ** 2
    total = e.sum()
    return (e / total if total > 0 else e)[:k]


def retention(previous: Update, agg: Factors, k: int) -> list[float]:
    """Share of direction i of the previous global update kept by this round's aggregate,
    ``u_iᵀ (B A) v_i / σ_i`` for i ≤ k: c_i = Σ_{r_k ≥ i} p_k for rank-agnostic averaging of
    barely trained clients, 1 for raFLoRA (measured without forming B A)."""
    r = min(k, previous.rank)
    B, A = (np.asarray(x, np.float64) for x in agg)
    left = previous.U[:, :r].astype(np.float64).T @ B  # (r, R)
    right = A @ previous.Vt[:r].astype(np.float64).T  # (R, r)
    kept = np.einsum("ij,ji->i", left, right)  # diag(Uᵀ B A V), (r,)
    S = previous.S[:r].astype(np.float64)
    return [float(x) for x in np.where(S > 0, kept / np.where(S > 0, S, 1.0), 0.0)]


def summarize_modules(per_module: dict[str, dict]) -> dict[str, float | list[float]]:
    """Mean over modules, plus the worst module for the collapse measures."""
    values = list(per_module.values())
    if not values:
        return {}
    out: dict[str, float | list[float]] = {}
    for key in ("top_rmin_energy", "effective_rank", "stable_rank"):
        column = [v[key] for v in values]
        out[key] = float(np.mean(column))
    out["top_rmin_energy_worst"] = float(max(v["top_rmin_energy"] for v in values))
    out["effective_rank_worst"] = float(min(v["effective_rank"] for v in values))
    out["norm"] = float(np.sqrt(sum(v["norm"] ** 2 for v in values)))
    out["partition_energy"] = [
        float(x) for x in np.mean([v["partition_energy"] for v in values], axis=0)
    ]
    return out


@dataclass(frozen=True)
class RoundSettings:
    method: Method
    options: Any  # the method's validated options (``method.build_options(...)``)
    apply: str  # "adapter" | "merge"
    carry_over: bool
    bounds: tuple[int, ...]  # the federation's distinct ranks ρ_1 < … < ρ_M (r_cap = ρ_M)
    dtype: type = np.float32  # what the kept update is stored in (decomposed in float64)
    # "all": keep the round's stacked factors (the global model is their whole product);
    # "leading": SVD allocation keeps only the first r_cap triplets (bounded server memory)
    keep: str = "all"

    @property
    def max_rank(self) -> int:
        return self.bounds[-1]

    @classmethod
    def of(
        cls,
        method: Method,
        options: dict | None = None,
        *,
        apply: str | None = None,
        carry_over: bool | None = None,
        bounds: tuple[int, ...] = (1,),
        dtype: type = np.float32,
        keep: str = "all",
    ) -> RoundSettings:
        """Settings with the method's own defaults for what is not given."""
        if keep not in KEEP:
            raise ValueError(f"keep {keep!r} is not one of {list(KEEP)}")
        return cls(
            method=method,
            options=method.build_options(**(options or {})),
            apply=method.apply if apply is None else apply,
            carry_over=method.carry_over if carry_over is None else carry_over,
            bounds=tuple(bounds),
            dtype=dtype,
            keep=keep,
        )


def aggregate_with_residual(
    settings: RoundSettings, factors: list[Factors], weights: list[float]
) -> tuple[Factors, Factors | None]:
    """The method's global factors of one module and its residual (B' (m, R'), A' (R', n)) to
    merge into the base, or None for a method without one; numpy arrays."""
    clients, backend = validate_factors(factors, weights)
    method = settings.method
    method.check_ranks(settings.options, clients.ranks)
    B, A = method.aggregate(clients, settings.options)
    agg = backend.out(B), backend.out(A)
    if method.residual is None:
        return agg, None
    Br, Ar = method.residual(clients, settings.options, (B, A))
    return agg, (backend.out(Br), backend.out(Ar))


def _merge(previous: SVDUpdate | None, delta: Factors, dtype: type) -> SVDUpdate:
    """``D_t = D_{t-1} + B_t A_t`` as a thin SVD (``D_1 = B_1 A_1``)."""
    if previous is None:
        return compress(*delta, dtype=dtype)
    return compress(*stack(previous.factors(), delta), dtype=dtype)


def _residual_share(residual: Factors, agg: Factors) -> float:
    """‖residual‖_F / ‖residual + B A‖_F: the share of the clients' mean update that the
    averaged factors miss (0 when they are exact)."""
    total = factored_norm(*stack(residual, agg))
    return factored_norm(*residual) / total if total > 0 else 0.0


def _carried(previous: Update, sampled_max: int, settings: RoundSettings) -> tuple[Factors, float]:
    """Directions (r_s, r_cap] of the previous update that no sampled client trained, and their
    energy ‖·‖_F²: its singular directions (svd allocation) or its kept factors' columns
    (slice allocation)."""
    if settings.method.allocation == "slice":
        B, A = _leading_columns(previous, settings.max_rank)
        tail = B[:, sampled_max:], A[sampled_max:]
        energy = float(np.sum(compressed_values(*tail, dtype=np.float64) ** 2)) if len(A) else 0.0
        return tail, energy
    tail = previous.tail(sampled_max, settings.max_rank)
    return tail, float(np.sum(previous.S[sampled_max : settings.max_rank].astype(np.float64) ** 2))


class ModuleSource(Protocol):
    """One round's replies, readable one module at a time (the streamed round step).

    ``updates``: one header per client, ordered by partition id, with its rank, num-examples,
    dense trainables and metrics (``factors`` may be empty); ``modules``: the LoRA module names,
    sorted; ``load(name)``: every client's ``(B_k (m, r_k), A_k (r_k, n))`` of that module, in
    the order of ``updates``."""

    @property
    def updates(self) -> list[ClientUpdate]: ...

    @property
    def modules(self) -> list[str]: ...

    def load(self, name: str) -> list[Factors]: ...


class InMemorySource:
    """A :class:`ModuleSource` over replies held in memory (what the round step always had)."""

    def __init__(self, updates: list[ClientUpdate]) -> None:
        if not updates:
            raise ValueError("a round needs at least one client update")
        self._updates = sorted(updates, key=lambda u: u.partition_id)

    @property
    def updates(self) -> list[ClientUpdate]:
        return self._updates

    @property
    def modules(self) -> list[str]:
        return sorted(self._updates[0].factors)

    def load(self, name: str) -> list[Factors]:
        return [u.factors[name] for u in self._updates]


@dataclass(frozen=True)
class _ModuleStep:
    """What the round step produced for one module."""

    adapter: Update | None  # the kept global update (adapter mode)
    merged: SVDUpdate | None  # D_t (merge mode, or a method's residual)
    merged_now: Factors | None  # what this round merged
    diagnostics: dict
    carried_share: float | None  # adapter mode: carried energy / the update's energy
    total_rank: int  # rank of the module's global update (adapter, D_t or D_t + B A)


def _module_step(
    name: str,
    factors: list[Factors],
    weights: list[float],
    state: GlobalState,
    settings: RoundSettings,
    sampled_max: int,
) -> _ModuleStep:
    """One module of the round step: aggregate the clients' ``(B_k, A_k)`` (partition-id
    order), merge and/or keep, carry over, decompose once, diagnostics (module docstring)."""
    agg, residual = aggregate_with_residual(settings, [on_device(*f) for f in factors], weights)
    agg = on_host(*agg)
    residual = None if residual is None else on_host(*residual)
    if settings.apply == "merge":
        delta = stack(agg, residual) if residual is not None else agg
        merged_now = _as(delta, settings.dtype)
        previous = state.merged.get(name)
        merged = _merge(previous, merged_now, settings.dtype)
        # the round's own spectrum (D_1 = ΔW_1: one decomposition serves both)
        values = merged.S if previous is None and residual is None else None
        if values is None:
            values = compressed_values(*agg, dtype=settings.dtype)
        diagnostics = module_diagnostics(values, settings.bounds)
        return _ModuleStep(None, merged, merged_now, diagnostics, None, merged.rank)
    merged_now, merged = None, state.merged.get(name)
    if residual is not None:  # kept as the adapter; its residual goes into the base
        merged_now = _as(residual, settings.dtype)
        merged = _merge(merged, merged_now, settings.dtype)
    previous = state.adapter.get(name)
    parts, carried = [agg], 0.0
    if settings.carry_over and previous is not None and sampled_max < settings.max_rank:
        tail, energy = _carried(previous, sampled_max, settings)
        if tail[0].shape[1]:
            carried = energy
            parts.append(tail)
    # one decomposition per module, carried tail included
    round_update = decompose(*stack(*parts), top=settings.max_rank, dtype=settings.dtype)
    diagnostics = module_diagnostics(round_update.S, settings.bounds)
    if residual is not None:
        diagnostics["residual_share"] = _residual_share(residual, agg)
    if previous is not None and previous.rank:
        diagnostics["retention"] = retention(previous, agg, settings.max_rank)
    total = float(np.sum(round_update.S.astype(np.float64) ** 2))
    kept = _kept(round_update, settings)
    rank = round_update.rank if merged is None else _sum(merged, round_update).rank
    share = carried / total if total > 0 else 0.0
    return _ModuleStep(kept, merged, merged_now, diagnostics, share, rank)


def _kept(update: StackedUpdate, settings: RoundSettings) -> Update:
    """What the server keeps of a module's round update: all of it, or (``keep="leading"``,
    SVD allocation, more columns than triplets) the thin SVD of its first t = r_cap triplets,
    ``U (m, t)``, ``S (t,)``, ``Vt (t, n)``: everything a client is handed, the carried tail
    and retention read, (m + n)·t floats instead of (m + n)·(R + 2t)."""
    if settings.keep == "all" or settings.method.allocation != "svd":
        return update
    if update.B.shape[1] <= update.leading:
        return update
    t = update.leading
    return SVDUpdate(update.U, update.S[:t].copy(), update.Vt)


def aggregate_round(
    state: GlobalState, updates: list[ClientUpdate], settings: RoundSettings
) -> tuple[GlobalState, dict]:
    """One server step: aggregate the replies, apply them, report diagnostics.

    Replies are ordered by partition id first, so the floating-point sums (and hence the run)
    do not depend on the order in which clients answered. The module-streamed step
    (:func:`aggregate_streamed`) over the replies in memory.
    """
    return aggregate_streamed(state, InMemorySource(updates), settings)


def aggregate_streamed(
    state: GlobalState, source: ModuleSource, settings: RoundSettings
) -> tuple[GlobalState, dict]:
    """The round step module by module: only one module's client factors (loaded from
    ``source``), its stacked aggregate and decomposition are in memory at a time, besides the
    kept state (bounded with ``settings.keep = "leading"``; merge mode keeps D_t and every
    round's merged factors, which grow with the rounds)."""
    updates = source.updates
    ranks = [u.rank for u in updates]
    weights = [float(u.num_examples) for u in updates]
    sampled_max = max(ranks)
    new_adapter: dict[str, Update] = {}
    new_merged: dict[str, SVDUpdate] = dict(state.merged)
    merged_now: dict[str, Factors] = {}  # what this round merges, per module
    per_module: dict[str, dict] = {}
    carried_energy = []
    total_ranks = []
    for name in source.modules:
        step = _module_step(name, source.load(name), weights, state, settings, sampled_max)
        if step.adapter is not None:
            new_adapter[name] = step.adapter
        if step.merged is not None:
            new_merged[name] = step.merged
        if step.merged_now is not None:
            merged_now[name] = step.merged_now
        if step.carried_share is not None:
            carried_energy.append(step.carried_share)
        per_module[name] = step.diagnostics
        total_ranks.append(step.total_rank)
    diagnostics = summarize_modules(per_module)
    diagnostics["carried_energy_share"] = float(np.mean(carried_energy)) if carried_energy else 0.0
    diagnostics["predicted_retention"] = predicted_retention(ranks, weights)
    diagnostics["per_module"] = per_module
    new_state = GlobalState(
        round=state.round + 1,
        adapter=new_adapter,
        merged=new_merged,
        dense=weighted_dense_average(updates) or state.dense,
        ranks=dict(state.ranks) | {u.partition_id: u.rank for u in updates},
        merged_rounds=state.merged_rounds | ({state.round + 1: merged_now} if merged_now else {}),
    )
    # the rank of the global update: the adapter's, D_t's (merge mode) or D_t + B A's (residual)
    diagnostics["global_rank"] = int(max(total_ranks, default=0))
    return new_state, diagnostics


def _as(factors: Factors, dtype: type) -> Factors:
    """Both factors as C-contiguous arrays of ``dtype``."""
    return tuple(np.ascontiguousarray(x, dtype=dtype) for x in factors)  # type: ignore[return-value]
