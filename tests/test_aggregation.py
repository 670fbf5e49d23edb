"""Aggregation methods against dense numpy references, invariants, registry and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.factors import make_factors
from raflora.math import (
    aggregate,
    allocate,
    available_methods,
    partition_bounds,
    partition_weights,
    register,
)
from raflora.math.methods import Method, registry
from raflora.math.methods.flexlora import flexlora

METHODS = ["zeropad", "hetlora", "rblora", "flexlora", "flora", "raflora"]
SVD_VARIANTS = ["zeropad_svd", "hetlora_svd", "rblora_svd"]


# --------------------------------------------------------------------- dense references


def pad(B, A, r):
    m, n = B.shape[0], A.shape[1]
    Bp, Ap = np.zeros((m, r)), np.zeros((r, n))
    Bp[:, : B.shape[1]], Ap[: A.shape[0]] = B, A
    return Bp, Ap


def ref_zeropad(factors, q):
    r_max = max(B.shape[1] for B, _ in factors)
    padded = [pad(B, A, r_max) for B, A in factors]
    B = sum(qk * Bp for qk, (Bp, _) in zip(q, padded, strict=True))
    A = sum(qk * Ap for qk, (_, Ap) in zip(q, padded, strict=True))
    return B @ A


def ref_hetlora(factors, w, data_weighted=False):
    norms = np.array([np.linalg.norm(B @ A) for B, A in factors])
    q = norms * np.asarray(w) if data_weighted else norms
    return ref_zeropad(factors, q / q.sum())


def ref_rblora(factors, w):
    r_max = max(B.shape[1] for B, _ in factors)
    out = 0
    for j in range(r_max):  # index j (0-based) is held by clients with r_k > j
        members = [k for k, (B, _) in enumerate(factors) if B.shape[1] > j]
        tot = sum(w[k] for k in members)
        b = sum(w[k] / tot * factors[k][0][:, j] for k in members)
        a = sum(w[k] / tot * factors[k][1][j] for k in members)
        out = out + np.outer(b, a)
    return out


def ref_flexlora(factors, w):
    p = np.asarray(w) / np.sum(w)
    return sum(pk * B @ A for pk, (B, A) in zip(p, factors, strict=True))


def ref_raflora(factors, w, bounds=None, energy=False):
    """Direction by direction: direction i of client k lies in the partition (lo, hi] ∋ i."""
    ranks = [B.shape[1] for B, _ in factors]
    bounds = sorted(set(ranks)) if bounds is None else list(bounds)
    lows = [0, *bounds[:-1]]
    out = 0
    for lo, hi in zip(lows, bounds, strict=True):
        members = [k for k, r in enumerate(ranks) if r > lo]
        comps = {k: factors[k][0][:, lo:hi] @ factors[k][1][lo:hi] for k in members}
        raw = {k: w[k] * (np.linalg.norm(comps[k]) if energy else 1.0) for k in members}
        tot = sum(raw.values())
        out = out + sum(raw[k] / tot * comps[k] for k in members)
    return out


def product(B, A):
    if isinstance(B, torch.Tensor):
        return (B.double() @ A.double()).numpy()
    return B.astype(np.float64) @ A.astype(np.float64)


RANK_SETS = [[2, 2, 2], [1, 2, 4], [4, 2, 2, 8], [3], [1, 5, 5, 2, 3]]


@pytest.mark.parametrize("ranks", RANK_SETS)
@pytest.mark.parametrize(
    ("method", "options", "reference"),
    [
        ("zeropad", {}, lambda f, w: ref_zeropad(f, np.asarray(w) / np.sum(w))),
        ("fedex", {}, lambda f, w: ref_zeropad(f, np.asarray(w) / np.sum(w))),  # its adapter
        ("hetlora", {}, ref_hetlora),
        ("hetlora", {"data_weighted": True}, lambda f, w: ref_hetlora(f, w, True)),
        ("rblora", {}, ref_rblora),
        ("flexlora", {}, ref_flexlora),
        ("flora", {}, ref_flexlora),
        ("raflora", {}, ref_raflora),
        ("raflora", {"weighting": "energy"}, lambda f, w: ref_raflora(f, w, energy=True)),
        ("raflora", {"partitions": [1, 3, 8]}, lambda f, w: ref_raflora(f, w, [1, 3, 8])),
    ],
)
def test_method_matches_dense_reference(ranks, method, options, reference):
    factors = make_factors(ranks, seed=len(ranks))
    w = [3.0, 1.0, 2.0, 5.0, 0.5][: len(ranks)]
    B, A = aggregate(method, factors, w, **options)
    np.testing.assert_allclose(B @ A, reference(factors, w), rtol=1e-12, atol=1e-12)


def test_fedit_matches_reference_and_rejects_unequal_ranks():
    factors = make_factors([3, 3, 3])
    B, A = aggregate("fedit", factors, [1, 2, 3])
    np.testing.assert_allclose(B @ A, ref_zeropad(factors, np.array([1, 2, 3]) / 6), atol=1e-12)
    with pytest.raises(ValueError, match=r"same rank.*\[3, 4\]"):
        aggregate("fedit", make_factors([3, 4]), [1, 1])


def test_output_ranks():
    factors = make_factors([1, 2, 4])
    for method, rank in [("zeropad", 4), ("rblora", 4), ("hetlora", 4)]:
        assert aggregate(method, factors, [1, 1, 1])[0].shape == (7, rank)
    for method in ["flexlora", "flora", "raflora"]:
        B, A = aggregate(method, factors, [1, 1, 1])
        assert B.shape == (7, 7) and A.shape == (7, 5)


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    m=st.integers(1, 6),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_raflora_property(ranks, m, n, seed, data):
    factors = make_factors(ranks, m, n, seed)
    w = data.draw(st.lists(st.floats(0.1, 10), min_size=len(ranks), max_size=len(ranks)))
    B, A = aggregate("raflora", factors, w)
    np.testing.assert_allclose(B @ A, ref_raflora(factors, w), rtol=1e-10, atol=1e-10)
    # weight-scale invariance
    B2, A2 = aggregate("raflora", factors, [7.5 * x for x in w])
    np.testing.assert_allclose(B2 @ A2, B @ A, rtol=1e-10, atol=1e-10)
    # client-permutation invariance
    perm = np.random.default_rng(seed).permutation(len(ranks))
    B3, A3 = aggregate("raflora", [factors[i] for i in perm], [w[i] for i in perm])
    np.testing.assert_allclose(B3 @ A3, B @ A, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ranks", RANK_SETS)
def test_permutation_and_weight_scale_invariance(method, ranks):
    factors = make_factors(ranks, seed=1)
    w = [1.0, 4.0, 2.0, 3.0, 1.5][: len(ranks)]
    ref = product(*aggregate(method, factors, w))
    perm = list(reversed(range(len(ranks))))
    permuted = aggregate(method, [factors[i] for i in perm], [w[i] for i in perm])
    np.testing.assert_allclose(product(*permuted), ref, rtol=1e-10, atol=1e-10)
    scaled = aggregate(method, factors, [1e3 * x for x in w])
    np.testing.assert_allclose(product(*scaled), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_equal_ranks_raflora_is_flexlora(r):
    factors = make_factors([r] * 4, seed=r)
    w = [1, 2, 3, 4]
    np.testing.assert_allclose(
        product(*aggregate("raflora", factors, w)),
        product(*aggregate("flexlora", factors, w)),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("partitions", [None, [1, 2, 3, 4, 5], [5], [2, 10]])
def test_partition_split_is_exact_for_one_client(partitions):
    (B, A) = make_factors([5])[0]
    Bg, Ag = aggregate("raflora", [(B, A)], [2.0], partitions=partitions)
    np.testing.assert_allclose(Bg @ Ag, B @ A, rtol=1e-12, atol=1e-12)


def test_single_partition_is_flexlora():
    factors = make_factors([1, 2, 4])
    np.testing.assert_allclose(
        product(*aggregate("raflora", factors, [1, 2, 3], partitions=[4])),
        ref_flexlora(factors, [1, 2, 3]),
        atol=1e-12,
    )


def test_raflora_keeps_every_direction_of_an_allocated_update():
    """Clients sending back the truncations of one update: raflora returns it exactly."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((8, 6)))
    V, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    S = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    factors = [((U * S)[:, :r], V.T[:r]) for r in [2, 2, 4, 6]]
    full = (U * S) @ V.T
    np.testing.assert_allclose(product(*aggregate("raflora", factors, [1] * 4)), full, atol=1e-12)
    np.testing.assert_allclose(product(*aggregate("rblora", factors, [1] * 4)), full, atol=1e-12)
    flex = product(*aggregate("flexlora", factors, [1] * 4))
    np.testing.assert_allclose(flex @ V[:, 5], 0.25 * S[5] * U[:, 5], atol=1e-12)  # c_6 = 1/4


