"""SVD of a low-rank product ``B @ A`` from small decompositions, and its truncation.

For B of shape (m, R) and A of shape (R, n), with R small:

    B  = Q_B R_B           reduced QR,  Q_B (m, k1), R_B (k1, R), k1 = min(m, R)
    Aᵀ = Q_A R_A           reduced QR,  Q_A (n, k2), R_A (k2, R), k2 = min(n, R)
    B A = Q_B (R_B R_Aᵀ) Q_Aᵀ,   core R_B R_Aᵀ = U_c S V_cᵀ   (k1, k2)
    B A = (Q_B U_c) S (V_cᵀ Q_Aᵀ) = U S Vᵀ,   k = min(m, n, R) singular values

costing O((m + n) R² + R³) and never forming the m×n product. By Eckart–Young the best rank-r
approximation of B A is U_r S_r V_rᵀ, split into factors as ``"us"`` (B_r = U_r S_r,
A_r = V_rᵀ, FlexLoRA) or ``"sqrt"`` (B_r = U_r √S_r, A_r = √S_r V_rᵀ).

:func:`allocate` needs only the top r_max = max(ranks) triplets, and takes a faster route with
the same result (Cholesky QR): from the R×R Gram matrices (half the flops of Householder QR,
all in matrix products),

    BᵀB = L Lᵀ (Cholesky),  Q = B L⁻ᵀ orthonormal,  B A = Q (Lᵀ A)
    (Lᵀ A)(Lᵀ A)ᵀ = Lᵀ (A Aᵀ) L = U_c S² U_cᵀ                    (R×R symmetric eigenproblem)
    U_r = B (L⁻ᵀ U_c[:, :r]),  V_rᵀ = S_r⁻¹ U_c[:, :r]ᵀ Lᵀ A       (m×r and r×n products only)

Its rounding error grows with the conditioning of B's columns, so when that Cholesky factor is
singular or ill-conditioned for the dtype (e.g. a zero or a duplicated column) it tries the same
with Aᵀ, then falls back to the QR route above.

:func:`significant_svd` (the server's global state) takes the same route for every direction
above a threshold at once, and keeps it when it is orthonormal to the precision the result
will be stored in (float32; ‖UᵀU − I‖_F estimated with random probes), else Householder QR.
:func:`significant_values` gives its singular values alone (no m×R products, no eigenvectors).

When R ≥ min(m, n) (e.g. 50 clients' stacked updates of a 1024×1024 module) the factors hold at
least as many numbers as B A and the factored routes cost more than a dense SVD, so every
function here forms the product and decomposes it densely instead.

Signs are fixed so that the largest-magnitude entry of each column of U is positive, which
makes allocations reproducible across runs and array libraries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.math._arrays import validate_pair

SPLITS = ("us", "sqrt")


def _fix_signs(U: Tensor, S: Tensor, Vt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic signs: the largest-|.| entry of each column of U is positive (in place);
    of a tie between +x and −x, +x counts as the largest. Column maxima and minima, two
    streaming reductions (an argmax of |U| down the columns costs 3–5× more at R ≈ 500)."""
    if U.shape[0] == 0:
        return U, S, Vt
    flip = U.amax(dim=0) < -U.amin(dim=0)  # (k,): the largest |entry| is negative
    signs = 1.0 - 2.0 * flip.to(U.dtype)
    return U.mul_(signs), S, Vt.mul_(signs[:, None])


def _is_wide(B: Tensor, A: Tensor) -> bool:
    """R ≥ min(m, n): the factors hold at least as many numbers as the product B A, and a
    factored decomposition costs more than a dense one (QR of an m×R matrix with R ≥ m, a core
    as large as B A itself), so the product is formed instead."""
    return B.shape[1] >= min(B.shape[0], A.shape[1])


