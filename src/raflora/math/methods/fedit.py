"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024; code github.com/JayZhang42/FederatedGPT-Shepherd): FedAvg of the LoRA factors.

All clients share one rank r; the server averages each factor separately and sends the
averages back unchanged (no re-factorisation), so every client starts round t + 1 from

    B̄ = Σ_k p_k B_k (m, r),   Ā = Σ_k p_k A_k (r, n).

B̄ Ā is not Σ p_k B_k A_k (the averaging of factors is inexact; FedEx-LoRA and FLoRA fix this).
Bytes per round and module: r (m + n) floats down and up per client.
"""

from __future__ import annotations

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import padded_average, per_client
from raflora.math.methods.registry import Method, register


def fedit(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """(Σ p_k B_k, Σ p_k A_k) for clients of one rank."""
    return padded_average(c, per_client(c, c.p))


register(
    Method(
        name="fedit",
        summary="FedIT (Zhang et al. 2024): average B and A separately; equal ranks only",
        paper="Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, "
        "ICASSP 2024",
        code="https://github.com/JayZhang42/FederatedGPT-Shepherd",
        aggregate=fedit,
        allocation="slice",
        equal_ranks=True,
        wire="down K r (m + n), up K r (m + n)",
    )
)
