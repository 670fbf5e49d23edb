"""FLoRIST (Ramesh, Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models", arXiv 2506.09199, MLSys 2026; code
github.com/INFO-698-InfoSci-Capstone/federated-llm-optimization): stack, decompose in a
compact space, keep the directions holding a share τ of the energy, merge, restart.

Round t: clients train fresh LoRA modules of their own ranks r_k on the current base. The
server stacks them exactly (as FLoRA), B_s = [B_1 … B_K] (m, R), A_s = [p_1 A_1; …; p_K A_K]
(R, n), R = Σ r_k, so that B_s A_s = Σ_k p_k B_k A_k (here the weights sit on B's columns:
the same product, the same SVD), and decomposes the product without
forming it: the two stacks are factored separately and only the R×R core between them is
decomposed (here: B_s = Q_B R_B, A_sᵀ = Q_A R_A, R_B R_Aᵀ = U_c Σ V_cᵀ, the same singular
triplets as the paper's separate SVDs of the stacks), giving B_s A_s = U Σ Vᵀ. Singular value
thresholding keeps the smallest p whose energy share reaches τ,

    p = min { p : Σ_{i≤p} σ_i² ≥ τ Σ_i σ_i² },   B_g = U_p Σ_p (m, p),   A_g = V_pᵀ (p, n)

(the public code's split), one pair of global adapters for every client whatever its rank.
Clients merge it into their base, W ← W + B_g A_g, and start the next round from a fresh LoRA
(the public code merges the global adapters and re-initialises LoRA each round): apply "merge".

Why this 2025 method: it claims better accuracy–communication trade-offs than FedIT, FLoRA
and FlexLoRA with heterogeneous ranks, and its server step is stated completely (stacking,
compact SVD, one energy threshold τ) and matches its public code.

Bytes per round and module: p_t (m + n) floats down per client (the round's global adapters),
Σ_k r_k (m + n) up. Option ``threshold`` = τ ∈ (0, 1] (public code's default 0.9); τ = 1
keeps every direction, i.e. FLoRA's exact ΔW_t sent in compact SVD form.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.lowrank import _svd
from raflora.math.methods._common import client_columns, stacked
from raflora.math.methods.registry import Method, register


@dataclass(frozen=True)
class FloristOptions:
    threshold: float = 0.9  # τ: keep the fewest directions holding this share of σ² energy

    def __post_init__(self) -> None:
        t = self.threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, numbers.Real)
            or not math.isfinite(t)
            or not 0 < t <= 1
        ):
            raise ValueError(f"threshold = {t!r} must be a number in (0, 1] (energy share τ)")


def kept_rank(S: Tensor, threshold: float) -> int:
    """The smallest p with Σ_{i≤p} σ_i² ≥ τ Σ σ² (all k directions if rounding never reaches
    it; 1 for a zero update)."""
    energy = S.double() ** 2  # (k,)
    total = float(energy.sum())
    if total == 0.0:
        return min(1, int(S.shape[0]))
    reached = torch.nonzero(torch.cumsum(energy, 0) >= threshold * total)
    return int(reached[0]) + 1 if len(reached) else int(S.shape[0])


def florist(c: Clients, opts: FloristOptions) -> tuple[Tensor, Tensor]:
    """The thresholded global adapters (U_p Σ_p (m, p), V_pᵀ (p, n)) of Σ_k p_k B_k A_k."""
    B, A = stacked(c, client_columns(c))  # (m, R), (R, n): the exact weighted stack
    U, S, Vt = _svd(B, A)  # compact-space SVD of the product, (m, k), (k,), (k, n)
    p = kept_rank(S, opts.threshold)
    return U[:, :p] * S[:p], Vt[:p].clone()


register(
    Method(
        name="florist",
        summary="FLoRIST (Ramesh & Dass 2025): stack, SVD, keep τ of the energy, merge, fresh LoRA",
        paper="Ramesh, Dass, FLoRIST: Singular Value Thresholding for Efficient and Accurate "
        "Federated Fine-Tuning of Large Language Models, arXiv 2506.09199 (MLSys 2026)",
        code="https://github.com/INFO-698-InfoSci-Capstone/federated-llm-optimization",
        aggregate=florist,
        apply="merge",
        options=FloristOptions,
        wire="down K p_t (m + n) (the round's thresholded global adapters to each client), "
        "up Σ_k r_k (m + n)",
    )
)