def _dense_svd(B: Tensor, A: Tensor, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the formed product W = B @ A (m, n): U (m, top), S (k,), Vt (top, n)."""
    U, S, Vt = torch.linalg.svd(B @ A, full_matrices=False)  # (m, k), (k,), (k, n)
    if top is not None and top < S.shape[0]:
        U, Vt = U[:, :top].contiguous(), Vt[:top].contiguous()  # do not pin the full U, Vt
    return _fix_signs(U, S, Vt)


def _svd(B: Tensor, A: Tensor, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A on torch tensors: U (m, k), S (k,), Vt (k, n), k = min(m, n, R),
    or only the first ``top`` triplets (then S still has all k values)."""
    if _is_wide(B, A):
        return _dense_svd(B, A, top)
    Q_B, R_B = torch.linalg.qr(B)  # (m, k1), (k1, R)
    Q_A, R_A = torch.linalg.qr(A.mT)  # (n, k2), (k2, R)
    U_c, S, Vt_c = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)  # (k1, k), (k,), (k, k2)
    U = Q_B @ U_c[:, :top]  # (m, top)
    Vt = Vt_c[:top] @ Q_A.mT  # (top, n)
    return _fix_signs(U, S, Vt)


# Cholesky QR is tried when eps(dtype) · κ² < _CHOLESKY_LIMIT (κ estimated from the Cholesky
# factor of the column-equilibrated Gram matrix; float64: κ ≲ 7e6, float32: κ ≲ 290), and kept
# when its singular vectors are orthonormal to _ORTHO_TOL · eps(dtype). Its error in the product
# tracks that loss of orthogonality (about 10×), which stays at rounding level unless the top
# directions of B A come from directions in which B or A is tiny.
_CHOLESKY_LIMIT = 1e-2
_ORTHO_TOL = 512


