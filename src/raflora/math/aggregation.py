"""Server aggregation of heterogeneous-rank LoRA updates, one function per method + a registry.

Client k sends B_k (m, r_k) and A_k (r_k, n) whose product is its update (LoRA scaling folded
in) and a weight w_k ≥ 0 (data size); p_k = w_k / Σ w. Every method returns global factors
B (m, R), A (R, n) with B A the global update, without forming an m×n matrix:

    fedit     all r_k equal:                     (Σ p_k B_k)(Σ p_k A_k)
    zeropad   pad to r_max (B̃_k, Ã_k):          (Σ p_k B̃_k)(Σ p_k Ã_k)
    hetlora   zeropad with q_k ∝ ‖B_k A_k‖_F     (× w_k if data_weighted; Cho et al. 2024)
    rblora    zeropad, column/row j averaged over {k : r_k > j} with p renormalised per j
    flexlora  Σ p_k B_k A_k = [p_1 B_1 … p_K B_K] [A_1; …; A_K]             (R = Σ r_k)
    flexlora_nm  flexlora rescaled to raflora's ‖ΔW‖_F on the same updates (control)
    flora     the same stacked factors, meant to be merged into the base weights
    raflora   rank partitions P_j = (ρ_{j-1}, ρ_j] of the distinct ranks ρ_1 < … < ρ_M:
              B_k A_k = Σ_j B_k[:, P_j] A_k[P_j, :] exactly, and partition j is averaged over
              the clients that cover it, q_kj = p_k / Σ_{k' covers j} p_k'        (R = Σ r_k)

Why raflora: rank-agnostic averaging keeps direction i of the previous global update only
with weight c_i = Σ_{r_k ≥ i} p_k (the clients that were allocated it), so directions beyond
the smallest rank decay geometrically over rounds ("rank collapse"); renormalising inside
each partition keeps every direction's weight at 1.

:func:`aggregate` is the only place that dispatches on a method name; methods are registered
with :func:`register_method` at the bottom of this module, and their options are small frozen
dataclasses that validate themselves.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.math._arrays import (
    Clients,
    check_bounds,
    check_ranks,
    normalise_weights,
    validate_factors,
)
from raflora.math.lowrank import _frobenius

MethodFn = Callable[[Clients, Any], tuple[Tensor, Tensor]]
# For a method whose global factors are the clients' own, stacked with a weight per column
# (B = [B_1 diag(q_1) …], A = [A_1; …]): the weights q_k (r_k,) per client, or None when the
# options leave that form (e.g. a rescaled flexlora).
ColumnsFn = Callable[[Clients, Any], "list[list[float]] | None"]
_REGISTRY: dict[str, tuple[MethodFn, type | None]] = {}
_COLUMNS: dict[str, ColumnsFn] = {}


# --------------------------------------------------------------------------- registry


def register_method(
    name: str, fn: MethodFn, options_cls: type | None = None, columns: ColumnsFn | None = None
) -> None:
    """Register ``fn(clients, options) -> (B, A)`` under a unique lower-case ``name``.

    ``columns(clients, options)``, for a method that stacks the clients' factors with a weight
    per column, returns those weights; :func:`raflora.math.stacked.aggregate_allocate` then
    never forms the stack."""
    if not isinstance(name, str) or not name or name != name.lower() or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a non-empty lower-case identifier")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if options_cls is not None and not dataclasses.is_dataclass(options_cls):
        raise ValueError(f"options_cls for {name!r} must be a dataclass")
    _REGISTRY[name] = (fn, options_cls)
    if columns is not None:
        _COLUMNS[name] = columns


def available_methods() -> list[str]:
    """Names of the registered aggregation methods, sorted."""
    return sorted(_REGISTRY)


def method_summary(method: str) -> str:
    """First line of ``method``'s docstring (what ``raflora methods`` lists)."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: {available_methods()}")
    lines = (_REGISTRY[method][0].__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""


def method_options(method: str, **options: Any) -> Any:
    """Build and validate ``method``'s options dataclass (None for a method without options)."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: {available_methods()}")
    options_cls = _REGISTRY[method][1]
    allowed = [] if options_cls is None else [f.name for f in dataclasses.fields(options_cls)]
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"unknown option {key!r} for method {method!r}; allowed options: {allowed}"
            )
    return None if options_cls is None else options_cls(**options)


def aggregate(
    method: str,
    factors: Sequence[tuple[Any, Any]],
    weights: Sequence[float],
    **options: Any,
) -> tuple[Any, Any]:
    """Aggregate client factors with a registered method.

    Args:
        method: one of :func:`available_methods`.
        factors: ``[(B_k, A_k), ...]``, B_k (m, r_k), A_k (r_k, n); numpy or torch, float32 or
            float64, one library/dtype/device for all. Products include the LoRA scaling.
        weights: w_k ≥ 0 per client (data sizes), normalised inside.
        **options: method options (see the ``*Options`` dataclasses).

    Returns:
        ``(B, A)``, B (m, R), A (R, n), with ``B @ A`` the global update, in the input's
        library, dtype and device.
    """
    opts = method_options(method, **options)
    clients, backend = validate_factors(factors, weights)
    B, A = run_method(method, clients, opts)
    return backend.out(B), backend.out(A)


def run_method(method: str, clients: Clients, options: Any) -> tuple[Tensor, Tensor]:
    """``method``'s global factors B (m, R), A (R, n) for validated clients and options."""
    return _REGISTRY[method][0](clients, options)


def stacked_columns(method: str, clients: Clients, options: Any) -> list[list[float]] | None:
    """Per-client column weights q_k (r_k,) of ``method``'s global factors
    B = [B_1 diag(q_1) …], A = [A_1; …], or None when the method does not stack that way."""
    columns = _COLUMNS.get(method)
    return None if columns is None else columns(clients, options)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class HetloraOptions:
    data_weighted: bool = False  # multiply the norm weights ‖B_k A_k‖_F by the data sizes

    def __post_init__(self) -> None:
        if not isinstance(self.data_weighted, bool):
            raise ValueError(f"data_weighted must be a bool, got {self.data_weighted!r}")


@dataclass(frozen=True)
class FlexloraOptions:
    norm_target: float | None = None  # if set, rescale B so that ‖B A‖_F equals it

    def __post_init__(self) -> None:
        t = self.norm_target
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0
        ):
            raise ValueError(f"norm_target must be a finite number ≥ 0 or None, got {t!r}")


