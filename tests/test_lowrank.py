"""Factored SVD, allocation and spectrum against dense numpy SVDs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from helpers.factors import signed_svd
from raflora.math import allocate, factored_norm, factored_svd, lowrank, spectrum, truncate
from raflora.math.lowrank import leading_svd, significant_svd, significant_values


def factors(m, n, R, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, R)), rng.standard_normal((R, n))


def dense_svd(B, A):
    """numpy SVD of the dense product, with the sign convention: max-|.| entry of U_i > 0."""
    return signed_svd(B.astype(np.float64) @ A.astype(np.float64))


def dense_factors(B, A, r, split):
    U, S, Vt = dense_svd(B, A)
    if split == "us":
        return U[:, :r] * S[:r], Vt[:r]
    return U[:, :r] * np.sqrt(S[:r]), np.sqrt(S[:r])[:, None] * Vt[:r]


def to_numpy(x):
    return x.double().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float64)


CASES = [(30, 20, 6), (12, 40, 9), (8, 8, 12), (50, 3, 5)]  # (m, n, R); R > min(m, n) too


@pytest.mark.parametrize(("m", "n", "R"), CASES)
@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("split", ["us", "sqrt"])
def test_allocate_matches_dense_truncated_svd(m, n, R, library, dtype, split):
    B, A = factors(m, n, R, seed=m + n + R)
    B, A = B.astype(dtype), A.astype(dtype)
    if library == "torch":
        B, A = torch.from_numpy(B), torch.from_numpy(A)
    available = min(m, n, R)
    ranks = sorted({1, available // 2 or 1, available})
    pairs = allocate(B, A, ranks, split=split)
    tol = 1e-10 if dtype == "float64" else 1e-4
    B64, A64 = to_numpy(B), to_numpy(A)
    scale = np.linalg.norm(B64 @ A64)
    for r, (Br, Ar) in zip(ranks, pairs, strict=True):
        assert type(Br) is type(B) and Br.dtype == B.dtype and Ar.dtype == A.dtype
        assert tuple(Br.shape) == (m, r) and tuple(Ar.shape) == (r, n)
        Bd, Ad = dense_factors(B64, A64, r, split)
        for got, want in [(Br, Bd), (Ar, Ad)]:
            np.testing.assert_allclose(to_numpy(got), want, atol=tol * np.sqrt(scale))
        err = np.linalg.norm(to_numpy(Br) @ to_numpy(Ar) - Bd @ Ad) / scale
        assert err < tol
    single = allocate(B, A, ranks[-1], split=split)
    assert isinstance(single, tuple)
    np.testing.assert_array_equal(to_numpy(single[0]), to_numpy(pairs[-1][0]))


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_spectrum_matches_numpy(library):
    B, A = factors(25, 15, 7, seed=3)
    expected = np.linalg.svd(B @ A, compute_uv=False)[:7]
    if library == "torch":
        B, A = torch.from_numpy(B), torch.from_numpy(A)
    S = spectrum(B, A)
    assert S.shape == (7,)
    np.testing.assert_allclose(to_numpy(S), expected, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    R=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_allocate_property(m, n, R, seed, data):
    B, A = factors(m, n, R, seed)
    S_dense = np.linalg.svd(B @ A, compute_uv=False)
    k = min(m, n, R)
    np.testing.assert_allclose(spectrum(B, A), S_dense[:k], rtol=1e-9, atol=1e-9 * S_dense[0])
    r = data.draw(st.integers(1, k))
    gap = S_dense[r - 1] - (S_dense[r] if r < len(S_dense) else 0.0)
    assume(gap > 1e-3 * S_dense[0])  # the truncation is unique
    Br, Ar = allocate(B, A, r)
    U, S, Vt = np.linalg.svd(B @ A)
    best = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(Br @ Ar, best, atol=1e-8 * S_dense[0])


def test_factored_svd_reconstructs_and_is_deterministic():
    B, A = factors(20, 16, 5, seed=1)
    U, S, Vt = factored_svd(B, A)
    np.testing.assert_allclose((U * S) @ Vt, B @ A, atol=1e-12)
    np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(5), atol=1e-12)
    assert np.all(U[np.abs(U).argmax(axis=0), np.arange(5)] > 0)
    U2, S2, Vt2 = factored_svd(-B, -A)  # same product, different factors
    np.testing.assert_allclose(U2, U, atol=1e-12)
    np.testing.assert_allclose(S2, S, atol=1e-12)
    np.testing.assert_allclose(Vt2, Vt, atol=1e-12)
    Ut, St, Vtt = factored_svd(torch.from_numpy(B), torch.from_numpy(A))
    for got, want in [(Ut, U), (St, S), (Vtt, Vt)]:
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_factored_svd_keeps_every_triplet_orthonormal_for_a_spread_spectrum():
    """Singular values from 1 to 1e-7: all k triplets stay orthonormal (Householder QR), which a
    Gram-matrix route would lose for the small ones."""
    rng = np.random.default_rng(4)
    Q_left = np.linalg.qr(rng.standard_normal((60, 8)))[0]
    Q_right = np.linalg.qr(rng.standard_normal((40, 8)))[0]
    S_true = np.logspace(0, -7, 8)
    B, A = Q_left * S_true, Q_right.T  # B A = Q_left diag(S_true) Q_rightᵀ
    U, S, Vt = factored_svd(B, A)
    np.testing.assert_allclose(S, S_true, rtol=1e-6)
    np.testing.assert_allclose(U.T @ U, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(8), atol=1e-12)
    np.testing.assert_allclose((U * S) @ Vt, B @ A, atol=1e-14)


def spread_factors(m, n, S_true, seed):
    """B (m, k), A (k, n) with B A = Q_L diag(S_true) Q_Rᵀ: a known spectrum."""
    rng = np.random.default_rng(seed)
    k = len(S_true)
    Q_left = np.linalg.qr(rng.standard_normal((m, k)))[0]
    Q_right = np.linalg.qr(rng.standard_normal((n, k)))[0]
    mix = rng.standard_normal((k, k))  # B and A are not orthogonal themselves
    return Q_left * S_true @ mix, np.linalg.solve(mix, Q_right.T)


def count_calls(monkeypatch, name: str) -> list[int]:
    """Record each call of ``lowrank.<name>`` (a route: ``_svd`` Householder QR, ``_svdvals``)."""
    calls: list[int] = []
    original = getattr(lowrank, name)
    monkeypatch.setattr(lowrank, name, lambda *a: calls.append(1) or original(*a))
    return calls


def count_householder(monkeypatch):
    return count_calls(monkeypatch, "_svd")


@pytest.mark.parametrize("rtol", [0.0, 1e-9, 1e-3, 0.5])
def test_significant_svd_matches_dense_numpy_above_the_threshold(monkeypatch, rtol):
    B, A = factors(90, 70, 12, seed=8)
    calls = count_householder(monkeypatch)
    U, S, Vt = significant_svd(B, A, rtol)
    # the Gram route resolves σ down to ≈ √eps · σ_1 only: below that, Householder QR answers
    assert bool(calls) == (rtol < 1e-7)
    Ud, Sd, Vtd = dense_svd(B, A)
    k = int(np.sum(Sd[:12] > rtol * Sd[0]))  # B A has rank 12
    assert S.shape == (k,) and U.shape == (90, k) and Vt.shape == (k, 70)
    np.testing.assert_allclose(S, Sd[:k], rtol=1e-12)
    np.testing.assert_allclose(U, Ud[:, :k], atol=1e-10)
    np.testing.assert_allclose(Vt, Vtd[:k], atol=1e-10)


def test_significant_svd_is_accurate_to_float32_on_a_spread_spectrum():
    """σ from 1 to 1e-9, threshold 3e-6: every kept triplet is orthonormal to float32 precision
    and the kept product matches the dense truncation, whichever route answered."""
    S_true = np.logspace(0, -9, 10)
    B, A = spread_factors(80, 60, S_true, seed=3)
    U, S, Vt = significant_svd(B, A, 3e-6)
    assert S.shape == (6,)  # 1, 1e-1, …, 1e-5 lie above 3e-6 · σ_1
    eps32 = np.finfo(np.float32).eps
    assert np.abs(U.T @ U - np.eye(6)).max() <= eps32
    assert np.abs(Vt @ Vt.T - np.eye(6)).max() <= eps32
    np.testing.assert_allclose(S, S_true[:6], rtol=1e-9)
    Ud, Sd, Vtd = dense_svd(B, A)
    np.testing.assert_allclose((U * S) @ Vt, (Ud[:, :6] * Sd[:6]) @ Vtd[:6], atol=1e-12)


def test_significant_svd_falls_back_to_householder_for_duplicate_columns(monkeypatch):
    B, A = factors(50, 40, 4, seed=9)
    B2, A2 = np.hstack([B, B]), np.vstack([A, A])  # B2's Gram is singular
    calls = count_householder(monkeypatch)
    U, S, Vt = significant_svd(B2, A2, 1e-8)
    assert calls
    assert S.shape == (4,)
    np.testing.assert_allclose((U * S) @ Vt, B2 @ A2, atol=1e-10)


def test_significant_svd_uses_the_mirrored_side_when_only_b_is_degenerate(monkeypatch):
    B, A = factors(60, 50, 4, seed=12)
    rng = np.random.default_rng(13)
    B2, A2 = np.hstack([B, B]), np.vstack([A, rng.standard_normal((4, 50))])  # B's Gram singular
    calls = count_householder(monkeypatch)
    U, S, Vt = significant_svd(B2, A2, 1e-6)
    assert not calls, "Aᵀ's Gram is well conditioned: no Householder QR needed"
    Sd = dense_svd(B2, A2)[1]
    assert S.shape == (4,)  # B2 A2 = B (A + A'): rank 4
    np.testing.assert_allclose(S, Sd[:4], rtol=1e-10)
    np.testing.assert_allclose((U * S) @ Vt, B2 @ A2, atol=1e-10)


def test_significant_svd_float64_storage_demands_float64_orthonormality(monkeypatch):
    """The Cholesky route is kept only when orthonormal to eps(storage); for float64 storage
    on a spread spectrum that fails, and Householder QR answers."""
    B, A = spread_factors(80, 60, np.logspace(0, -9, 10), seed=5)
    calls = count_householder(monkeypatch)
    U, S, _ = significant_svd(B, A, 1e-12, storage=np.float64)
    assert calls
    np.testing.assert_allclose(U.T @ U, np.eye(S.shape[0]), atol=1e-13)


@pytest.mark.parametrize("tol", [1e-7, 1e-13])
def test_orthonormal_estimate_against_the_exact_frobenius_drift(tol):
    """A rank-one drift UᵀU = I + δ u uᵀ (the probes' worst case) is refused once δ reaches
    tol, and accepted far below it; Vt's drift counts as U's does."""
    rng = np.random.default_rng(21)
    Q = torch.from_numpy(np.linalg.qr(rng.standard_normal((300, 40)))[0])  # (300, 40)
    u = torch.from_numpy(rng.standard_normal(40))
    u /= u.norm()
    V = torch.from_numpy(np.linalg.qr(rng.standard_normal((90, 40)))[0]).mT.contiguous()
    for delta, expected in [(tol, False), (3 * tol, False), (tol / 1e3, True)]:
        # (I + c u uᵀ)² = I + δ u uᵀ for c = √(1 + δ) − 1
        U = Q @ (torch.eye(40, dtype=Q.dtype) + (np.sqrt(1 + delta) - 1) * torch.outer(u, u))
        drift = float(torch.linalg.matrix_norm(U.mT @ U - torch.eye(40, dtype=U.dtype)))
        assert np.isclose(drift, delta, rtol=1e-2) or delta < tol  # below tol: rounding too
        assert lowrank._orthonormal_estimate(U, V, tol) is expected
        assert lowrank._orthonormal_estimate(Q, U.mT, tol) is expected
    assert lowrank._orthonormal_estimate(Q, V, 1e-13)


def test_fix_signs_makes_the_largest_entry_positive_and_breaks_ties_to_plus():
    rng = np.random.default_rng(3)
    U = torch.from_numpy(rng.standard_normal((50, 7)))
    U[:, 0] = 0.0
    U[[4, 9], 1] = torch.tensor([-5.0, 5.0], dtype=U.dtype)  # a tie: +x counts as the largest
    Vt = torch.from_numpy(rng.standard_normal((7, 11)))
    before = U @ Vt
    U2, _, Vt2 = lowrank._fix_signs(U.clone(), torch.ones(7, dtype=U.dtype), Vt.clone())
    torch.testing.assert_close(U2 @ Vt2, before)  # the product is unchanged
    for j in range(2, 7):
        col = U2[:, j].numpy()
        assert col[np.abs(col).argmax()] > 0
    assert torch.equal(U2[:, 0], U[:, 0]) and float(U2[9, 1]) == 5.0 and float(U2[4, 1]) == -5.0
    assert lowrank._fix_signs(torch.zeros(0, 3), torch.ones(3), torch.ones(3, 2))[0].shape == (0, 3)


def test_significant_svd_zero_product_and_bad_rtol():
    B, A = np.zeros((10, 3)), np.ones((3, 8))
    U, S, Vt = significant_svd(B, A, 1e-6)
    assert U.shape == (10, 0) and S.shape == (0,) and Vt.shape == (0, 8)
    Ut, St, _ = significant_svd(torch.ones(10, 3), torch.ones(3, 8), 0.1)
    assert isinstance(Ut, torch.Tensor) and St.shape == (1,)
    for rtol in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="rtol must be a finite number"):
            significant_svd(np.ones((4, 2)), np.ones((2, 4)), rtol)


@pytest.mark.parametrize("rtol", [0.0, 1e-9, 1e-3, 0.5])
def test_significant_values_match_dense_numpy_above_the_threshold(monkeypatch, rtol):
    B, A = factors(90, 70, 12, seed=8)
    calls = count_calls(monkeypatch, "_svdvals")
    S = significant_values(B, A, rtol)
    assert bool(calls) == (rtol < 1e-7)  # the Gram route resolves σ down to ≈ √eps · σ_1
    Sd = np.linalg.svd(B @ A, compute_uv=False)
    k = int(np.sum(Sd[:12] > rtol * Sd[0]))  # B A has rank 12
    assert S.shape == (k,)
    np.testing.assert_allclose(S, Sd[:k], rtol=1e-12)
    np.testing.assert_allclose(S, significant_svd(B, A, rtol)[1], rtol=1e-13)


def test_significant_values_on_a_spread_spectrum():
    """σ from 1 to 1e-9, threshold 3e-6: the six values above it, each σ² within a small
    multiple of eps · σ_1² (so σ_i itself to a relative (σ_1 / σ_i)² · that)."""
    S_true = np.logspace(0, -9, 10)
    B, A = spread_factors(80, 60, S_true, seed=3)
    S = significant_values(B, A, 3e-6)
    assert S.shape == (6,)
    np.testing.assert_allclose(S**2, S_true[:6] ** 2, rtol=0, atol=1e-12)


def test_significant_values_use_the_mirrored_side_then_householder(monkeypatch):
    B, A = factors(60, 50, 4, seed=12)
    rng = np.random.default_rng(13)
    calls = count_calls(monkeypatch, "_svdvals")
    B2, A2 = np.hstack([B, B]), np.vstack([A, rng.standard_normal((4, 50))])  # B's Gram singular
    np.testing.assert_allclose(
        significant_values(B2, A2, 1e-6), np.linalg.svd(B2 @ A2, compute_uv=False)[:4], rtol=1e-10
    )
    assert not calls, "Aᵀ's Gram is well conditioned: no QR needed"
    B3, A3 = np.hstack([B, B]), np.vstack([A, A])  # both Gram matrices singular
    np.testing.assert_allclose(
        significant_values(B3, A3, 1e-8), np.linalg.svd(B3 @ A3, compute_uv=False)[:4], rtol=1e-10
    )
    assert calls


@pytest.mark.parametrize(("top", "rtol"), [(4, 1e-3), (12, 1e-9), (20, 0.5), (5, 0.0)])
def test_leading_svd_matches_dense_numpy(monkeypatch, top, rtol):
    """The values above the threshold and the first min(top, k) triplets, one R×R
    eigendecomposition (Householder QR only where the Gram route cannot resolve rtol)."""
    B, A = factors(90, 70, 12, seed=8)
    calls = count_householder(monkeypatch)
    U, S, Vt = leading_svd(B, A, top, rtol)
    assert bool(calls) == (rtol < 1e-7)
    Ud, Sd, Vtd = dense_svd(B, A)
    k = int(np.sum(Sd[:12] > rtol * Sd[0]))  # B A has rank 12
    t = min(top, k)
    assert S.shape == (k,) and U.shape == (90, t) and Vt.shape == (t, 70)
    np.testing.assert_allclose(S, Sd[:k], rtol=1e-12)
    np.testing.assert_allclose(U, Ud[:, :t], atol=1e-10)  # dense_svd fixes the same signs
    np.testing.assert_allclose(Vt, Vtd[:t], atol=1e-10)


def test_leading_svd_mirrored_side_householder_and_edge_cases(monkeypatch):
    B, A = factors(60, 50, 4, seed=12)
    rng = np.random.default_rng(13)
    B2, A2 = np.hstack([B, B]), np.vstack([A, rng.standard_normal((4, 50))])  # B's Gram singular
    calls = count_householder(monkeypatch)
    U, S, Vt = leading_svd(B2, A2, 3, 1e-6)
    assert not calls, "Aᵀ's Gram is well conditioned: no Householder QR needed"
    Ud, Sd, Vtd = dense_svd(B2, A2)
    assert S.shape == (4,) and U.shape == (60, 3)
    np.testing.assert_allclose(S, Sd[:4], rtol=1e-10)
    np.testing.assert_allclose((U * S[:3]) @ Vt, (Ud[:, :3] * Sd[:3]) @ Vtd[:3], atol=1e-10)
    B3, A3 = np.hstack([B, B]), np.vstack([A, A])  # both Grams singular
    U, S, Vt = leading_svd(B3, A3, 8, 1e-8)
    assert calls and S.shape == (4,) and U.shape == (60, 4)
    np.testing.assert_allclose((U * S) @ Vt, B3 @ A3, atol=1e-10)
    U, S, Vt = leading_svd(np.zeros((10, 3)), np.ones((3, 8)), 2, 1e-6)
    assert U.shape == (10, 0) and S.shape == (0,) and Vt.shape == (0, 8)
    Ut, St, _ = leading_svd(torch.ones(10, 3), torch.ones(3, 8), 2, 0.1)
    assert isinstance(Ut, torch.Tensor) and St.shape == (1,) and Ut.shape == (10, 1)
    for top in (-1, 1.5, True):
        with pytest.raises(ValueError, match="top must be an integer"):
            leading_svd(B, A, top, 0.1)
    with pytest.raises(ValueError, match="rtol must be a finite number"):
        leading_svd(B, A, 2, -1.0)


def test_significant_values_zero_product_torch_and_bad_rtol():
    assert significant_values(np.zeros((10, 3)), np.ones((3, 8)), 1e-6).shape == (0,)
    S = significant_values(torch.ones(10, 3), torch.ones(3, 8), 0.1)
    assert isinstance(S, torch.Tensor) and S.dtype == torch.float32
    np.testing.assert_allclose(S.numpy(), [np.sqrt(10 * 8) * 3], rtol=1e-6)
    for rtol in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="rtol must be a finite number"):
            significant_values(np.ones((4, 2)), np.ones((2, 4)), rtol)


@pytest.mark.parametrize(("m", "n", "R"), [(8, 9, 12), (30, 6, 6)])
def test_wide_factors_form_the_product(monkeypatch, m, n, R):
    """R ≥ min(m, n): the dense product is cheaper than any factored route, so no Gram matrix
    (nor QR of the factors) is computed, and the result still matches numpy."""
    from raflora.math import lowrank

    grams = []
    gram = lowrank._gram
    monkeypatch.setattr(lowrank, "_gram", lambda X, *a: grams.append(X.shape) or gram(X, *a))
    monkeypatch.setattr(lowrank.torch.linalg, "qr", None)  # any QR call would fail
    B, A = factors(m, n, R, seed=5)
    Br, Ar = allocate(B, A, 3)
    np.testing.assert_allclose(spectrum(B, A), np.linalg.svd(B @ A, compute_uv=False)[:R])
    U, S, Vt = factored_svd(B, A)
    np.testing.assert_allclose((U * S) @ Vt, B @ A, atol=1e-12 * S[0])
    assert grams == []
    Bd, Ad = dense_factors(B, A, 3, "us")
    np.testing.assert_allclose(Br @ Ar, Bd @ Ad, atol=1e-10 * np.linalg.norm(B @ A))


def test_truncate_slices_an_svd():
    B, A = factors(10, 9, 4)
    U, S, Vt = factored_svd(B, A)
    Br, Ar = truncate(U, S, Vt, 2, split="sqrt")
    np.testing.assert_allclose(Br, U[:, :2] * np.sqrt(S[:2]))
    np.testing.assert_allclose(Ar, np.sqrt(S[:2])[:, None] * Vt[:2])


def test_zero_update():
    B, A = np.zeros((6, 3)), np.ones((3, 5))
    np.testing.assert_array_equal(spectrum(B, A), np.zeros(3))
    Br, Ar = allocate(B, A, 2)
    np.testing.assert_array_equal(Br @ Ar, np.zeros((6, 5)))
    assert factored_norm(B, A) == 0.0


def test_factored_norm():
    B, A = factors(9, 7, 3)
    assert factored_norm(B, A) == pytest.approx(np.linalg.norm(B @ A), rel=1e-12)


def test_keeps_torch_device_and_handles_huge_m_n():
    m = n = 1_000_000  # a dense m×n float32 matrix would need 4 TB
    B = torch.zeros(m, 2)
    A = torch.zeros(2, n)
    B[0, 0], B[1, 1], A[0, 0], A[1, 1] = 3.0, 1.0, 1.0, 2.0
    Br, Ar = allocate(B, A, 1)
    assert Br.device == B.device and Br.dtype == torch.float32
    torch.testing.assert_close(spectrum(B, A), torch.tensor([3.0, 2.0]))
    assert float(Br[0, 0] * Ar[0, 0]) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        (0, "rank 0 is out of range: the available rank is 4"),
        (5, "rank 5 is out of range: the available rank is 4"),
        ([1, 7], "rank 7 is out of range: the available rank is 4"),
        ([], "empty"),
        (2.0, "rank must be an int or a sequence"),
        (True, "rank must be an int or a sequence|not an integer"),
        ([1, 1.5], r"rank 1.5 is not an integer"),
    ],
)
def test_bad_ranks(rank, message):
    B, A = factors(6, 5, 4)
    with pytest.raises(ValueError, match=message):
        allocate(B, A, rank)


@pytest.mark.parametrize(
    ("B", "A", "message"),
    [
        (np.ones((4, 2)), np.ones((3, 5)), "B has 2 columns but A has 3 rows"),
        (np.ones((4, 2)), torch.ones(2, 5), "mixed array libraries"),
        (np.ones((4, 2)), np.ones((2, 5), dtype=np.float32), "mixed dtypes"),
        (np.ones((4, 2), dtype=np.int64), np.ones((2, 5)), "B has dtype int64"),
        (np.ones((4, 2)), np.full((2, 5), np.inf), "A contains non-finite"),
        (np.ones(4), np.ones((1, 5)), "B must be 2-D"),
    ],
)
def test_bad_factors(B, A, message):
    with pytest.raises(ValueError, match=message):
        allocate(B, A, 1)
    with pytest.raises(ValueError, match=message):
        spectrum(B, A)


def test_bad_split():
    with pytest.raises(ValueError, match=r"split 'svd' is not one of \['us', 'sqrt'\]"):
        allocate(*factors(5, 5, 2), 1, split="svd")
