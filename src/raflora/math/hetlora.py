"""HetLoRA client-side rank self-pruning (Cho et al. 2024, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024).

A client of rank r with factors B (m, r), A (r, n) and pruning ratio γ ∈ (0, 1) adds

    λ · ‖B[:, ⌊γr⌋:r]‖_F · ‖A[⌊γr⌋:r, :]‖_F

to its local loss, pushing its tail directions towards zero; when that tail norm is below a
threshold it drops them, r ← ⌊γr⌋ (repeatedly, never below 1), and sends the smaller factors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from raflora.math._arrays import validate_pair


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < 1:
        raise ValueError(f"gamma = {gamma!r} must be a number in (0, 1)")
    return float(gamma)


def _tail(B: Tensor, A: Tensor, rank: int, gamma: float) -> Tensor:
    """‖B[:, s:rank]‖_F · ‖A[s:rank, :]‖_F with s = ⌊γ·rank⌋."""
    s = math.floor(gamma * rank)
    return torch.linalg.norm(B[:, s:rank]) * torch.linalg.norm(A[s:rank])


def tail_regularizer(B: Any, A: Any, gamma: float) -> Any:
    """HetLoRA's tail norm ‖B[:, ⌊γr⌋:r]‖_F · ‖A[⌊γr⌋:r, :]‖_F (multiply by λ in the loss).

    Differentiable for torch inputs (returns a 0-d tensor); a float for numpy inputs.
    """
    gamma = _check_gamma(gamma)
    Bt, At, backend = validate_pair(B, A)
    value = _tail(Bt, At, Bt.shape[1], gamma)
    return value if backend.library == "torch" else float(value)


def prune_rank(B: Any, A: Any, gamma: float, threshold: float) -> int:
    """New rank after self-pruning: r ← ⌊γr⌋ while the tail norm is below ``threshold``.

    Never returns less than 1; returns r unchanged when the tail is at or above threshold.
    Keep the leading ``new_rank`` columns of B and rows of A.
    """
    gamma = _check_gamma(gamma)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold = {threshold!r} must be a non-negative number")
    Bt, At, _ = validate_pair(B, A)
    rank = int(Bt.shape[1])
    with torch.no_grad():
        while rank > 1 and float(_tail(Bt, At, rank, gamma)) < threshold:
            rank = max(1, math.floor(gamma * rank))
    return rank