def test_flexlora_norm_target():
    factors = make_factors([1, 2, 4])
    B, A = aggregate("flexlora", factors, [1, 1, 1], norm_target=2.5)
    assert np.linalg.norm(B @ A) == pytest.approx(2.5, rel=1e-12)
    B0, A0 = aggregate("flexlora", factors, [1, 1, 1])
    np.testing.assert_allclose(B @ A / 2.5, B0 @ A0 / np.linalg.norm(B0 @ A0), atol=1e-12)
    zero = [(np.zeros((3, 2)), np.ones((2, 3)))]
    assert np.all(aggregate("flexlora", zero, [1], norm_target=0.0)[0] == 0)
    with pytest.raises(ValueError, match="zero"):
        aggregate("flexlora", zero, [1], norm_target=1.0)


def test_zero_weight_partition_contributes_nothing():
    factors = make_factors([2, 4])
    B, A = aggregate("raflora", factors, [1.0, 0.0])
    np.testing.assert_allclose(B @ A, factors[0][0] @ factors[0][1], atol=1e-12)


def test_hetlora_all_zero_updates_fall_back_to_data_weights():
    zero = [(np.zeros((3, 2)), np.ones((2, 3))), (np.zeros((3, 2)), 2 * np.ones((2, 3)))]
    _, A = aggregate("hetlora", zero, [1, 3])
    np.testing.assert_allclose(A, 1.75 * np.ones((2, 3)))


