"""aggregate_allocate: one pass without the stack, against dense numpy and the two-call path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.factors import make_factors, signed_svd
from raflora.math import aggregate, aggregate_allocate, allocate, lowrank, methods, stacked
from raflora.math._arrays import validate_factors


def dense_update(method, factors, w):
    """ΔW (m, n) written out direction by direction, independently of raflora.math."""
    p = np.asarray(w, np.float64) / np.sum(w)
    ranks = [B.shape[1] for B, _ in factors]
    if method in ("flexlora", "flora"):
        return sum(pk * B.astype(np.float64) @ A for pk, (B, A) in zip(p, factors, strict=True))
    out, lo = 0, 0  # raflora: partition (lo, hi] averaged over the clients with r_k > lo
    for hi in sorted(set(ranks)):
        members = [k for k, r in enumerate(ranks) if r > lo]
        total = sum(p[k] for k in members)
        for k in members:
            B, A = (x.astype(np.float64) for x in factors[k])
            out = out + p[k] / total * B[:, lo:hi] @ A[lo:hi]
        lo = hi
    return out


def dense_share(W, r):
    """Best rank-r factors (U_r S_r, V_rᵀ) of W, signs as raflora fixes them."""
    U, S, Vt = signed_svd(W)
    return U[:, :r] * S[:r], Vt[:r]


def as_numpy(x):
    return x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 rows / columns, so every test case streams several of them."""
    monkeypatch.setattr(stacked, "BLOCK_BYTES", 1)


@pytest.fixture
def no_stack(monkeypatch):
    """Fail if the stacked global factors are formed."""

    def refuse(*args, **kwargs):
        raise AssertionError("the stacked factors were formed")

    monkeypatch.setattr(stacked, "_stacked", refuse)


