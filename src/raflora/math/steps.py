"""A client's step in one round, measured and shrunk in factored form (pure numpy, float64).

A client starts from factors ``B0 (m, r0)``, ``A0 (r0, n)`` (its share of the global update,
``G = B0 A0``; ``r0 = 0``, ``G = 0`` for a fresh LoRA) and returns ``B (m, r)``, ``A (r, n)``.
Its *contribution* is ``Δ = B A − G``. Directions the client adds beyond ``r0`` start at
``B = 0`` (LoRA's initialisation), so padding ``B0``, ``A0`` with zero columns / rows to rank r
leaves ``G`` unchanged; a reply of lower rank (HetLoRA pruning) keeps the first r directions.
With ``ΔB = B − B0``, ``ΔA = A − A0`` (in the reply's rank) and the path
``B(c) = B0 + c ΔB``, ``A(c) = A0 + c ΔA``, ``c ∈ [0, 1]``:

    B(c) A(c) − G = T0 + c T1 + c² T2,
    T0 = −B0[:, r:] A0[r:]   (the start's directions a lower-rank reply dropped; else 0),
    T1 = ΔB A0 + B0 ΔA,      T2 = ΔB ΔA,

so ``‖B(c) A(c) − G‖_F² = Σ_{i,j} c^{i+j} ⟨T_i, T_j⟩``, a polynomial of degree 4 in c whose
five coefficients come from r×r Gram products, ``O((m + n) r²)``: no m×n matrix is formed.
At ``c = 1`` it is the contribution's norm; shrinking a step means moving back along the path
to the c where the norm meets a bound, which keeps the reply exact rank-r factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Factors = tuple[np.ndarray, np.ndarray]  # B (m, r), A (r, n)
BISECTIONS = 200  # halvings of [0, 1]: c is found to far below float64 resolution near 0


@dataclass(frozen=True)
class StepPath:
    """One module's step from ``start`` (in the reply's rank) by ``step`` (``ΔB``, ``ΔA``), with
    ``coefficients[k]`` of ``c^k`` in ``‖B(c) A(c) − G‖_F²`` (k = 0 … 4)."""

    start: Factors
    step: Factors
    coefficients: np.ndarray

    def squared_norm(self, c: float = 1.0) -> float:
        """``‖B(c) A(c) − G‖_F²`` (clamped at 0 against rounding)."""
        return max(float(np.polynomial.polynomial.polyval(c, self.coefficients)), 0.0)

    def norm(self, c: float = 1.0) -> float:
        """``‖B(c) A(c) − G‖_F``: at ``c = 1`` the contribution of the reply."""
        return float(np.sqrt(self.squared_norm(c)))

    def at(self, c: float) -> Factors:
        """The factors ``B0 + c ΔB``, ``A0 + c ΔA`` (float32, rank r)."""
        (B0, A0), (dB, dA) = self.start, self.step
        return (B0 + c * dB).astype(np.float32), (A0 + c * dA).astype(np.float32)


def step_path(start: Factors | None, reply: Factors) -> StepPath:
    """The path from `start` (``B0``, ``A0``; None for a fresh LoRA) to `reply` (``B``, ``A``).

    Every ``T_i = X[:, x_i] Y[y_i]`` is a block of ``X = [ΔB, B0, −B0_tail]`` (m × (2r + t)) and
    ``Y = [A0; ΔA; A0_tail]``, so ``⟨T_i, T_j⟩ = Σ (XᵀX)[x_i, x_j] ⊙ (Y Yᵀ)[y_i, y_j]`` comes
    from two Gram matrices: ``(m + n)(2r + t)²`` multiply-adds for all five coefficients.
    """
    B, A = (np.asarray(x, np.float64) for x in reply)
    m, r = B.shape
    n = A.shape[1]
    B0, A0 = np.zeros((m, r)), np.zeros((r, n))
    tail_B, tail_A = np.zeros((m, 0)), np.zeros((0, n))
    if start is not None:
        S_B, S_A = (np.asarray(x, np.float64) for x in start)
        r0 = min(r, S_B.shape[1])
        B0[:, :r0], A0[:r0] = S_B[:, :r0], S_A[:r0]
        tail_B, tail_A = -S_B[:, r:], S_A[r:]  # empty unless the reply dropped directions
    dB, dA = B - B0, A - A0
    X = np.hstack([dB, B0, tail_B])
    Y = np.vstack([A0, dA, tail_A])
    GX, GY = X.T @ X, Y @ Y.T
    t = tail_B.shape[1]
    blocks = {  # power of c → (columns of X, rows of Y) of its term
        0: (slice(2 * r, 2 * r + t), slice(2 * r, 2 * r + t)),
        1: (slice(0, 2 * r), slice(0, 2 * r)),
        2: (slice(0, r), slice(r, 2 * r)),
    }
    coefficients = np.zeros(5)
    for i, (xi, yi) in blocks.items():
        for j, (xj, yj) in blocks.items():
            coefficients[i + j] += float(np.sum(GX[xi, xj] * GY[yi, yj]))
    return StepPath((B0, A0), (dB, dA), coefficients)


def shrink_factor(paths: list[StepPath], linear_sq: float, bound: float) -> float:
    """The largest c found in (0, 1] with ``Σ_p ‖path_p(c)‖² + c² linear_sq ≤ bound²``.

    `linear_sq` is ``Σ ‖Δ‖²`` of steps that scale linearly (dense tensors, ``x0 + c Δ``).
    The total is continuous in c; at ``c = 0`` it must be within the bound (else ValueError),
    and at ``c = 1`` above it. Bisection keeps the lower end within the bound, so the returned
    c never exceeds it and, for a positive bound, is positive.
    """

    def total(c: float) -> float:
        return sum(p.squared_norm(c) for p in paths) + c * c * linear_sq

    limit = bound * bound
    if total(0.0) > limit:
        raise ValueError(
            f"the reply's dropped directions alone have norm {np.sqrt(total(0.0)):.4g} > {bound}"
        )
    lo, hi = 0.0, 1.0
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        if total(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo
