"""The server's round step (`raflora.math.round`) against dense numpy references.

Every check forms the m×n products the server never forms: the global update of a round must
equal the method's dense formula, with carry-over and merge mode on top.
"""

from __future__ import annotations

import numpy as np
import pytest

from raflora.math import get_method
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    RoundSettings,
    StackedUpdate,
    Update,
    aggregate_round,
    compress,
    compressed_values,
    decompose,
    empty_update,
    weighted_dense_average,
)

M, N = 24, 18  # larger than Σ r_k = 14, so no direction is lost to the shape
MODULES = ("layer.0.query", "layer.0.value")


def dense(update: Update) -> np.ndarray:
    """The whole update ΔW (m, n) in float64, from the factors evaluation uses."""
    B, A = update.whole()
    return B.astype(np.float64) @ A.astype(np.float64)


def client(pid: int, rank: int, num_examples: int, seed: int, scale: float = 1.0) -> ClientUpdate:
    rng = np.random.default_rng([seed, pid])
    factors = {
        name: (
            (scale * rng.standard_normal((M, rank))).astype(np.float32),
            rng.standard_normal((rank, N)).astype(np.float32),
        )
        for name in MODULES
    }
    head = {"classifier.weight": rng.standard_normal((2, 4)).astype(np.float32)}
    return ClientUpdate(pid, rank, num_examples, factors, dense=head)


def start_state(rank: int = 0, seed: int = 99, form: str = "stacked") -> GlobalState:
    """Round-0 state, or a state whose adapter has rank `rank` with distinct singular values,
    as the server keeps it (``"stacked"``, leading 8 triplets) or as a thin SVD (``"svd"``,
    what checkpoints of format 1 hold)."""
    if rank == 0:
        return GlobalState(0, {}, {}, {}, {})
    rng = np.random.default_rng(seed)
    adapter: dict[str, Update] = {}
    for name in MODULES:
        B = rng.standard_normal((M, rank)) * np.linspace(3.0, 0.5, rank)
        A = rng.standard_normal((rank, N))
        adapter[name] = decompose(B, A, top=8) if form == "stacked" else compress(B, A)
    return GlobalState(1, adapter, {}, {}, {})


def settings(method: str, bounds=(2, 4, 8), carry_over=False, apply="adapter") -> RoundSettings:
    return RoundSettings.of(
        get_method(method), apply=apply, carry_over=carry_over, bounds=tuple(bounds)
    )


def products(updates: list[ClientUpdate], name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (u.factors[name][0].astype(np.float64), u.factors[name][1].astype(np.float64))
        for u in updates
    ]


def ref_flexlora(updates: list[ClientUpdate], name: str) -> np.ndarray:
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    return sum(pk * B @ A for pk, (B, A) in zip(p, products(updates, name), strict=True))


def ref_raflora(updates: list[ClientUpdate], name: str) -> np.ndarray:
    """Partition (lo, hi] of the distinct ranks, averaged over the clients with r_k > lo."""
    ranks = [u.rank for u in updates]
    p = np.array([u.num_examples for u in updates], float)
    bounds = sorted(set(ranks))
    out = np.zeros((M, N))
    for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True):
        members = [k for k, r in enumerate(ranks) if r > lo]
        q = p[members] / p[members].sum()
        for qk, k in zip(q, members, strict=True):
            B, A = products(updates, name)[k]
            out += qk * B[:, lo:hi] @ A[lo:hi]
    return out


REFERENCES = {"flexlora": ref_flexlora, "raflora": ref_raflora}


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 2e-5) -> None:
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------- compress