WEIGHTINGS = ("renormalised", "energy")


@dataclass(frozen=True)
class RafloraOptions:
    partitions: Sequence[int] | None = None  # increasing bounds ρ_j; None = distinct ranks
    weighting: str = "renormalised"  # or "energy": ∝ p_k ‖partition component‖_F

    def __post_init__(self) -> None:
        if self.partitions is not None:
            object.__setattr__(self, "partitions", check_bounds(self.partitions))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r} is not one of {list(WEIGHTINGS)}")


# --------------------------------------------------------------------------- partitions


def partition_bounds(ranks: Sequence[int], partitions: Sequence[int] | None = None) -> list[int]:
    """Upper bounds ρ_1 < … < ρ_M of the rank partitions (ρ_{j-1}, ρ_j], with ρ_0 = 0.

    The distinct client ranks by default; explicit ``partitions`` must end at ≥ max rank.
    """
    ranks = check_ranks(ranks)
    if partitions is None:
        return sorted(set(ranks))
    bounds = check_bounds(partitions)
    if bounds[-1] < max(ranks):
        raise ValueError(
            f"the last partition bound {bounds[-1]} is below the largest client rank "
            f"{max(ranks)}; its directions would belong to no partition"
        )
    return list(bounds)


def _renormalised(ranks: Sequence[int], p: Sequence[float], bounds: Sequence[int]) -> np.ndarray:
    """(M, K) weights: row j is p over the clients with r_k > ρ_{j-1}, renormalised."""
    q = np.zeros((len(bounds), len(ranks)))
    lows = [0, *bounds[:-1]]
    for j, lo in enumerate(lows):
        members = [k for k, r in enumerate(ranks) if r > lo]
        total = math.fsum(p[k] for k in members)
        for k in members:
            q[j, k] = p[k] / total if total > 0 else 0.0
    return q


