"""Rank-collapse diagnostics of a global update ΔW = B A (factored) or of its singular values.

With σ_1 ≥ … ≥ σ_k the singular values of ΔW (k = min(m, n, R)) and e_i = σ_i² / Σ σ²:

    partition_energy(σ, ρ)  [Σ_{i ∈ (ρ_{j-1}, ρ_j]} e_i for j = 1..M] + [Σ_{i > ρ_M} e_i]
    top_energy(σ, r)        Σ_{i ≤ r} e_i
    effective_rank(σ)       exp(-Σ e_i log e_i)                      (Roy & Vetterli 2007)
    stable_rank(σ)          Σ σ² / σ_1²
    predicted_retention     c_i = Σ_{r_k ≥ i} p_k, i = 1..r_max: the share of direction i that
                            rank-agnostic averaging keeps each round (only clients allocated
                            direction i send it back), so it decays like c_i^t.

A zero update has all shares 0 and effective/stable rank 0. Results are plain floats/lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from raflora.math._arrays import check_bounds, check_ranks, normalise_weights
from raflora.math.lowrank import spectrum
from raflora.math.methods._common import partition_bounds

__all__ = [
    "effective_rank",
    "partition_energy",
    "predicted_retention",
    "singular_values",
    "stable_rank",
    "summarize_update",
    "top_energy",
]


def _sigma(sigma: Any) -> np.ndarray:
    """Singular values as a 1-D float64 numpy array, sorted descending."""
    if isinstance(sigma, Tensor):
        sigma = sigma.detach().cpu().numpy()
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular values must be finite and non-negative")
    return np.sort(s)[::-1]


def _shares(sigma: Any) -> np.ndarray:
    """e_i = σ_i² / Σ σ² (all zeros for a zero update)."""
    e = _sigma(sigma) ** 2
    total = e.sum()
    return e / total if total > 0 else np.zeros_like(e)


def singular_values(B: Any, A: Any) -> list[float]:
    """Singular values of B @ A, descending, as floats (from the factored SVD)."""
    return [float(x) for x in np.asarray(_sigma(spectrum(B, A)))]


def partition_energy(sigma: Any, bounds: Sequence[int]) -> list[float]:
    """Energy share of SVD directions (ρ_{j-1}, ρ_j] per bound, then of those beyond ρ_M."""
    bounds = check_bounds(bounds)
    e = _shares(sigma)
    lows = [0, *bounds]
    highs = [*bounds, max(len(e), bounds[-1])]
    return [float(e[lo:hi].sum()) for lo, hi in zip(lows, highs, strict=True)]


def top_energy(sigma: Any, r: int) -> float:
    """Energy share of the top ``r`` directions."""
    if r < 0:
        raise ValueError(f"r = {r} must be non-negative")
    return float(_shares(sigma)[:r].sum())


def effective_rank(sigma: Any) -> float:
    """exp of the entropy of the normalised σ² (0 for a zero update)."""
    e = _shares(sigma)
    e = e[e > 0]
    return float(math.exp(-np.sum(e * np.log(e)))) if e.size else 0.0


def stable_rank(sigma: Any) -> float:
    """Σ σ² / σ_1² (0 for a zero update)."""
    s = _sigma(sigma)
    return float(np.sum(s**2) / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def predicted_retention(ranks: Sequence[int], weights: Sequence[float]) -> list[float]:
    """c_i = Σ_{r_k ≥ i} p_k for i = 1..r_max (p = normalised weights)."""
    ranks = check_ranks(ranks)
    p = normalise_weights(weights, len(ranks))
    return [
        math.fsum(pk for pk, rk in zip(p, ranks, strict=True) if rk >= i)
        for i in range(1, max(ranks) + 1)
    ]


def summarize_update(
    B: Any, A: Any, ranks: Sequence[int], weights: Sequence[float]
) -> dict[str, Any]:
    """JSON-ready diagnostics of a global update B A for clients of ``ranks``/``weights``."""
    sigma = singular_values(B, A)
    bounds = partition_bounds(ranks)
    return {
        "singular_values": sigma,
        "norm": float(math.sqrt(sum(s * s for s in sigma))),
        "partition_bounds": bounds,
        "partition_energy": partition_energy(sigma, bounds),
        "top_rmin_energy": top_energy(sigma, min(ranks)),
        "effective_rank": effective_rank(sigma),
        "stable_rank": stable_rank(sigma),
        "predicted_retention": predicted_retention(ranks, weights),
    }