def test_compress_equals_dense_svd() -> None:
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((M, 5)), rng.standard_normal((5, N))
    update = compress(B, A)
    S_ref = np.linalg.svd(B @ A, compute_uv=False)[:5]
    assert update.U.dtype == update.S.dtype == update.Vt.dtype == np.float32
    np.testing.assert_allclose(update.S, S_ref, rtol=1e-5)
    close(dense(update), B @ A)
    np.testing.assert_allclose(update.U.T @ update.U, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(update.Vt @ update.Vt.T, np.eye(5), atol=1e-5)
    assert update.norm == pytest.approx(np.linalg.norm(B @ A), rel=1e-5)


def test_compressed_values_are_compress_singular_values() -> None:
    rng = np.random.default_rng(4)
    B = rng.standard_normal((M, 9)) * np.logspace(0, -8, 9)  # the last directions are dropped
    A = rng.standard_normal((9, N))
    S = compressed_values(B, A)
    assert S.dtype == np.float32
    np.testing.assert_allclose(S, compress(B, A).S, rtol=1e-6)
    assert compressed_values(np.zeros((M, 4)), A[:4]).shape == (0,)


def test_compress_drops_numerically_zero_directions() -> None:
    rng = np.random.default_rng(1)
    B = rng.standard_normal((M, 3))
    B = np.concatenate([B, B[:, :2]], axis=1)  # rank 3 written with 5 columns
    A = rng.standard_normal((5, N))
    update = compress(B, A)
    assert update.rank == np.linalg.matrix_rank(B @ A) == 3
    close(dense(update), B @ A)
    assert compress(np.zeros((M, 4)), A[:4]).rank == 0


@pytest.mark.parametrize("split", ["us", "sqrt"])
def test_allocation_is_the_best_rank_r_truncation(split: str) -> None:
    rng = np.random.default_rng(2)
    update = compress(rng.standard_normal((M, 6)), rng.standard_normal((6, N)))
    full = dense(update)
    U, S, Vt = np.linalg.svd(full, full_matrices=False)
    for r in (1, 3, 6, 10):
        B, A = update.factors(r, split)
        k = min(r, 6)
        assert B.shape == (M, k) and A.shape == (k, N)
        close(B.astype(np.float64) @ A, U[:, :k] * S[:k] @ Vt[:k])
    if split == "us":  # FlexLoRA split: A has orthonormal rows
        _, A = update.factors(4, split)
        np.testing.assert_allclose(A @ A.T, np.eye(4), atol=1e-5)


# --------------------------------------------------------------------------- decompose


def test_decompose_keeps_the_factors_the_leading_triplets_and_the_spectrum(monkeypatch) -> None:
    from raflora.math import round as global_state

    rng = np.random.default_rng(3)
    B = rng.standard_normal((M, 9)) * np.logspace(0, -8, 9)  # the last directions are dropped
    A = rng.standard_normal((9, N))
    update = decompose(B, A, top=3)
    assert isinstance(update, StackedUpdate) and update.leading == 3
    assert all(x.dtype == np.float32 for x in (update.B, update.A, update.U, update.S, update.Vt))
    np.testing.assert_array_equal(update.B, B.astype(np.float32))  # the product itself, whole
    np.testing.assert_array_equal(update.A, A.astype(np.float32))
    U, S, Vt = np.linalg.svd(B @ A, full_matrices=False)
    assert update.rank == compress(B, A).rank == int(np.sum(M * 1.2e-7 * S[0] < S))
    np.testing.assert_allclose(update.S, S[: update.rank], rtol=1e-5, atol=1e-7 * S[0])
    assert update.norm == pytest.approx(np.linalg.norm(B @ A), rel=1e-5)
    np.testing.assert_allclose(update.U.T @ update.U, np.eye(3), atol=1e-5)
    monkeypatch.setattr(global_state, "compress", lambda *a: pytest.fail("no new SVD needed"))
    for r in (1, 3):
        Br, Ar = update.factors(r)
        close(Br.astype(np.float64) @ Ar, U[:, :r] * S[:r] @ Vt[:r])
    tail_B, tail_A = update.tail(1, 3)
    close(tail_B.astype(np.float64) @ tail_A, U[:, 1:3] * S[1:3] @ Vt[1:3])
    with pytest.raises(ValueError, match="only 3 singular triplets"):
        update.tail(2, 5)
    monkeypatch.undo()
    Br, Ar = update.factors(5)  # beyond the stored triplets: one more decomposition
    close(Br.astype(np.float64) @ Ar, U[:, :5] * S[:5] @ Vt[:5], rtol=1e-4)


def test_decompose_of_a_rank_deficient_or_zero_product() -> None:
    rng = np.random.default_rng(1)
    B = rng.standard_normal((M, 3))
    B = np.concatenate([B, B[:, :2]], axis=1)  # rank 3 written with 5 columns
    A = rng.standard_normal((5, N))
    update = decompose(B, A, top=8)
    assert update.rank == update.leading == 3 and update.whole()[0].shape == (M, 5)
    close(dense(update), B @ A)
    B3, A3 = update.factors(8)
    close(B3.astype(np.float64) @ A3, B @ A)
    zero = decompose(np.zeros((M, 4)), A[:4], top=8)
    assert zero.rank == zero.leading == 0 and zero.norm == 0.0


# --------------------------------------------------------------------------- adapter mode


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_adapter_round_matches_dense_reference(method: str) -> None:
    updates = [client(0, 2, 30, 0), client(1, 4, 10, 0), client(2, 8, 60, 0)]
    state, diag = aggregate_round(start_state(), updates, settings(method))
    assert state.round == 1 and state.merged == {}
    assert state.ranks == {0: 2, 1: 4, 2: 8}
    for name in MODULES:
        reference = REFERENCES[method](updates, name)
        close(dense(state.adapter[name]), reference)
        assert state.adapter[name].rank == 14  # Σ r_k: nothing lost before allocation
        U, S, Vt = np.linalg.svd(reference, full_matrices=False)
        for rank in (2, 4, 8):  # each client starts from the best rank-r_k truncation
            B, A = state.client_payload(rank, "us")[name]
            close(B.astype(np.float64) @ A, U[:, :rank] * S[:rank] @ Vt[:rank])
    assert diag["carried_energy_share"] == 0.0
    assert diag["global_rank"] == 14


def test_raflora_differs_from_flexlora_with_heterogeneous_ranks() -> None:
    updates = [client(0, 2, 30, 0), client(1, 4, 10, 0), client(2, 8, 60, 0)]
    flex, _ = aggregate_round(start_state(), updates, settings("flexlora"))
    ra, _ = aggregate_round(start_state(), updates, settings("raflora"))
    gap = np.linalg.norm(dense(flex.adapter[MODULES[0]]) - dense(ra.adapter[MODULES[0]]))
    assert gap > 0.1 * np.linalg.norm(dense(ra.adapter[MODULES[0]]))


def test_reply_order_does_not_change_the_result() -> None:
    updates = [client(0, 2, 30, 0), client(1, 4, 10, 0), client(2, 8, 60, 0)]
    forward, _ = aggregate_round(start_state(), updates, settings("raflora"))
    backward, _ = aggregate_round(start_state(), updates[::-1], settings("raflora"))
    for name in MODULES:
        for part in ("U", "S", "Vt"):
            assert np.array_equal(
                getattr(forward.adapter[name], part), getattr(backward.adapter[name], part)
            )


# --------------------------------------------------------------------------- carry-over


@pytest.mark.parametrize("form", ["stacked", "svd"])
def test_carry_over_keeps_uncovered_directions_exactly(form: str) -> None:
    """Sampled ranks {2, 4} < r_cap = 8: directions (4, 8] of the previous update stay (from
    the server's own state, or from a thin SVD loaded from an earlier checkpoint)."""
    previous = start_state(rank=10, form=form)
    ref = np.linalg.svd(dense(previous.adapter[MODULES[0]]), compute_uv=False)
    np.testing.assert_allclose(previous.adapter[MODULES[0]].S, ref[:10], rtol=1e-5)
    updates = [client(0, 2, 30, 1), client(1, 4, 10, 1)]
    state, diag = aggregate_round(previous, updates, settings("raflora", carry_over=True))
    for name in MODULES:
        old = previous.adapter[name]
        tail = old.U[:, 4:8].astype(np.float64) * old.S[4:8] @ old.Vt[4:8]
        close(dense(state.adapter[name]), ref_raflora(updates, name) + tail)
    carried = [
        np.sum(previous.adapter[n].S[4:8].astype(np.float64) ** 2)
        / np.sum(state.adapter[n].S.astype(np.float64) ** 2)
        for n in MODULES
    ]
    assert diag["carried_energy_share"] == pytest.approx(np.mean(carried), rel=1e-5)
    assert 0 < diag["carried_energy_share"] < 1


def test_one_svd_per_module_and_round_with_carry_over(monkeypatch) -> None:
    """The carried tail joins the aggregate before the (only) decomposition of each module,
    which keeps the federation's largest rank of triplets; no full thin SVD is taken."""
    from raflora.math import round as global_state

    calls = []
    original = global_state.decompose
    monkeypatch.setattr(
        global_state,
        "decompose",
        lambda B, A, top, **kw: calls.append((B.shape[1], top)) or original(B, A, top, **kw),
    )
    monkeypatch.setattr(global_state, "compress", lambda *a: pytest.fail("a full thin SVD"))
    previous = start_state(rank=10)
    updates = [client(0, 2, 30, 1), client(1, 4, 10, 1)]
    state, _ = aggregate_round(previous, updates, settings("raflora", carry_over=True))
    assert len(calls) == len(MODULES)
    assert all(width > 2 + 4 and top == 8 for width, top in calls), "carried directions included"
    assert all(state.adapter[name].leading == 8 for name in MODULES)


def test_without_carry_over_uncovered_directions_vanish() -> None:
    previous = start_state(rank=10)
    updates = [client(0, 2, 30, 1), client(1, 4, 10, 1)]
    state, diag = aggregate_round(previous, updates, settings("raflora", carry_over=False))
    for name in MODULES:
        close(dense(state.adapter[name]), ref_raflora(updates, name))
    assert diag["carried_energy_share"] == 0.0


def test_full_participation_never_carries() -> None:
    previous = start_state(rank=10)
    updates = [client(0, 2, 30, 1), client(1, 4, 10, 1), client(2, 8, 5, 1)]
    state, diag = aggregate_round(previous, updates, settings("raflora", carry_over=True))
    for name in MODULES:
        close(dense(state.adapter[name]), ref_raflora(updates, name))
    assert diag["carried_energy_share"] == 0.0


def test_carry_over_applies_to_baselines_when_asked() -> None:
    previous = start_state(rank=8)
    updates = [client(0, 2, 30, 1), client(1, 2, 10, 1)]
    state, _ = aggregate_round(previous, updates, settings("flexlora", carry_over=True))
    for name in MODULES:
        old = previous.adapter[name]
        tail = old.U[:, 2:8].astype(np.float64) * old.S[2:8] @ old.Vt[2:8]
        close(dense(state.adapter[name]), ref_flexlora(updates, name) + tail)


# --------------------------------------------------------------------------- merge mode


def test_merge_mode_accumulates_merged_updates() -> None:
    """FLoRA: D_t = D_{t-1} + ΔW_t, no adapter kept."""
    rounds = [
        [client(0, 2, 30, 5), client(1, 4, 10, 5), client(2, 8, 60, 5)],
        [client(0, 2, 30, 6), client(1, 4, 10, 6), client(2, 8, 60, 6)],
    ]
    state = start_state()
    expected = {name: np.zeros((M, N)) for name in MODULES}
    for updates in rounds:
        state, diag = aggregate_round(state, updates, settings("flora", apply="merge"))
        for name in MODULES:
            round_update = ref_flexlora(updates, name)  # flora's product is Σ p_k B_k A_k
            expected[name] += round_update
            close(dense(state.merged[name]), expected[name])
            # diagnostics describe the round's update ΔW_t, not the accumulated D_t
            S_t = np.linalg.svd(round_update, compute_uv=False)
            energy = np.sum(S_t[:2] ** 2) / np.sum(S_t**2)
            assert diag["per_module"][name]["top_rmin_energy"] == pytest.approx(energy, rel=1e-4)
        assert state.adapter == {}
        assert state.total_update() is state.merged
        assert diag["global_rank"] == max(u.rank for u in state.merged.values()) > 0
    assert state.round == 2


def test_merge_mode_decomposes_each_module_once_per_round(monkeypatch) -> None:
    """Round 1: D_1 = ΔW_1, one compress serves state and diagnostics; later rounds: the
    round's singular values alone (no vectors), then the compress of D_{t-1} + ΔW_t."""
    from raflora.math import round as global_state

    calls: list[str] = []

    def counted(name: str):
        original = getattr(global_state, name)

        def wrapper(B: np.ndarray, A: np.ndarray, **kw):
            calls.append(name)
            return original(B, A, **kw)

        return wrapper

    for name in ("compress", "compressed_values"):
        monkeypatch.setattr(global_state, name, counted(name))
    state = start_state()
    for seed in (5, 6):
        calls.clear()
        updates = [client(0, 2, 30, seed), client(1, 4, 10, seed), client(2, 8, 60, seed)]
        state, _ = aggregate_round(state, updates, settings("flora", apply="merge"))
        assert calls.count("compress") == len(MODULES)
        assert calls.count("compressed_values") == (0 if seed == 5 else len(MODULES))


# --------------------------------------------------------------------------- dense heads


def test_dense_trainables_are_fedavg() -> None:
    updates = [client(0, 2, 30, 0), client(1, 4, 10, 0), client(2, 8, 60, 0)]
    out = weighted_dense_average(updates)
    expected = (
        sum(u.num_examples * u.dense["classifier.weight"].astype(np.float64) for u in updates) / 100
    )
    assert out["classifier.weight"].dtype == np.float32
    np.testing.assert_allclose(out["classifier.weight"], expected, rtol=1e-6)
    state, _ = aggregate_round(start_state(), updates, settings("raflora"))
    np.testing.assert_array_equal(state.dense["classifier.weight"], out["classifier.weight"])


def test_dense_average_weights_only_the_holders() -> None:
    a = ClientUpdate(0, 2, 10, {}, dense={"x": np.ones(3, np.float32)})
    b = ClientUpdate(
        1, 2, 30, {}, dense={"x": 3 * np.ones(3, np.float32), "y": np.ones(2, np.float32)}
    )
    out = weighted_dense_average([a, b])
    np.testing.assert_allclose(out["x"], 2.5)
    np.testing.assert_allclose(out["y"], 1.0)  # only b holds y: its own value


# --------------------------------------------------------------------------- diagnostics


def test_diagnostics_use_the_federation_bounds_every_round() -> None:
    """Rounds that sample different ranks still report one energy per federation partition."""
    state = start_state()
    cfg = settings("raflora", bounds=(2, 4, 8), carry_over=True)
    for seed, ranks in enumerate([(2, 4, 8), (2, 4), (2,), (4, 8)]):
        updates = [client(pid, r, 10 + pid, seed) for pid, r in enumerate(ranks)]
        state, diag = aggregate_round(state, updates, cfg)
        assert len(diag["partition_energy"]) == 4  # (0,2], (2,4], (4,8], beyond 8
        assert sum(diag["partition_energy"]) == pytest.approx(1.0, abs=1e-6)
        for name in MODULES:
            S = np.sort(np.linalg.svd(dense(state.adapter[name]), compute_uv=False))[::-1]
            share = np.sum(S[:2] ** 2) / np.sum(S**2)
            assert diag["per_module"][name]["top_rmin_energy"] == pytest.approx(share, rel=1e-4)
            assert diag["per_module"][name]["norm"] == pytest.approx(
                np.linalg.norm(dense(state.adapter[name])), rel=1e-5
            )
        worst = max(d["top_rmin_energy"] for d in diag["per_module"].values())
        assert diag["top_rmin_energy_worst"] == pytest.approx(worst)
        assert 1.0 <= diag["effective_rank"] <= state.adapter[MODULES[0]].rank


def test_empty_update_has_rank_zero() -> None:
    update = empty_update(M, N)
    assert update.rank == 0 and update.norm == 0.0
    B, A = update.factors(4)
    assert B.shape == (M, 0) and A.shape == (0, N)
