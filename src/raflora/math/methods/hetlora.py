"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024, arXiv 2401.06432): zero-padding with sparsity-weighted aggregation, local
rank self-pruning and truncation-based distribution.

Server: pad every client to r_max and weight client k by the norm of its update,

    q_k = ‖B_k A_k‖_F / Σ_k' ‖B_k' A_k'‖_F   (× p_k with ``data_weighted``),
    B̄ = Σ_k q_k [B_k 0],  Ā = Σ_k q_k [A_k; 0];

a client of rank r starts the next round from ``B̄[:, :r]``, ``Ā[:r, :]``.

Client: a client of rank r adds to its local loss, for every module,

    λ · ‖B[:, ⌊γr⌋:r]‖_F · ‖A[⌊γr⌋:r, :]‖_F,

pushing its tail directions towards zero, and after training, while that tail norm is below
``prune_threshold``, drops them, r ← ⌊γr⌋ (never below 1), sending the smaller factors; the
server keeps the smaller rank for that client. Defaults follow the paper's setting of
γ = 0.99 and a regulariser λ = 5·10⁻⁴ with pruning on; ``hetlora_svd`` allocates by SVD.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from raflora.math._arrays import Clients, validate_pair
from raflora.math.lowrank import _frobenius
from raflora.math.methods._common import padded_average, per_client
from raflora.math.methods.registry import Factors, Method, PenaltyFn, register_with_svd_variant


def _number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r} must be a finite number")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f"≥ {low}"
        raise ValueError(f"{name} = {value!r} must be {bound}")
    return float(value)


@dataclass(frozen=True)
class HetloraOptions:
    data_weighted: bool = False  # multiply the norm weights ‖B_k A_k‖_F by the data sizes
    reg_lambda: float = 5e-4  # λ of the tail regulariser (0: off)
    gamma: float = 0.99  # pruning ratio γ ∈ (0, 1): the tail is directions ⌊γr⌋..r
    prune_threshold: float = 1e-3  # prune while the tail norm is below this (0: never)

    def __post_init__(self) -> None:
        if not isinstance(self.data_weighted, bool):
            raise ValueError(f"data_weighted must be a bool, got {self.data_weighted!r}")
        _number("reg_lambda", self.reg_lambda, 0.0)
        _number("prune_threshold", self.prune_threshold, 0.0)
        if _number("gamma", self.gamma, 0.0, 1.0) == 0.0:
            raise ValueError(f"gamma = {self.gamma!r} must be in (0, 1)")


def hetlora(c: Clients, opts: HetloraOptions) -> tuple[Tensor, Tensor]:
    """Zero-padding with weights ∝ ‖B_k A_k‖_F (× p_k optionally); p_k if all updates are 0."""
    norms = [float(_frobenius(Bk, Ak)) for Bk, Ak in zip(c.Bs, c.As, strict=True)]
    raw = [nk * pk for nk, pk in zip(norms, c.p, strict=True)] if opts.data_weighted else norms
    total = math.fsum(raw)
    q = [v / total for v in raw] if total > 0 else list(c.p)
    return padded_average(c, per_client(c, q))


def _tail(B: Tensor, A: Tensor, rank: int, gamma: float) -> Tensor:
    """‖B[:, s:rank]‖_F · ‖A[s:rank, :]‖_F with s = ⌊γ·rank⌋."""
    s = math.floor(gamma * rank)
    return torch.linalg.norm(B[:, s:rank]) * torch.linalg.norm(A[s:rank])


def tail_regularizer(B: Any, A: Any, gamma: float) -> Any:
    """HetLoRA's tail norm ‖B[:, ⌊γr⌋:r]‖_F · ‖A[⌊γr⌋:r, :]‖_F (multiply by λ in the loss).

    Differentiable for torch inputs (returns a 0-d tensor); a float for numpy inputs.
    """
    gamma = HetloraOptions(gamma=gamma).gamma
    Bt, At, backend = validate_pair(B, A)
    value = _tail(Bt, At, Bt.shape[1], gamma)
    return value if backend.library == "torch" else float(value)


def prune_rank(B: Any, A: Any, gamma: float, threshold: float) -> int:
    """New rank after self-pruning: r ← ⌊γr⌋ while the tail norm is below ``threshold``.

    Never returns less than 1; returns r unchanged when the tail is at or above threshold.
    Keep the leading ``new_rank`` columns of B and rows of A.
    """
    opts = HetloraOptions(gamma=gamma, prune_threshold=threshold)
    Bt, At, _ = validate_pair(B, A)
    rank = int(Bt.shape[1])
    with torch.no_grad():
        while rank > 1 and float(_tail(Bt, At, rank, opts.gamma)) < opts.prune_threshold:
            rank = max(1, math.floor(opts.gamma * rank))
    return rank


def penalty(opts: HetloraOptions) -> PenaltyFn | None:
    """λ ‖B[:, ⌊γr⌋:]‖·‖A[⌊γr⌋:, :]‖ per module, or None when λ = 0."""
    if opts.reg_lambda == 0:
        return None

    def term(B: Tensor, A: Tensor) -> Tensor:
        return opts.reg_lambda * _tail(B, A, B.shape[1], opts.gamma)

    return term


def prune(opts: HetloraOptions, factors: dict[str, Factors]) -> dict[str, Factors]:
    """Self-pruning: the client's new rank is the largest any of its modules still needs."""
    if opts.prune_threshold == 0 or not factors:
        return factors
    new_rank = max(prune_rank(B, A, opts.gamma, opts.prune_threshold) for B, A in factors.values())
    return {name: (B[:, :new_rank].copy(), A[:new_rank].copy()) for name, (B, A) in factors.items()}


PAPER = (
    "Cho, Liu, Manoel, Joshi, Xu, Cheng, Wang, Chen, Kim, Tiwari, Wang, "
    "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, EMNLP 2024"
)
WIRE = "down Σ_k r_k (m + n), up Σ_k r'_k (m + n) (r'_k ≤ r_k after pruning)"
register_with_svd_variant(
    Method(
        name="hetlora",
        summary="HetLoRA (Cho et al. 2024): norm-weighted padding, self-pruning, slices",
        paper=PAPER,
        aggregate=hetlora,
        allocation="slice",
        ranks_may_shrink=True,
        options=HetloraOptions,
        penalty=penalty,
        prune=prune,
        wire=WIRE,
    ),
    "HetLoRA aggregate and client hooks with SVD allocation",
)