def _upper_tiles(R: int, blocks: int | None = None) -> list[tuple[slice, slice]]:
    """The tiles (rows, cols) on and above the diagonal of a b×b tiling of an R×R matrix:
    b = 1 below R = 256, b = 2 up to R ≈ 400, more for larger R (at most 6)."""
    blocks = 1 if R < 256 and blocks is None else blocks or min(6, max(2, R // 192))
    edges = [R * i // blocks for i in range(blocks + 1)]
    cuts = [slice(lo, hi) for lo, hi in pairwise(edges)]
    return [(a, b) for i, a in enumerate(cuts) for b in cuts[i:]]


def _gram(X: Tensor, blocks: int | None = None) -> Tensor:
    """XᵀX (R, R) for X (m, R). Symmetric, so for R ≥ 256 only the blocks on and above the
    diagonal of a b×b tiling are multiplied, (b + 1)/(2b) of the flops (BLAS has syrk for this;
    torch does not expose it). Equal to X.mT @ X up to rounding."""
    R = X.shape[1]
    if R < 256 and blocks is None:
        return X.mT @ X
    return _summed_gram([X], R, blocks)


def _summed_gram(parts: Iterable[Tensor], R: int, blocks: int | None = None) -> Tensor:
    """Σ XᵀX (R, R) over one or more row blocks X (h, R) of a matrix, multiplying only the tiles
    on and above the diagonal (:func:`_upper_tiles`), then mirroring them below it."""
    tiles = _upper_tiles(R, blocks)
    G = None
    for X in parts:
        G = X.new_zeros(R, R) if G is None else G
        for a, b in tiles:
            G[a, b].addmm_(X[:, a].mT, X[:, b])
    assert G is not None, "no blocks"
    for a, b in tiles:
        if a != b:
            G[b, a] = G[a, b].mT
    return G


def _gram_cholesky(X: Tensor) -> Tensor | None:
    """Lower-triangular L (R, R) with XᵀX = L Lᵀ for X (m, R), or None when XᵀX is singular or
    too ill-conditioned for X's dtype (a zero or near-duplicate column)."""
    return _cholesky_of_gram(_gram(X))


def _cholesky_of_gram(G: Tensor) -> Tensor | None:
    """Lower-triangular L (R, R) with G = L Lᵀ for a Gram matrix G = XᵀX (overwritten), or None
    when G is singular or too ill-conditioned for its dtype (a zero or near-duplicate column)."""
    d = G.diagonal().sqrt()  # column norms
    if not bool((d > 0).all()):
        return None
    L, info = torch.linalg.cholesky_ex(G.div_(d[:, None]).div_(d))  # equilibrated, in place
    del G
    if int(info) != 0:
        return None
    smallest = float(L.diagonal().min())  # ≈ 1/κ of the equilibrated columns
    if smallest <= 0 or torch.finfo(L.dtype).eps / smallest**2 > _CHOLESKY_LIMIT:
        return None
    return L.mul_(d[:, None])  # XᵀX = D G̃ D = (D L̃)(D L̃)ᵀ


def _core(L: Tensor, G_Y: Tensor) -> Tensor:
    """Lᵀ G_Y L (R, R): (Lᵀ Y)(Lᵀ Y)ᵀ, whose eigenvalues are the σ² of X Y when XᵀX = L Lᵀ."""
    return L.mT @ (G_Y @ L)


def _core_maps(
    L: Tensor, G_Y: Tensor, top: int, rtol: float | None = None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """For X (m, R), Y (R, n) with XᵀX = L Lᵀ and G_Y = Y Yᵀ (R, R): the maps M_X, M_Y (R, top)
    and S (top,) with U = X M_X, Vᵀ = M_Yᵀ Y the top triplets of X Y. With Q = X L⁻ᵀ
    orthonormal, X Y = Q (Lᵀ Y) and (Lᵀ Y)(Lᵀ Y)ᵀ = Lᵀ G_Y L = U_c S² U_cᵀ (R×R eigh), so
    M_X = L⁻ᵀ U_c and M_Y = L U_c S⁻¹. With ``rtol``, only the singular values above
    rtol · σ_1 count (at most ``top`` of them). None if a top singular value is 0."""
    out = _core_maps_and_values(L, G_Y, top, rtol)
    return None if out is None else out[:3]


def _core_maps_and_values(
    L: Tensor, G_Y: Tensor, top: int, rtol: float | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """:func:`_core_maps` plus every singular value of X Y from the same eigendecomposition,
    σ (R,) descending (σ_i² = λ_i, clamped at 0)."""
    H = _core(L, G_Y)
    lam, W = torch.linalg.eigh(H)  # ascending
    del H
    sigma = lam.flip(0).clamp(min=0).sqrt()  # (R,) descending
    if rtol is not None:
        top = min(top, _count_above(sigma, rtol))
        if top == 0:
            return None
    U_c = W[:, -top:].flip(-1)  # (R, top), a copy
    S = sigma[:top].clone()  # (top,)
    del W, lam
    if not bool((S > 0).all()):
        return None
    M_X = torch.linalg.solve_triangular(L.mT, U_c, upper=True)  # L⁻ᵀ U_c (R, top)
    return M_X, (L @ U_c) / S, S, sigma


def _orthonormal(U: Tensor, Vt: Tensor, tol: float | None = None) -> bool:
    """UᵀU = I and Vᵀ V = I to within ``tol`` entry-wise (default _ORTHO_TOL · eps(dtype))."""
    tol = _ORTHO_TOL * torch.finfo(U.dtype).eps if tol is None else tol
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    drift = max(float((U.mT @ U - eye).abs().max()), float((Vt @ Vt.mT - eye).abs().max()))
    return drift <= tol


# Gaussian probes of the orthonormality estimate, and the margin the estimate must clear:
# for a symmetric drift E with eigenvalues λ_i, ‖E Z‖_F² / p ~ Σ λ_i² χ²_p,i / p; its lower tail is
# heaviest for a rank-one E, where it falls below ‖E‖_F² / 10² with P(χ²_8 < 0.08) ≈ 1e-7.
_PROBES = 8
_PROBE_MARGIN = 10.0


def _orthonormal_estimate(U: Tensor, Vt: Tensor, tol: float) -> bool:
    """‖UᵀU − I‖_F ≤ tol and ‖Vt Vtᵀ − I‖_F ≤ tol, estimated from p = 8 fixed Gaussian probes
    Z (k, p): E‖(UᵀU − I) Z‖_F² = p ‖UᵀU − I‖_F², and the estimate must clear tol by a factor
    10. Costs 4 (m + n) k p flops instead of the 2 (m + n) k² of forming UᵀU and Vt Vtᵀ
    (U (m, k), Vt (k, n): 30× less at k = 540). Deterministic (seeded probes)."""
    generator = torch.Generator(device=U.device).manual_seed(0)
    Z = torch.randn(U.shape[1], _PROBES, generator=generator, dtype=U.dtype, device=U.device)
    for X in (U, Vt.mT):  # (m, k), (n, k)
        if _PROBE_MARGIN * float(_gram_times(X, Z).sub_(Z).norm()) / math.sqrt(_PROBES) > tol:
            return False
    return True


def _gram_times(X: Tensor, Z: Tensor, rows: int = 256) -> Tensor:
    """XᵀX Z (k, p) for X (h, k), Z (k, p), as Σ X_iᵀ (X_i Z) over blocks of ``rows`` rows, each
    read twice while it is in cache (half the memory traffic of Xᵀ (X Z))."""
    out = Z.new_zeros(Z.shape)
    for start in range(0, X.shape[0], rows):
        block = X[start : start + rows]  # (rows, k)
        out.addmm_(block.mT, block @ Z)
    return out


def _one_sided(
    X: Tensor,
    Y: Tensor,
    top: int,
    rtol: float | None = None,
    check: Callable[[Tensor, Tensor], bool] = _orthonormal,
    all_values: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top triplets U (m, top), S, Vt (top, n) of X @ Y, X (m, R), Y (R, n), by Cholesky QR of
    X, XᵀX = L Lᵀ (see :func:`_core_maps`; with ``rtol``, at most ``top`` triplets above
    rtol · σ_1). With ``all_values``, S holds every singular value above rtol · σ_1 (from the
    same eigendecomposition), not only the top ones. None if XᵀX is too ill-conditioned or
    ``check(U, Vt)`` (orthonormality) fails."""
    L = _gram_cholesky(X)
    out = None if L is None else _core_maps_and_values(L, _gram(Y.mT), top, rtol)
    if out is None:
        return None
    M_X, M_Y, S, sigma = out
    if all_values:
        S = sigma[: _count_above(sigma, rtol or 0.0)]
    U, Vt = X @ M_X, M_Y.mT @ Y  # (m, top), (top, n)
    return (U, S, Vt) if check(U, Vt) else None


def _either_side(
    route: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor] | None], B: Tensor, A: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``route(B, A)``, else ``route(Aᵀ, Bᵀ)`` transposed back ((B A)ᵀ = Aᵀ Bᵀ), else None."""
    out = route(B, A)
    if out is not None:
        return out
    mirrored = route(A.mT, B.mT)
    if mirrored is None:
        return None
    return mirrored[2].mT.contiguous(), mirrored[1], mirrored[0].mT.contiguous()


def _top_svd(B: Tensor, A: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``top`` triplets U (m, top), S (top,), Vt (top, n) of B @ A: Cholesky QR of B
    (or, failing that, of Aᵀ), else Householder QR; the dense product when R ≥ min(m, n)."""
    if _is_wide(B, A):  # _svd forms the product: no factored route is cheaper
        U, S, Vt = _svd(B, A, top)
        return U, S[:top], Vt
    out = _either_side(lambda X, Y: _one_sided(X, Y, top), B, A)
    if out is None:
        U, S, Vt = _svd(B, A, top)
        out = (U, S[:top], Vt)
    return _fix_signs(*out)


def _svdvals(B: Tensor, A: Tensor) -> Tensor:
    """Singular values of B @ A (descending, length min(m, n, R)) on torch tensors."""
    if _is_wide(B, A):
        return torch.linalg.svdvals(B @ A)
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

    Householder QR throughout: every triplet is accurate to the dtype, however spread the
    spectrum (the Cholesky QR route of :func:`allocate` is accurate for the top triplets only).
    """
    Bt, At, backend = validate_pair(B, A)
    return tuple(backend.out(x) for x in _svd(Bt, At))  # type: ignore[return-value]


def _check_rtol(rtol: Any) -> None:
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number ≥ 0, got {rtol!r}")


def _gram_route_resolves(B: Tensor, A: Tensor, rtol: float) -> bool:
    """Whether the Gram/eigenvalue route can serve a threshold rtol on B A: σ comes from σ²
    (an eigenvalue, error ≈ eps · σ_1²), resolvable only above ≈ 8 √eps · σ_1; and R < min(m, n)
    (else the product is formed densely)."""
    return rtol**2 > 64 * torch.finfo(B.dtype).eps and not _is_wide(B, A)


def _count_above(S: Tensor, rtol: float) -> int:
    """How many of the descending values S exceed rtol · S[0] (0 when S is empty or zero)."""
    return int((rtol * S[0] < S).sum()) if S.numel() and S[0] > 0 else 0


def significant_svd(B: Any, A: Any, rtol: float, storage: Any = np.float32) -> tuple[Any, Any, Any]:
    """Thin SVD of ``B @ A`` restricted to the directions with σ_i > rtol · σ_1, accurate to
    the dtype the caller will store it in.

    Args:
        B: (m, R), A: (R, n), as for :func:`factored_svd` (compute in float64 for float32
            storage).
        rtol: relative threshold on the singular values, ≥ 0.
        storage: dtype the result will be kept in (numpy or torch dtype).

    Returns:
        ``U`` (m, k), ``S`` (k,), ``Vt`` (k, n) with k the number of kept directions (0 for a
        zero product), in the input's library and dtype.

    Takes the Cholesky route of :func:`allocate` (from B's Gram matrix, else from Aᵀ's) for
    all kept triplets at once (two Gram products and one R×R eigendecomposition instead of two
    Householder QRs, their Q factors and two m×R×R products: 1.6–2× faster at LLaMA shapes)
    when its singular vectors are orthonormal to eps(storage) in Frobenius norm (estimated from
    random probes, :func:`_orthonormal_estimate`); otherwise, for R ≥ min(m, n),
    and for rtol ≤ 8 √eps(dtype) (σ below that are lost in the eigenvalues σ²),
    :func:`factored_svd` and the threshold.
    """
    _check_rtol(rtol)
    Bt, At, backend = validate_pair(B, A)
    eps = (
        float(np.finfo(storage).eps)
        if not isinstance(storage, torch.dtype)
        else float(torch.finfo(storage).eps)
    )
    out = None
    if _gram_route_resolves(Bt, At, rtol):
        check = partial(_orthonormal_estimate, tol=eps)
        out = _either_side(lambda X, Y: _one_sided(X, Y, X.shape[1], rtol, check), Bt, At)
    if out is not None:
        out = _fix_signs(*out)
    else:
        U, S, Vt = _svd(Bt, At)
        keep = _count_above(S, rtol)
        out = (U[:, :keep], S[:keep], Vt[:keep])
    return tuple(backend.out(x) for x in out)  # type: ignore[return-value]


def _gram_values(X: Tensor, Y: Tensor) -> Tensor | None:
    """σ² of X Y (descending, length R) for X (m, R), Y (R, n): the eigenvalues of
    Lᵀ (Y Yᵀ) L with XᵀX = L Lᵀ (:func:`_core_maps` without the vectors), or None when XᵀX is
    too ill-conditioned for the Cholesky route."""
    L = _gram_cholesky(X)
    if L is None:
        return None
    return torch.linalg.eigvalsh(_core(L, _gram(Y.mT))).flip(0).clamp_(min=0)


def significant_values(B: Any, A: Any, rtol: float) -> Any:
    """The singular values σ_i > rtol · σ_1 of ``B @ A`` (descending), those of
    :func:`significant_svd` without the vectors.

    Args:
        B: (m, R), A: (R, n), as for :func:`factored_svd`.
        rtol: relative threshold on the singular values, ≥ 0.

    Returns:
        ``S`` (k,) in the input's library and dtype (k = 0 for a zero product).

    From the Gram matrices (two R×R products, a Cholesky factor and the eigenvalues of one
    R×R matrix: no m×R products, no eigenvectors), B's side or else Aᵀ's. Each σ_i² comes with
    an absolute error of a modest multiple of eps(dtype) · σ_1² (growing with the conditioning
    of the Cholesky factor), so σ_i to a relative (σ_1 / σ_i)² times that: for rtol ≤
    8 √eps(dtype), for R ≥ min(m, n) and when neither Gram matrix admits a Cholesky factor it
    is :func:`spectrum` (Householder QR) and the threshold instead.
    """
    _check_rtol(rtol)
    Bt, At, backend = validate_pair(B, A)
    squares = None
    if _gram_route_resolves(Bt, At, rtol):
        squares = _gram_values(Bt, At)
        squares = _gram_values(At.mT, Bt.mT) if squares is None else squares
    S = _svdvals(Bt, At) if squares is None else squares.sqrt()
    return backend.out(S[: _count_above(S, rtol)])


def leading_svd(B: Any, A: Any, top: int, rtol: float) -> tuple[Any, Any, Any]:
    """The singular values σ_i > rtol · σ_1 of ``B @ A`` and its first ``top`` singular
    triplets, from one decomposition (the server's adapter update: clients get the top
    triplets, diagnostics read the spectrum).

    Args:
        B: (m, R), A: (R, n), as for :func:`factored_svd` (float64 for float32 storage).
        top: how many triplets, ≥ 0 (the federation's largest rank).
        rtol: relative threshold on the singular values, ≥ 0.

    Returns:
        ``U`` (m, t), ``S`` (k,) descending, ``Vt`` (t, n), with k the number of values above
        the threshold and t = min(top, k), in the input's library and dtype.

    The Cholesky route of :func:`allocate` (B's side, else Aᵀ's) with every eigenvalue kept:
    the cost of :func:`allocate`, i.e. of :func:`significant_values` plus the m×R and R×n
    products of t columns (not k as in :func:`significant_svd`). The values carry the
    accuracy of :func:`significant_values`, the triplets that of :func:`allocate`; for
    rtol ≤ 8 √eps(dtype), for R ≥ min(m, n), and when neither side's vectors come out
    orthonormal it is Householder QR (or the dense product) and the threshold.
    """
    _check_rtol(rtol)
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
        raise ValueError(f"top must be an integer ≥ 0, got {top!r}")
    Bt, At, backend = validate_pair(B, A)
    out = None
    if top and _gram_route_resolves(Bt, At, rtol):
        route = partial(_one_sided, top=int(top), rtol=rtol, all_values=True)
        out = _either_side(route, Bt, At)
    if out is None:
        U, S, Vt = _svd(Bt, At, int(top))  # U (m, top), S (min(m, n, R),), Vt (top, n)
        S = S[: _count_above(S, rtol)]
        t = min(int(top), S.shape[0])
        out = (U[:, :t], S, Vt[:t])
    U, S, Vt = out
    U, _, Vt = _fix_signs(U.contiguous(), S, Vt.contiguous())
    return tuple(backend.out(x) for x in (U, S, Vt))  # type: ignore[return-value]


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


def rank_list(rank: Any, available: int) -> tuple[list[int], bool]:
    """``rank`` (an int or a sequence of ints) as a list of checked ranks, and whether it was a
    single int."""
    single = isinstance(rank, (int, np.integer))
    if not single and not isinstance(rank, (Sequence, np.ndarray)):
        raise ValueError(f"rank must be an int or a sequence of ints, got {type(rank).__name__}")
    ranks = [rank] if single else list(rank)
    if not ranks:
        raise ValueError("rank is an empty sequence; give at least one rank")
    for r in ranks:
        check_rank(r, available)
    return ranks, single


def shares(
    U: Tensor, S: Tensor, Vt: Tensor, ranks: list[int], split: str
) -> list[tuple[Tensor, Tensor]]:
    """Every rank's factors as leading slices of one pair, (U S)[:, :r] = U_r S_r (``"us"``) or
    U_r √S_r, √S_r V_rᵀ (``"sqrt"``), from the top triplets U (m, r_max), S, Vt (r_max, n);
    U and Vt are scaled in place."""
    if split == "us":
        B_all, A_all = U.mul_(S), Vt  # (m, r_max), (r_max, n)
    else:
        root = S.sqrt()
        B_all, A_all = U.mul_(root), Vt.mul_(root[:, None])
    return [(B_all[:, :r], A_all[:r]) for r in ranks]


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
        All pairs are views of one (m, r_max) and one (r_max, n) array (no copy per rank):
        copy one before changing it in place.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    Bt, At, backend = validate_pair(B, A)
    ranks, single = rank_list(rank, min(Bt.shape[0], At.shape[1], Bt.shape[1]))
    U, S, Vt = _top_svd(Bt, At, max(ranks))  # (m, r_max), (r_max,), (r_max, n)
    pairs = [(backend.out(Br), backend.out(Ar)) for Br, Ar in shares(U, S, Vt, ranks, split)]
    return pairs[0] if single else pairs  # type: ignore[return-value]
