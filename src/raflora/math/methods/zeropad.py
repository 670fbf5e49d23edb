"""Zero-padding (the heterogeneous-rank FedIT baseline, as in Cho et al., EMNLP 2024, and
Bai et al., NeurIPS 2024): pad every client's factors with zeros to r_max and average them.

    B̄ = Σ_k p_k [B_k 0] (m, r_max),   Ā = Σ_k p_k [A_k; 0] (r_max, n)

The server keeps (B̄, Ā); a client of rank r starts from ``B̄[:, :r]``, ``Ā[:r, :]``.
``zeropad_svd`` keeps the same aggregate but allocates the best rank-r truncation of B̄ Ā
(the "SVD-based allocation" variant the raFLoRA paper compares against).
"""

from __future__ import annotations

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import padded_average, per_client
from raflora.math.methods.registry import Method, register_with_svd_variant


def zeropad(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """(Σ p_k B̃_k, Σ p_k Ã_k) with B̃_k, Ã_k zero-padded to r_max."""
    return padded_average(c, per_client(c, c.p))


PAPER = (
    "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, "
    "EMNLP 2024 (zero-padding baseline)"
)
WIRE = "down Σ_k r_k (m + n), up Σ_k r_k (m + n)"
register_with_svd_variant(
    Method(
        name="zeropad",
        summary="Zero-padding: pad to r_max, average B and A; clients get the leading slices",
        paper=PAPER,
        aggregate=zeropad,
        allocation="slice",
        wire=WIRE,
    ),
    "Zero-padding aggregate with SVD allocation (best rank-r_k truncation of B̄ Ā)",
)