def partition_weights(
    ranks: Sequence[int], weights: Sequence[float], partitions: Sequence[int] | None = None
) -> np.ndarray:
    """raFLoRA's renormalised weights, shape (M, K): q_jk = p_k / Σ_{k' in j} p_k' for the
    clients taking part in partition j (r_k > ρ_{j-1}), 0 for the others; rows sum to 1
    (a row of zeros if its members all have weight 0)."""
    ranks = check_ranks(ranks)
    p = normalise_weights(weights, len(ranks))
    return _renormalised(ranks, p, partition_bounds(ranks, partitions))


# --------------------------------------------------------------------------- helpers


def _padded_average(c: Clients, q: np.ndarray) -> tuple[Tensor, Tensor]:
    """Zero-pad to r_max and average column j of B / row j of A with weights q[k, j]."""
    r_max = max(c.ranks)
    B = c.Bs[0].new_zeros((c.m, r_max))  # (m, r_max)
    A = c.As[0].new_zeros((r_max, c.n))  # (r_max, n)
    for k, (Bk, Ak) in enumerate(zip(c.Bs, c.As, strict=True)):
        w = torch.as_tensor(q[k, : c.ranks[k]], dtype=Bk.dtype, device=Bk.device)  # (r_k,)
        B[:, : c.ranks[k]] += Bk * w
        A[: c.ranks[k]] += w[:, None] * Ak
    return B, A


