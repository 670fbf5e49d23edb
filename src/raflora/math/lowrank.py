"""SVD of a low-rank product ``B @ A`` from small decompositions, and its truncation.

For B of shape (m, R) and A of shape (R, n), with R small:

    B  = Q_B R_B           reduced QR,  Q_B (m, k1), R_B (k1, R), k1 = min(m, R)
    Aᵀ = Q_A R_A           reduced QR,  Q_A (n, k2), R_A (k2, R), k2 = min(n, R)
    B A = Q_B (R_B R_Aᵀ) Q_Aᵀ,   core R_B R_Aᵀ = U_c S V_cᵀ   (k1, k2)
    B A = (Q_B U_c) S (V_cᵀ Q_Aᵀ) = U S Vᵀ,   k = min(m, n, R) singular values

costing O((m + n) R² + R³) and never forming the m×n product. By Eckart–Young the best rank-r
approximation of B A is U_r S_r V_rᵀ, split into factors as ``"us"`` (B_r = U_r S_r,
A_r = V_rᵀ, FlexLoRA) or ``"sqrt"`` (B_r = U_r √S_r, A_r = √S_r V_rᵀ).

Signs are fixed so that the largest-magnitude entry of each column of U is positive, which
makes allocations reproducible across runs and array libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.math._arrays import validate_pair

SPLITS = ("us", "sqrt")


def _svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A on torch tensors: U (m, k), S (k,), Vt (k, n), k = min(m, n, R)."""
    Q_B, R_B = torch.linalg.qr(B)  # (m, k1), (k1, R)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (n, k2), (k2, R)
    U_c, S, Vt_c = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)  # (k1, k), (k,), (k, k2)
    U = Q_B @ U_c  # (m, k)
    Vt = Vt_c @ Q_A.mT  # (k, n)
    # Deterministic signs: the largest-|.| entry of each column of U is positive.
    pivot = U.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1], device=U.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, S, Vt * signs[:, None]


def _svdvals(B: Tensor, A: Tensor) -> Tensor:
    """Singular values of B @ A (descending, length min(m, n, R)) on torch tensors."""
    R_B = torch.linalg.qr(B, mode="r")[1]  # (k1, R)
    R_A = torch.linalg.qr(A.mT, mode="r")[1]  # (k2, R)
    return torch.linalg.svdvals(R_B @ R_A.mT)


def _frobenius(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F from the R×R Gram matrices: ‖BA‖² = Σ (BᵀB) ⊙ (A Aᵀ)."""
    sq = ((B.mT @ B) * (A @ A.mT)).sum()
    return sq.clamp(min=0).sqrt()


def factored_svd(B: Any, A: Any) -> tuple[Any, Any, Any]:
    """Thin SVD ``U, S, Vt`` of ``B @ A`` without forming it.

    Args:
        B: (m, R) numpy array or torch tensor, float32/float64.
        A: (R, n) array of the same library, dtype and device.

    Returns:
        ``U`` (m, k), ``S`` (k,) descending, ``Vt`` (k, n), with k = min(m, n, R), in the
        input's library, dtype and device. Slice it with :func:`truncate`.
    """
    Bt, At, backend = validate_pair(B, A)
    return tuple(backend.out(x) for x in _svd(Bt, At))  # type: ignore[return-value]


def spectrum(B: Any, A: Any) -> Any:
    """Singular values of ``B @ A`` (descending, length min(m, n, R)), same library as input."""
    Bt, At, backend = validate_pair(B, A)
    return backend.out(_svdvals(Bt, At))


def factored_norm(B: Any, A: Any) -> float:
    """Frobenius norm ‖B @ A‖_F computed from R×R Gram matrices."""
    Bt, At, _ = validate_pair(B, A)
    return float(_frobenius(Bt, At))


def check_rank(rank: Any, available: int) -> int:
    """A rank must be an integer in [1, available]."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank {rank!r} is not an integer")
    if not 1 <= rank <= available:
        raise ValueError(
            f"rank {rank} is out of range: the available rank is {available} (min(m, n, R))"
        )
    return int(rank)


def truncate(U: Any, S: Any, Vt: Any, rank: int, split: str = "us") -> tuple[Any, Any]:
    """Rank-``rank`` factors from an SVD (numpy or torch): ``"us"`` or ``"sqrt"`` split."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    r = check_rank(rank, int(S.shape[0]))
    if split == "us":
        return U[:, :r] * S[:r], Vt[:r]  # (m, r), (r, n)
    root = S[:r] ** 0.5
    return U[:, :r] * root, root[:, None] * Vt[:r]  # (m, r), (r, n)


def allocate(
    B: Any, A: Any, rank: int | Sequence[int], split: str = "us"
) -> tuple[Any, Any] | list[tuple[Any, Any]]:
    """Best rank-r factors of ``B @ A`` (Eckart–Young), from one factored SVD.

    Args:
        B: (m, R) global factor, numpy or torch, float32/float64.
        A: (R, n) global factor of the same library and dtype.
        rank: an int, or a sequence of ints (one decomposition serves all of them).
        split: ``"us"`` (B_r = U_r S_r, A_r = V_rᵀ) or ``"sqrt"`` (√S_r on both).

    Returns:
        ``(B_r, A_r)`` with shapes (m, r), (r, n) for an int rank, else a list of such pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    Bt, At, backend = validate_pair(B, A)
    available = min(Bt.shape[0], At.shape[1], Bt.shape[1])
    single = isinstance(rank, (int, np.integer))
    if not single and not isinstance(rank, (Sequence, np.ndarray)):
        raise ValueError(f"rank must be an int or a sequence of ints, got {type(rank).__name__}")
    ranks = [rank] if single else list(rank)  # type: ignore[arg-type]
    if not ranks:
        raise ValueError("rank is an empty sequence; give at least one rank")
    for r in ranks:
        check_rank(r, available)
    U, S, Vt = _svd(Bt, At)
    pairs = [tuple(backend.out(x) for x in truncate(U, S, Vt, r, split)) for r in ranks]
    return pairs[0] if single else pairs  # type: ignore[return-value]
