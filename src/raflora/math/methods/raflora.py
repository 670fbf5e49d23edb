"""raFLoRA (arXiv 2602.13486): rank-partitioned aggregation, then SVD allocation.

Let ρ_1 < … < ρ_M be the distinct client ranks (or explicit ``partitions``) and
P_j = (ρ_{j-1}, ρ_j]. Client k's update splits exactly, B_k A_k = Σ_j B_k[:, P_j] A_k[P_j, :],
and partition j is averaged only over the clients that cover it (r_k > ρ_{j-1}):

    ΔW = Σ_j Σ_{k: r_k > ρ_{j-1}} q_jk B_k[:, P_j] A_k[P_j, :],   q_jk = p_k / Σ_{k' covers j} p_k'

kept stacked client by client (R = Σ r_k, the same bytes as FlexLoRA); clients get the best
rank-r_k truncation. With ``weighting="energy"`` q_jk ∝ p_k ‖B_k[:, P_j] A_k[P_j, :]‖_F.

Why: rank-agnostic averaging keeps direction i of the previous global update only with weight
c_i = Σ_{r_k ≥ i} p_k, so directions beyond the smallest rank decay geometrically ("rank
collapse"); renormalising inside each partition keeps every direction's weight at 1.

Carry-over (on by default, this project's addition, not the paper's): under partial
participation the directions (r_sampled, r_max] of the previous update, which no sampled client
holds, are kept unchanged — "averaged over the clients that cover it" with none covering it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from raflora.math._arrays import Clients, check_bounds
from raflora.math.lowrank import _frobenius
from raflora.math.methods._common import partition_bounds, renormalised, stacked
from raflora.math.methods.registry import Method, register

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


def columns(c: Clients, opts: RafloraOptions) -> list[list[float]]:
    """raflora's weight for each of each client's columns: a client's pieces tile its columns
    0..r_k-1, so the stack is client by client, B = [B_1 diag(q_1) …]."""
    bounds = partition_bounds(c.ranks, opts.partitions)
    q = renormalised(c.ranks, c.p, bounds)  # (M, K)
    out = [[0.0] * r for r in c.ranks]  # per client: the weight of each of its columns
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
            out[k][lo : min(hi, c.ranks[k])] = [w] * (min(hi, c.ranks[k]) - lo)
    return out


def raflora(c: Clients, opts: RafloraOptions) -> tuple[Tensor, Tensor]:
    """Rank-partitioned aggregation, kept stacked (rank Σ r_k). A partition whose members all
    have weight 0 contributes nothing."""
    return stacked(c, columns(c, opts))


def check(opts: RafloraOptions, ranks: Sequence[int]) -> None:
    """Explicit partitions must end at or above the largest client rank."""
    partition_bounds(ranks, opts.partitions)


register(
    Method(
        name="raflora",
        summary="raFLoRA: rank-partitioned aggregation (each partition over the clients "
        "covering it), SVD allocation",
        paper="raFLoRA: rank-partitioned aggregation for heterogeneous federated LoRA, "
        "arXiv 2602.13486",
        aggregate=raflora,
        carry_over=True,
        options=RafloraOptions,
        columns=columns,
        check=check,
        retention="1",
    )
)