# --------------------------------------------------------------------- array libraries


@pytest.mark.parametrize("method", [*METHODS, "fedit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(method, dtype):
    ranks = [3, 3] if method == "fedit" else [1, 3]
    np_factors = make_factors(ranks)
    t_factors = [
        (torch.tensor(B, dtype=dtype), torch.tensor(A, dtype=dtype)) for B, A in np_factors
    ]
    B, A = aggregate(method, t_factors, [1, 2])
    assert isinstance(B, torch.Tensor) and B.dtype == dtype and A.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(
        product(B, A), product(*aggregate(method, np_factors, [1, 2])), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_dtype_preserved(dtype):
    B, A = aggregate("raflora", make_factors([1, 2], dtype=dtype), [1, 1])
    assert isinstance(B, np.ndarray) and B.dtype == dtype and A.dtype == dtype


def test_read_only_and_strided_numpy_inputs():
    factors = make_factors([2, 3])
    B0 = factors[0][0].copy()
    B0.flags.writeable = False
    strided = [(B0, factors[0][1]), (factors[1][0][::-1], factors[1][1])]
    B, A = aggregate("flexlora", strided, [1, 1])
    ref = ref_flexlora([(B0, factors[0][1]), (factors[1][0][::-1], factors[1][1])], [1, 1])
    np.testing.assert_allclose(B @ A, ref, atol=1e-12)


def test_never_forms_m_by_n():
    """m = n = 10⁶: an m×n float64 matrix would need 8 TB."""
    m = n = 1_000_000
    factors = [(torch.ones(m, r) / m, torch.ones(r, n) / n) for r in (1, 2)]
    B, A = aggregate("raflora", factors, [1, 1])
    assert B.shape == (m, 3) and A.shape == (3, n)


# --------------------------------------------------------------------- partitions helpers


def test_partition_bounds_and_weights():
    assert partition_bounds([4, 2, 2, 8]) == [2, 4, 8]
    assert partition_bounds([4, 2], partitions=[1, 3, 5]) == [1, 3, 5]
    with pytest.raises(ValueError, match=r"last partition bound 3.*largest client rank 4"):
        partition_bounds([4, 2], partitions=[1, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        partition_bounds([4], partitions=[2, 2, 4])
    q = partition_weights([2, 4, 4, 8], [1, 1, 2, 4])
    expected = [[1 / 8, 1 / 8, 2 / 8, 4 / 8], [0, 1 / 7, 2 / 7, 4 / 7], [0, 0, 0, 1]]
    np.testing.assert_allclose(q, expected)
    # explicit bounds: client with r_k = 2 takes part in (1, 3] with direction 2 only
    q = partition_weights([2, 4], [1, 1], partitions=[1, 3, 4])
    np.testing.assert_allclose(q, [[0.5, 0.5], [0.5, 0.5], [0, 1]])


# --------------------------------------------------------------------- registry and options


def test_registry_contents_and_unknown_method():
    new = ["ffa_lora", "florist"]  # tested in test_new_methods.py
    expected = ["fedit", "fedex", "flexlora_nm", *METHODS, *SVD_VARIANTS, *new]
    assert available_methods() == sorted(expected)
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*raflora"):
        aggregate("nope", make_factors([1]), [1])


def test_register_rejects_duplicate_and_bad_names():
    def spec(name, **kw):
        return Method(name=name, summary="s", paper="p", aggregate=flexlora, **kw)

    with pytest.raises(ValueError, match="already registered"):
        register(spec("flexlora"))
    for bad in ["FlexLoRA", "", "two words", 3]:
        with pytest.raises(ValueError, match="lower-case"):
            register(spec(bad))
    with pytest.raises(ValueError, match="dataclass"):
        register(spec("newmethod", options=dict))
    with pytest.raises(ValueError, match="allocation"):
        register(spec("newmethod", allocation="qr"))


def test_register_new_method(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register(Method("firstonly", "s", "p", lambda c, _: (c.Bs[0], c.As[0])))
    assert "firstonly" in available_methods()
    factors = make_factors([1, 2])
    B, _ = aggregate("firstonly", factors, [1, 1])
    np.testing.assert_array_equal(B, factors[0][0])


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("raflora", {"weighting": "bogus"}, "weighting 'bogus'"),
        ("raflora", {"partitions": [3, 2]}, "strictly increasing"),
        ("raflora", {"partitions": [0, 2]}, r"partitions\[0\]"),
        ("raflora", {"partitions": [1]}, "largest client rank"),
        ("raflora", {"partition": [1]}, r"unknown option 'partition'.*'partitions', 'weighting'"),
        ("flexlora", {"norm_target": -1.0}, "norm_target"),
        ("flexlora", {"norm_target": float("nan")}, "norm_target"),
        ("hetlora", {"data_weighted": 1}, "data_weighted"),
        ("zeropad", {"x": 1}, r"unknown option 'x'.*\[\]"),
    ],
)
def test_bad_options(method, options, message):
    with pytest.raises(ValueError, match=message):
        aggregate(method, make_factors([2, 3]), [1, 1], **options)


# --------------------------------------------------------------------- bad inputs

GOOD_B, GOOD_A = np.ones((4, 2)), np.ones((2, 3))


@pytest.mark.parametrize(
    ("factors", "weights", "message"),
    [
        ([], [], "empty"),
        ([(GOOD_B, GOOD_A), (np.ones((4, 3)), GOOD_A)], [1, 1], r"client 1: B has 3 columns"),
        ([(GOOD_B, GOOD_A), (np.ones((5, 2)), GOOD_A)], [1, 1], r"client 1: B has 5 rows \(m\)"),
        ([(GOOD_B, GOOD_A), (GOOD_B, np.ones((2, 4)))], [1, 1], r"client 1: A has 4 columns"),
        ([(np.ones((4, 0)), np.ones((0, 3)))], [1], "client 0: rank 0"),
        ([(GOOD_B, GOOD_A), (np.ones(4), GOOD_A)], [1, 1], "client 1: B must be 2-D"),
        ([(GOOD_B, np.full((2, 3), np.nan))], [1], "client 0: A contains non-finite"),
        ([(GOOD_B, GOOD_A), (np.full((4, 2), np.inf), GOOD_A)], [1, 1], "client 1: B .*non-fin"),
        ([(GOOD_B, GOOD_A), (GOOD_B, GOOD_A)], [1, -1], "client 1: weight -1.0 is negative"),
        ([(GOOD_B, GOOD_A), (GOOD_B, GOOD_A)], [0, 0], "all zero"),
        ([(GOOD_B, GOOD_A), (GOOD_B, GOOD_A)], [1, float("nan")], "client 1: weight nan"),
        ([(GOOD_B, GOOD_A)], [1, 1], r"len\(weights\) = 2 but there are 1 clients"),
        ([(GOOD_B, GOOD_A), (torch.ones(4, 2), torch.ones(2, 3))], [1, 1], "client 1: B .*mixed"),
        ([(GOOD_B, torch.ones(2, 3))], [1], "client 0: A .*mixed array libraries"),
        ([(GOOD_B, GOOD_A), (GOOD_B.astype(np.float32), GOOD_A)], [1, 1], "client 1.*dtype"),
        ([(GOOD_B.astype(int), GOOD_A)], [1], "client 0: B has dtype int64"),
        ([(torch.ones(4, 2, dtype=torch.int32), torch.ones(2, 3))], [1], "client 0: B.*int32"),
        ([(GOOD_B.tolist(), GOOD_A)], [1], "client 0: B must be a numpy array or a torch"),
        ([(GOOD_B,)], [1], r"client 0: expected a \(B, A\) pair"),
    ],
)
def test_bad_inputs_name_the_client(factors, weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate("flexlora", factors, weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_is_kept():
    factors = [(torch.randn(8, r, device="cuda"), torch.randn(r, 6, device="cuda")) for r in (1, 3)]
    for method in METHODS:
        B, A = aggregate(method, factors, [1, 2])
        assert B.device.type == "cuda" and A.device.type == "cuda"
    Br, Ar = allocate(B, A, 2)
    assert Br.device.type == "cuda" and Ar.device.type == "cuda"
    with pytest.raises(ValueError, match="client 1: B is on cpu"):
        aggregate("flexlora", [factors[0], (factors[1][0].cpu(), factors[1][1].cpu())], [1, 1])


def test_readme_new_method_example_registers_and_runs(monkeypatch):
    """The README's "Adding a method" example is real code: it registers, aggregates to its
    formula and runs through the shared round step (the synthetic task)."""
    import dataclasses
    import re
    from pathlib import Path

    from raflora.synthetic import SyntheticConfig, run

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(# src/raflora/math/methods/rankweighted.py.*?)```", readme, re.S)
    assert code, "README lost its 'Adding a method' example"
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    exec(compile(code.group(1), "rankweighted.py", "exec"), {})
    factors, w = make_factors([1, 3], seed=4), [1.0, 2.0]
    B, A = aggregate("rankweighted", factors, w)
    q = [1 * 1 / 7, 2 * 3 / 7]  # p_k r_k / Σ, with p = (1/3, 2/3)
    expected = sum(qk * Bk @ Ak for qk, (Bk, Ak) in zip(q, factors, strict=True))
    np.testing.assert_allclose(B @ A, expected, atol=1e-10)
    config = dataclasses.replace(SyntheticConfig(), rounds=2, methods=("rankweighted",))
    assert len(run(config, None, progress=False)["rankweighted"]["rel_error"]) == 2
