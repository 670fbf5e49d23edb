"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024; code github.com/ATP-1010/FederatedLLM): stack, merge,
restart.

Round t: clients train fresh LoRA modules of their ranks from the current base; the server
stacks them, ΔW_t = [p_1 B_1 … p_K B_K] [A_1; …; A_K] (exact: Σ p_k B_k A_k, R = Σ r_k),
and sends the stacked factors to the clients, which merge them into their base weights,
W ← W + ΔW_t, and re-initialise their LoRA modules.

On the wire (``federation.merged_wire = "rounds"``, the default) each sampled client gets the
stacked factors of every round it has not merged yet, Σ_k r_k (m + n) floats per module and
round (the round's own clients' ranks); with full participation that is the previous round's
stack only. ``"total"`` sends the whole merged sum D_{t-1} as a thin SVD instead (stateless
clients, more bytes once D's rank exceeds a round's stack).
"""

from __future__ import annotations

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import client_columns, stacked
from raflora.math.methods.registry import Method, register


def flora(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """Σ p_k B_k A_k as stacked factors (rank Σ r_k), to be merged into the base."""
    return stacked(c, client_columns(c))


register(
    Method(
        name="flora",
        summary="FLoRA (Wang et al. 2024): stack Σ p_k B_k A_k, merge into the base, fresh LoRA",
        paper="Wang, Shen, Chen, Liang, Feng, Zhang, Ding, FLoRA: Federated Fine-Tuning Large "
        "Language Models with Heterogeneous Low-Rank Adaptations, NeurIPS 2024",
        code="https://github.com/ATP-1010/FederatedLLM",
        aggregate=flora,
        apply="merge",
        columns=client_columns,
        wire="down K Σ_k r_k (m + n) (the previous round's stack to each client; a client "
        "that missed rounds gets each one's stack), up Σ_k r_k (m + n)",
    )
)
