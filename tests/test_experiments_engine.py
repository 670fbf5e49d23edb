"""The engine additions the experiments need, against dense numpy references: the
norm-matching control ``flexlora_nm``, the per-direction energy spectrum and the measured
retention of the previous global update's directions."""

from __future__ import annotations

import numpy as np
import pytest

from raflora.math import aggregate, get_method
from raflora.math.diagnostics import predicted_retention
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    RoundSettings,
    aggregate_round,
    compress,
    energy_spectrum,
    module_diagnostics,
)


def make_factors(ranks, m=9, n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((m, r)), rng.standard_normal((r, n))) for r in ranks]


def dense_raflora(factors, weights):
    """Partition (ρ_{j-1}, ρ_j] averaged over the clients that cover it, p renormalised."""
    p = np.asarray(weights, float) / np.sum(weights)
    ranks = [B.shape[1] for B, _ in factors]
    bounds = sorted(set(ranks))
    out = 0
    for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True):
        members = [k for k, r in enumerate(ranks) if r > lo]
        q = p[members] / p[members].sum()
        for qk, k in zip(q, members, strict=True):
            B, A = factors[k]
            out = out + qk * B[:, lo:hi] @ A[lo:hi]
    return out


@pytest.mark.parametrize("ranks", [[2, 4, 8], [2, 2, 2, 4, 16], [3, 3], [1, 5, 5, 2]])
def test_flexlora_nm_is_flexlora_scaled_to_raflora_norm(ranks):
    # Prepare
    factors = make_factors(ranks, seed=len(ranks))
    weights = [5.0, 1.0, 3.0, 2.0, 4.0][: len(ranks)]
    p = np.asarray(weights) / np.sum(weights)
    flex = sum(pk * B @ A for pk, (B, A) in zip(p, factors, strict=True))
    target = np.linalg.norm(dense_raflora(factors, weights))
    # Execute
    B, A = aggregate("flexlora_nm", factors, weights)
    # Assert
    np.testing.assert_allclose(B @ A, flex * target / np.linalg.norm(flex), rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(B @ A) == pytest.approx(target, rel=1e-10)


def test_flexlora_nm_equals_flexlora_for_equal_ranks_and_keeps_zero_updates():
    factors = make_factors([4, 4, 4], seed=3)
    B, A = aggregate("flexlora_nm", factors, [1, 2, 3])
    Bf, Af = aggregate("flexlora", factors, [1, 2, 3])
    np.testing.assert_allclose(B @ A, Bf @ Af, rtol=1e-10)
    zeros = [(np.zeros((5, r)), np.zeros((r, 4))) for r in (2, 4)]
    B, A = aggregate("flexlora_nm", zeros, [1, 1])
    assert np.all(B @ A == 0)


def test_energy_spectrum_and_module_diagnostics():
    S = np.array([3.0, 2.0, 1.0, 0.5])
    e = S**2 / np.sum(S**2)
    np.testing.assert_allclose(energy_spectrum(S, 3), e[:3])
    np.testing.assert_allclose(energy_spectrum(S[::-1], 10), e)  # sorted, capped at the rank
    assert energy_spectrum(np.zeros(3), 2).tolist() == [0.0, 0.0]
    diag = module_diagnostics(S, (1, 2))
    np.testing.assert_allclose(diag["energy_spectrum"], e)  # 2 ρ_M = 4 entries
    np.testing.assert_allclose(diag["partition_energy"][:2], [e[0], e[1]])


def _update(pid, rank, factors, n):
    return ClientUpdate(partition_id=pid, rank=rank, num_examples=n, factors=factors)


def test_round_records_measured_and_predicted_retention():
    """Clients that return their allocation untouched keep direction i with weight c_i under
    flexlora (measured = predicted), and fully under raflora."""
    # Prepare: a previous global update of rank 6 on one module, clients of ranks 2, 4, 6
    rng = np.random.default_rng(0)
    previous = compress(rng.standard_normal((10, 6)), rng.standard_normal((6, 8)))
    ranks, sizes = [2, 4, 6], [30, 20, 10]
    state = GlobalState(round=1, adapter={"q": previous}, merged={}, dense={}, ranks={})
    updates = [
        _update(pid, r, {"q": previous.factors(r)}, n)
        for pid, (r, n) in enumerate(zip(ranks, sizes, strict=True))
    ]
    expected_c = predicted_retention(ranks, sizes)
    for method, expected in [("flexlora", expected_c), ("raflora", [1.0] * 6)]:
        settings = RoundSettings.of(get_method(method), carry_over=False, bounds=(2, 4, 6))
        # Execute
        _, diag = aggregate_round(state, updates, settings)
        # Assert
        np.testing.assert_allclose(diag["per_module"]["q"]["retention"], expected, atol=1e-5)
        np.testing.assert_allclose(diag["predicted_retention"], expected_c)
        assert len(diag["per_module"]["q"]["energy_spectrum"]) == 6  # rank 6 < 2 ρ_M = 12


def test_retention_against_dense_projection_with_trained_clients():
    rng = np.random.default_rng(1)
    previous = compress(rng.standard_normal((12, 4)), rng.standard_normal((4, 9)))
    factors = [make_factors([r], m=12, n=9, seed=10 + r)[0] for r in (2, 4)]
    state = GlobalState(round=3, adapter={"q": previous}, merged={}, dense={}, ranks={})
    updates = [_update(pid, B.shape[1], {"q": (B, A)}, 5) for pid, (B, A) in enumerate(factors)]
    _, diag = aggregate_round(
        state,
        updates,
        RoundSettings.of(get_method("zeropad"), apply="adapter", carry_over=False, bounds=(2, 4)),
    )
    B, A = aggregate("zeropad", factors, [5, 5])
    U, S, Vt = previous.U.astype(float), previous.S.astype(float), previous.Vt.astype(float)
    dense = np.array([U[:, i] @ (B @ A) @ Vt[i] / S[i] for i in range(4)])
    np.testing.assert_allclose(diag["per_module"]["q"]["retention"], dense, rtol=1e-4, atol=1e-6)


def test_first_round_and_merge_mode_have_no_retention():
    factors = make_factors([2, 4], seed=5)
    updates = [_update(pid, B.shape[1], {"q": (B, A)}, 4) for pid, (B, A) in enumerate(factors)]
    empty = GlobalState(round=0, adapter={}, merged={}, dense={}, ranks={})
    for apply in ("adapter", "merge"):
        settings = RoundSettings.of(
            get_method("flora"), apply=apply, carry_over=False, bounds=(2, 4)
        )
        state, diag = aggregate_round(empty, updates, settings)
        assert "retention" not in diag["per_module"]["q"]
        _, diag = aggregate_round(state, updates, settings)
        assert ("retention" in diag["per_module"]["q"]) == (apply == "adapter")