def _stacked(c: Clients, columns: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Σ_k B_k diag(q_k) A_k kept factored: B = [B_1 diag(q_1) … ] (m, Σ r), A = [A_1; …]
    (Σ r, n), with ``columns[k]`` = q_k, one weight per column of client k."""
    B = torch.cat(c.Bs, dim=1)  # (m, Σ r)
    A = torch.cat(c.As, dim=0)  # (Σ r, n)
    q = [w for qk in columns for w in qk]  # one weight per column
    B.mul_(torch.tensor(q, dtype=B.dtype, device=B.device))  # in place: no (m, Σ r) temporary
    return B, A


def _per_client(c: Clients, weights: Sequence[float]) -> np.ndarray:
    """(K, r_max) weight table with the same weight for every index of a client."""
    return np.repeat(np.asarray(weights, dtype=np.float64)[:, None], max(c.ranks), axis=1)


# --------------------------------------------------------------------------- methods


def fedit(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """FedIT (Zhang et al. 2024): average B and A separately; needs equal ranks."""
    if len(set(c.ranks)) != 1:
        raise ValueError(
            f"fedit needs all clients to have the same rank, got ranks {list(c.ranks)}; "
            "use zeropad, flexlora or raflora for heterogeneous ranks"
        )
    return _padded_average(c, _per_client(c, c.p))


def zeropad(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """Zero-pad every client to r_max, then FedIT-style averaging of B and A."""
    return _padded_average(c, _per_client(c, c.p))


def hetlora(c: Clients, opts: HetloraOptions) -> tuple[Tensor, Tensor]:
    """HetLoRA (Cho et al. 2024): zero-padding with weights ∝ ‖B_k A_k‖_F (× w_k optionally).

    If every client update is zero the data weights p_k are used instead.
    """
    norms = [float(_frobenius(Bk, Ak)) for Bk, Ak in zip(c.Bs, c.As, strict=True)]
    raw = [nk * pk for nk, pk in zip(norms, c.p, strict=True)] if opts.data_weighted else norms
    total = math.fsum(raw)
    q = [v / total for v in raw] if total > 0 else list(c.p)
    return _padded_average(c, _per_client(c, q))


def rblora(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """Rank-balanced zero-padding: index j averaged over {k : r_k > j}, p renormalised per j."""
    r_max = max(c.ranks)
    q = _renormalised(c.ranks, c.p, list(range(1, r_max + 1))).T  # (K, r_max)
    return _padded_average(c, q)


def _client_columns(c: Clients, _: Any = None) -> list[list[float]]:
    """Every column of client k weighted p_k: Σ p_k B_k A_k."""
    return [[pk] * r for pk, r in zip(c.p, c.ranks, strict=True)]


def _flexlora_columns(c: Clients, opts: FlexloraOptions) -> list[list[float]] | None:
    return _client_columns(c) if opts.norm_target is None else None


def flexlora(c: Clients, opts: FlexloraOptions) -> tuple[Tensor, Tensor]:
    """FlexLoRA (Bai et al. 2024): Σ p_k B_k A_k, stacked (rank Σ r_k).

    With ``norm_target`` B is scaled so that ‖B A‖_F = norm_target (a zero update can only be
    scaled to 0).
    """
    B, A = _stacked(c, _client_columns(c))
    if opts.norm_target is not None:
        norm = float(_frobenius(B, A))
        if norm == 0.0 and opts.norm_target > 0:
            raise ValueError("norm_target: the aggregated update is zero and cannot be rescaled")
        B = B * (float(opts.norm_target) / norm if norm > 0 else 0.0)
    return B, A


def flora(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """FLoRA (Wang et al. 2024) stacking: Σ p_k B_k A_k as stacked factors (rank Σ r_k).

    The caller merges ``B @ A`` into the base weights and clients restart from a fresh LoRA
    initialisation each round; the product equals flexlora's.
    """
    return _stacked(c, _client_columns(c))


def raflora(c: Clients, opts: RafloraOptions) -> tuple[Tensor, Tensor]:
    """raFLoRA: rank-partitioned aggregation, kept stacked (rank Σ r_k, the same bytes).

    Client k takes part in partition (lo, hi] iff r_k > lo, with directions lo:min(r_k, hi).
    Weights inside a partition are p_k renormalised over its members, or with
    ``weighting="energy"`` ∝ p_k ‖B_k[:, P] A_k[P, :]‖_F (falling back to renormalised p when
    the partition is zero). A partition whose members all have weight 0 contributes nothing.
    A client's pieces tile its columns 0..r_k-1, so the stack is client by client,
    B = [B_1 diag(q_1) …] with q_k the weight of each of client k's columns (one copy per
    client, like flexlora, instead of one per piece).
    """
    return _stacked(c, _raflora_columns(c, opts))


def _raflora_columns(c: Clients, opts: RafloraOptions) -> list[list[float]]:
    """raflora's weight for each of each client's columns (see :func:`raflora`)."""
    bounds = partition_bounds(c.ranks, opts.partitions)
    q = _renormalised(c.ranks, c.p, bounds)  # (M, K)
    columns = [[0.0] * r for r in c.ranks]  # per client: the weight of each of its columns
    for j, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
        members = [k for k, r in enumerate(c.ranks) if r > lo]
        weights = [float(q[j, k]) for k in members]
        if opts.weighting == "energy":
            parts = [(c.Bs[k][:, lo:hi], c.As[k][lo:hi]) for k in members]  # (m, d), (d, n)
            norms = [float(_frobenius(Bp, Ap)) for Bp, Ap in parts]
            raw = [c.p[k] * nk for k, nk in zip(members, norms, strict=True)]
            total = math.fsum(raw)
            if total > 0:
                weights = [v / total for v in raw]
        for k, w in zip(members, weights, strict=True):
            columns[k][lo : min(hi, c.ranks[k])] = [w] * (min(hi, c.ranks[k]) - lo)
    return columns


def flexlora_nm(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """FlexLoRA rescaled to raFLoRA's ‖ΔW‖_F on the same updates (norm-matching control).

    Same directions and energy shares as flexlora, raflora's step size: it separates "a
    bigger step" from "more directions" when explaining a gap between the two.
    """
    target = float(_frobenius(*raflora(c, RafloraOptions())))
    B, A = flexlora(c, FlexloraOptions())
    norm = float(_frobenius(B, A))
    return (B * (target / norm), A) if norm > 0 else (B, A)


register_method("fedit", fedit)
register_method("zeropad", zeropad)
register_method("hetlora", hetlora, HetloraOptions)
register_method("rblora", rblora)
register_method("flexlora", flexlora, FlexloraOptions, columns=_flexlora_columns)
register_method("flexlora_nm", flexlora_nm)
register_method("flora", flora, columns=_client_columns)
register_method("raflora", raflora, RafloraOptions, columns=_raflora_columns)
