"""FFA-LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, arXiv 2403.12313): Federated Freeze-A LoRA. No official repository was found; the
paper's experiments build on FederatedScope-LLM, and FedSA-LoRA (Guo et al., ICLR 2025,
github.com/Pengxin-Guo/FedSA-LoRA) ships it as a baseline.

Every client's A is fixed at one shared random initialisation (the same for every client and
every round, derived here from the run seed and the module name: PEFT's kaiming-uniform init
drawn once, A_0 (r_max, n)); only the zero-initialised B is trained, sent and averaged:

    B̄ = Σ_k p_k B_k (m, r),   ΔW = B̄ A_0 = Σ_k p_k B_k A_0     (exact: A is shared)

Heterogeneous ranks (the paper has one rank for all clients): a client of rank r uses the
first r rows, A_0[:r]. Zero-padding B to r_max is the one average that keeps FFA-LoRA's
exactness, [B_k 0] A_0 = B_k A_0[:r_k], so

    B̄ = Σ_k p_k [B_k 0] (m, r_max),   ΔW = B̄ A_0 = Σ_k p_k B_k A_0[:r_k]   (exact);

a client of rank r starts the next round from ``B̄[:, :r]`` with ``A_0[:r]`` (slice allocation).
Like zero-padding, column j > r_min of B̄ is then refreshed only by the clients holding it and
kept with share c_j = Σ_{r_k > j} p_k each round (the rank collapse raFLoRA addresses).

Bytes per round and module: r_k m floats down and up per client (A never travels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import padded_average, per_client
from raflora.math.methods.registry import Method, register


def shared_rows(c: Clients) -> Tensor:
    """The shared A_0[:r_max] (r_max, n): the A of a largest-rank client, after checking that
    every client's A_k is its first r_k rows (FFA-LoRA's clients never change A)."""
    longest = c.As[max(range(len(c.ranks)), key=lambda k: c.ranks[k])]
    for k, Ak in enumerate(c.As):
        if not torch.equal(Ak, longest[: c.ranks[k]]):
            raise ValueError(
                f"ffa_lora: client {k}'s A is not the shared frozen A (its first {c.ranks[k]} "
                "rows); FFA-LoRA clients must keep A at the shared initialisation"
            )
    return longest


def ffa_lora(c: Clients, _: None) -> tuple[Tensor, Tensor]:
    """(Σ_k p_k [B_k 0], A_0[:r_max]): the zero-padded average of B with the shared A."""
    B, _ = padded_average(c, per_client(c, c.p))
    return B, shared_rows(c).clone()


register(
    Method(
        name="ffa_lora",
        summary="FFA-LoRA (Sun et al. 2024): A frozen at a shared seeded init, average B only",
        paper="Sun, Li, Li, Ding, Improving LoRA in Privacy-preserving Federated Learning, "
        "ICLR 2024",
        code="none official; baseline in https://github.com/Pengxin-Guo/FedSA-LoRA",
        aggregate=ffa_lora,
        allocation="slice",
        frozen_a=True,
        wire="down Σ_k r_k m, up Σ_k r_k m (B only; A is rebuilt from the run seed)",
    )
)
