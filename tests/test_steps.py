"""raflora.math.steps: a client's contribution ‖B A − B0 A0‖_F and the path that shrinks it,
checked against dense products computed here."""

from __future__ import annotations

import numpy as np
import pytest

from raflora.math.steps import shrink_factor, step_path

M, N = 12, 9


def pair(rank: int, seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        (scale * rng.standard_normal((M, rank))).astype(np.float32),
        rng.standard_normal((rank, N)).astype(np.float32),
    )


def dense(factors) -> np.ndarray:
    B, A = factors
    return np.asarray(B, np.float64) @ np.asarray(A, np.float64)


@pytest.mark.parametrize(("r0", "r"), [(0, 3), (2, 4), (4, 4), (5, 3)])
def test_the_path_norm_is_the_dense_contribution_at_every_c(r0: int, r) -> None:
    start = pair(r0, 1) if r0 else None
    reply = pair(r, 2)
    G = dense(start) if start else np.zeros((M, N))
    path = step_path(start, reply)
    assert path.norm(1.0) == pytest.approx(np.linalg.norm(dense(reply) - G), rel=1e-10)
    for c in (0.0, 0.3, 0.77):
        B, A = path.at(c)
        assert B.shape == (M, r) and A.shape == (r, N) and B.dtype == np.float32
        (B0, A0), (dB, dA) = path.start, path.step
        exact = (B0 + c * dB) @ (A0 + c * dA) - G
        assert path.norm(c) == pytest.approx(np.linalg.norm(exact), rel=1e-9, abs=1e-12)
    if r0 <= r:  # the start is on the path: no contribution at c = 0
        assert path.norm(0.0) == pytest.approx(0.0, abs=1e-9)


def test_a_fresh_start_shrinks_to_a_scaled_product() -> None:
    reply = pair(3, 4)
    path = step_path(None, reply)
    bound = 0.25 * path.norm()
    c = shrink_factor([path], 0.0, bound)
    assert c == pytest.approx(np.sqrt(0.25), rel=1e-9)  # (cB)(cA) = c² BA
    np.testing.assert_allclose(dense(path.at(c)), 0.25 * dense(reply), rtol=1e-5, atol=1e-6)


def test_shrinking_meets_the_bound_and_never_crosses_it() -> None:
    start, reply = pair(3, 5), pair(3, 6, scale=40.0)
    paths = [step_path(start, reply), step_path(pair(2, 7), pair(2, 8))]
    linear_sq = 4.0
    total = np.sqrt(sum(p.squared_norm() for p in paths) + linear_sq)
    for bound in (0.5 * total, 1e-3 * total, 1e-9 * total):
        c = shrink_factor(paths, linear_sq, bound)
        assert 0.0 < c < 1.0
        got = np.sqrt(sum(p.squared_norm(c) for p in paths) + c * c * linear_sq)
        assert got <= bound and got == pytest.approx(bound, rel=1e-9)


def test_a_start_the_reply_drops_beyond_the_bound_cannot_be_shrunk() -> None:
    path = step_path(pair(5, 1, scale=10.0), pair(2, 2))  # the pruned tail alone is large
    with pytest.raises(ValueError, match="dropped directions alone"):
        shrink_factor([path], 0.0, 1e-3)
