"""RB-LoRA, rank-balanced zero-padding (EACL 2026 Findings): index j of the padded factors is
averaged over the clients that have it, {k : r_k > j}, with their weights renormalised. Its
public code multiplies column j of the padded average by total / Σ_{r_k > j} n_k, i.e.

    B̄[:, j] = Σ_{r_k > j} n_k B_k[:, j] / Σ_{r_k > j} n_k,   Ā[j, :] likewise.

The server keeps (B̄, Ā) (m, r_max), (r_max, n); a client of rank r starts from the leading
slices. ``rblora_svd`` allocates by truncated SVD of B̄ Ā instead.
"""

from __future__ import annotations

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import padded_average, renormalised
from raflora.math.methods.registry import Method, register_with_svd_variant


def rblora(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """Zero-padded average with column j weighted p_k / Σ_{r_k' > j} p_k'."""
    r_max = max(c.ranks)
    q = renormalised(c.ranks, c.p, list(range(1, r_max + 1))).T  # (K, r_max)
    return padded_average(c, q)


PAPER = "RB-LoRA: rank-balanced aggregation of heterogeneous LoRA, EACL 2026 Findings"
WIRE = "down Σ_k r_k (m + n), up Σ_k r_k (m + n)"
register_with_svd_variant(
    Method(
        name="rblora",
        summary="RB-LoRA: padded average, index j over the clients with r_k > j; slice allocation",
        paper=PAPER,
        aggregate=rblora,
        allocation="slice",
        wire=WIRE,
    ),
    "RB-LoRA aggregate with SVD allocation (best rank-r_k truncation of B̄ Ā)",
)