@pytest.mark.parametrize("method", ["raflora", "flexlora", "flora"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_dense_truncated_svd_without_forming_the_stack(
    method, library, dtype, small_blocks, no_stack
):
    ranks, weights = [2, 8, 4, 8, 1], [3.0, 1.0, 2.0, 5.0, 1.5]
    factors = make_factors(ranks, m=150, n=140, seed=len(method), dtype=np.dtype(dtype))
    W = dense_update(method, factors, weights)
    if library == "torch":
        factors = [(torch.from_numpy(B), torch.from_numpy(A)) for B, A in factors]
    pairs = aggregate_allocate(method, factors, weights, ranks)
    tol = 1e-10 if dtype == "float64" else 2e-4
    for r, (Br, Ar) in zip(ranks, pairs, strict=True):
        assert type(Br) is type(factors[0][0]) and Br.dtype == factors[0][0].dtype
        assert tuple(Br.shape) == (150, r) and tuple(Ar.shape) == (r, 140)
        Bd, Ad = dense_share(W, r)
        np.testing.assert_allclose(as_numpy(Br), Bd, atol=tol * np.abs(Bd).max())
        np.testing.assert_allclose(as_numpy(Ar), Ad, atol=tol)


@pytest.mark.parametrize("split", ["us", "sqrt"])
@pytest.mark.parametrize("options", [{}, {"weighting": "energy"}, {"partitions": [3, 9]}])
def test_equals_aggregate_then_allocate(split, options, small_blocks, no_stack):
    ranks, weights = [9, 3, 6, 3], [1.0, 4.0, 2.0, 0.5]
    factors = make_factors(ranks, m=130, n=90, seed=7)
    B, A = aggregate("raflora", factors, weights, **options)
    want = allocate(B, A, ranks, split=split)
    got = aggregate_allocate("raflora", factors, weights, ranks, split=split, **options)
    for (Bg, Ag), (Bw, Aw) in zip(got, want, strict=True):
        np.testing.assert_allclose(Bg, Bw, atol=1e-12)
        np.testing.assert_allclose(Ag, Aw, atol=1e-12)


def test_single_rank_returns_one_pair(no_stack):
    factors = make_factors([4, 2], m=50, n=60)
    Br, Ar = aggregate_allocate("raflora", factors, [1, 2], 3)
    Bw, Aw = allocate(*aggregate("raflora", factors, [1, 2]), 3)
    assert Br.shape == (50, 3) and Ar.shape == (3, 60)
    np.testing.assert_allclose(Br @ Ar, Bw @ Aw, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "options"),
    [("zeropad", {}), ("hetlora", {}), ("flexlora", {"norm_target": 2.5}), ("flexlora_nm", {})],
)
def test_methods_without_a_stacked_form_aggregate_then_allocate(method, options):
    factors = make_factors([1, 3, 2], m=20, n=25, seed=3)
    got = aggregate_allocate(method, factors, [1, 2, 3], [1, 3, 2], **options)
    want = allocate(*aggregate(method, factors, [1, 2, 3], **options), [1, 3, 2])
    for (Bg, Ag), (Bw, Aw) in zip(got, want, strict=True):
        np.testing.assert_allclose(Bg @ Ag, Bw @ Aw, atol=1e-12)


def test_stack_wider_than_the_module_forms_it(monkeypatch):
    """Σ r_k ≥ min(m, n): the product is decomposed densely, as allocate does."""
    factors = make_factors([8, 8, 8], m=30, n=20, seed=5)
    calls = []
    formed = stacked._stacked
    monkeypatch.setattr(stacked, "_stacked", lambda *a: calls.append(1) or formed(*a))
    pairs = aggregate_allocate("flexlora", factors, [1, 1, 1], [8, 8, 8])
    assert calls == [1]
    Bd, Ad = dense_share(dense_update("flexlora", factors, [1, 1, 1]), 8)
    np.testing.assert_allclose(pairs[0][0] @ pairs[0][1], Bd @ Ad, atol=1e-10)


def test_ill_conditioned_stack_takes_a_safe_route(small_blocks):
    """Clients that start from the same global factors send near-duplicate columns: B's Gram is
    singular, so the mirrored side or allocate's Householder route must answer, exactly."""
    rng = np.random.default_rng(11)
    shared_B = rng.standard_normal((120, 4))
    factors = [(shared_B.copy(), rng.standard_normal((4, 100))) for _ in range(3)]
    factors.append((shared_B[:, :2].copy(), rng.standard_normal((2, 100))))
    weights, ranks = [1.0, 2.0, 3.0, 1.0], [4, 4, 4, 2]
    W = dense_update("raflora", factors, weights)
    pairs = aggregate_allocate("raflora", factors, weights, ranks)
    for r, (Br, Ar) in zip(ranks, pairs, strict=True):
        Bd, Ad = dense_share(W, r)
        np.testing.assert_allclose(Br @ Ar, Bd @ Ad, atol=1e-9 * np.abs(W).max())


def test_zero_weight_columns_match_the_two_calls(no_stack):
    """A client of weight 0 that alone holds the top partition leaves zero columns in B."""
    factors = make_factors([2, 2, 6], m=80, n=70, seed=4)
    got = aggregate_allocate("raflora", factors, [1.0, 2.0, 0.0], [2, 2, 2])
    want = allocate(*aggregate("raflora", factors, [1.0, 2.0, 0.0]), [2, 2, 2])
    np.testing.assert_allclose(got[0][0] @ got[0][1], want[0][0] @ want[0][1], atol=1e-12)


def test_duplicate_columns_on_both_sides_fall_back_to_householder(monkeypatch):
    B0, A0 = make_factors([3], m=60, n=50, seed=2)[0]
    factors = [(B0, A0), (B0.copy(), A0.copy())]
    svd = lowrank._svd
    used = []
    monkeypatch.setattr(lowrank, "_svd", lambda *a: used.append(1) or svd(*a))
    pairs = aggregate_allocate("flexlora", factors, [1, 1], [3, 3])
    assert used, "expected the Householder route"
    np.testing.assert_allclose(pairs[0][0] @ pairs[0][1], B0 @ A0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=1, max_size=6),
    weights_seed=st.integers(0, 2**16),
    method=st.sampled_from(["raflora", "flexlora"]),
)
def test_property_matches_dense(ranks, weights_seed, method):
    rng = np.random.default_rng(weights_seed)
    weights = list(rng.uniform(0.1, 5.0, size=len(ranks)))
    factors = make_factors(ranks, m=70, n=65, seed=weights_seed)
    W = dense_update(method, factors, weights)
    scale = np.linalg.norm(W)
    for r, (Br, Ar) in zip(ranks, aggregate_allocate(method, factors, weights, ranks), strict=True):
        Bd, Ad = dense_share(W, r)
        assert np.linalg.norm(Br @ Ar - Bd @ Ad) <= 1e-9 * scale


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank 0 is out of range"),
        ({"rank": [2, 99]}, "rank 99 is out of range"),
        ({"rank": []}, "empty sequence"),
        ({"rank": 2, "split": "svd"}, "split 'svd'"),
        ({"rank": 2, "method": "fedavg"}, "unknown method 'fedavg'"),
        ({"rank": 2, "colour": 1}, "unknown option 'colour'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    factors = make_factors([2, 3], m=20, n=25)
    method = kwargs.pop("method", "raflora")
    with pytest.raises(ValueError, match=message):
        aggregate_allocate(method, factors, [1, 1], **kwargs)


def test_bad_factors_are_named():
    factors = make_factors([2, 3], m=20, n=25)
    factors[1] = (factors[1][0][:10], factors[1][1])
    with pytest.raises(ValueError, match="client 1: B has 10 rows"):
        aggregate_allocate("raflora", factors, [1, 1], [2, 3])


def test_stacked_methods_are_registered_with_their_columns():
    c, _ = validate_factors(make_factors([1, 2]), [1, 3])
    opts = methods.method_options("raflora")
    assert methods.stacked_columns("raflora", c, opts) == [[0.25], [0.75, 1.0]]
    assert methods.stacked_columns("flexlora", c, methods.method_options("flexlora")) == [
        [0.25],
        [0.75, 0.75],
    ]
    assert methods.stacked_columns("zeropad", c, None) is None
