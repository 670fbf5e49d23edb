"""What several methods share: padded averaging, stacking, per-partition weights.

Client k sends B_k (m, r_k), A_k (r_k, n) with its LoRA scaling folded in and p_k (Σ p = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.math._arrays import Clients, check_bounds, check_ranks, normalise_weights


def padded_average(c: Clients, q: np.ndarray) -> tuple[Tensor, Tensor]:
    """Zero-pad to r_max and average column j of B / row j of A with weights q[k, j]:
    B̄ (m, r_max) = Σ_k B̃_k diag(q_k), Ā (r_max, n) = Σ_k diag(q_k) Ã_k."""
    r_max = max(c.ranks)
    B = c.Bs[0].new_zeros((c.m, r_max))  # (m, r_max)
    A = c.As[0].new_zeros((r_max, c.n))  # (r_max, n)
    for k, (Bk, Ak) in enumerate(zip(c.Bs, c.As, strict=True)):
        w = torch.as_tensor(q[k, : c.ranks[k]], dtype=Bk.dtype, device=Bk.device)  # (r_k,)
        B[:, : c.ranks[k]] += Bk * w
        A[: c.ranks[k]] += w[:, None] * Ak
    return B, A


def per_client(c: Clients, weights: Sequence[float]) -> np.ndarray:
    """(K, r_max) weight table with the same weight for every index of a client."""
    return np.repeat(np.asarray(weights, dtype=np.float64)[:, None], max(c.ranks), axis=1)


def stacked(c: Clients, columns: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Σ_k B_k diag(q_k) A_k kept factored: B = [B_1 diag(q_1) … ] (m, Σ r), A = [A_1; …]
    (Σ r, n), with ``columns[k]`` = q_k, one weight per column of client k."""
    B = torch.cat(c.Bs, dim=1)  # (m, Σ r)
    A = torch.cat(c.As, dim=0)  # (Σ r, n)
    q = [w for qk in columns for w in qk]  # one weight per column
    B.mul_(torch.tensor(q, dtype=B.dtype, device=B.device))  # in place: no (m, Σ r) temporary
    return B, A


def client_columns(c: Clients, _: Any = None) -> list[list[float]]:
    """Every column of client k weighted p_k: Σ p_k B_k A_k."""
    return [[pk] * r for pk, r in zip(c.p, c.ranks, strict=True)]


def renormalised(ranks: Sequence[int], p: Sequence[float], bounds: Sequence[int]) -> np.ndarray:
    """(M, K) weights: row j is p over the clients with r_k > ρ_{j-1}, renormalised."""
    q = np.zeros((len(bounds), len(ranks)))
    lows = [0, *bounds[:-1]]
    for j, lo in enumerate(lows):
        members = [k for k, r in enumerate(ranks) if r > lo]
        total = math.fsum(p[k] for k in members)
        for k in members:
            q[j, k] = p[k] / total if total > 0 else 0.0
    return q


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
            f"{max(ranks)}; its directions would belong to no partition (end partitions at "
            f"≥ {max(ranks)} or leave them unset)"
        )
    return list(bounds)


def partition_weights(
    ranks: Sequence[int], weights: Sequence[float], partitions: Sequence[int] | None = None
) -> np.ndarray:
    """raFLoRA's renormalised weights, shape (M, K): q_jk = p_k / Σ_{k' in j} p_k' for the
    clients taking part in partition j (r_k > ρ_{j-1}), 0 for the others; rows sum to 1
    (a row of zeros if its members all have weight 0)."""
    ranks = check_ranks(ranks)
    p = normalise_weights(weights, len(ranks))
    return renormalised(ranks, p, partition_bounds(ranks, partitions))
