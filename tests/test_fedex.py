"""FedEx-LoRA's protocol against an independent numpy implementation of its paper (Singhal et
al., ACL 2025): two rounds of server → clients → server with fixed client updates, through
the math layer's round step and through the Flower strategy (what each client receives, the
global model, the bytes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType

from helpers.fakegrid import task_identity
from helpers.replies import train_reply
from raflora.config import config_from_dict
from raflora.federation import messages as msg
from raflora.federation.strategy import HeteroRankStrategy, NodeInfo
from raflora.federation.validation import Expectation
from raflora.math import aggregate, get_method
from raflora.math.round import ClientUpdate, GlobalState, RoundSettings, aggregate_round

M, N = 9, 7
MODULES = {"enc.0.query": (M, N), "enc.1.value": (M, N)}
RANKS = [2, 3, 5]
SIZES = [10, 20, 30]
NODE = {pid: 2**63 + 1000 - 7 * pid for pid in range(3)}


# --------------------------------------------------------------------------- numpy reference


def ref_round(clients: list[tuple[np.ndarray, np.ndarray]], sizes: list[int]):
    """One FedEx-LoRA server step (paper eq. for heterogeneous ranks by zero-padding):
    B̄ = Σ p_k [B_k 0], Ā = Σ p_k [A_k; 0], residual = Σ p_k B_k A_k − B̄ Ā (m, n), dense."""
    p = np.asarray(sizes, np.float64) / np.sum(sizes)
    r_max = max(B.shape[1] for B, _ in clients)
    B_bar, A_bar = np.zeros((M, r_max)), np.zeros((r_max, N))
    for pk, (B, A) in zip(p, clients, strict=True):
        B_bar[:, : B.shape[1]] += pk * B
        A_bar[: A.shape[0]] += pk * A
    exact = sum(pk * B @ A for pk, (B, A) in zip(p, clients, strict=True))
    return B_bar, A_bar, exact - B_bar @ A_bar


def client_factors(round_: int) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Fixed trained factors per client and module (float32, as on the wire)."""
    out = []
    for k, r in enumerate(RANKS):
        rng = np.random.default_rng([round_, k])
        out.append(
            {
                name: (
                    rng.standard_normal((m, r)).astype(np.float32),
                    rng.standard_normal((r, n)).astype(np.float32),
                )
                for name, (m, n) in MODULES.items()
            }
        )
    return out


def f64(factors):
    return [(B.astype(np.float64), A.astype(np.float64)) for B, A in factors]


# --------------------------------------------------------------------------- math layer


def test_two_rounds_of_the_round_step_match_the_reference() -> None:
    settings = RoundSettings.of(get_method("fedex"), bounds=tuple(RANKS), dtype=np.float64)
    state = GlobalState(0, {}, {}, {}, {})
    merged_ref = {name: np.zeros((M, N)) for name in MODULES}  # Σ_t residual_t
    for t in (1, 2):
        trained = client_factors(t)
        updates = [
            ClientUpdate(k, r, SIZES[k], {n: tuple(x.astype(np.float64) for x in f[n]) for n in f})
            for k, (r, f) in enumerate(zip(RANKS, trained, strict=True))
        ]
        state, diagnostics = aggregate_round(state, updates, settings)
        for name in MODULES:
            B_bar, A_bar, residual = ref_round(f64([f[name] for f in trained]), SIZES)
            exact = residual + B_bar @ A_bar  # Σ p_k B_k A_k
            # the adapter is the averaged factors themselves, not a re-factorisation
            B, A = state.adapter[name].whole()
            np.testing.assert_allclose(B, B_bar, atol=1e-12)
            np.testing.assert_allclose(A, A_bar, atol=1e-12)
            # what round t merged: the residual, as [p_k B_k …, −B̄] [A_k; …; Ā]
            Bt, At = state.merged_rounds[t][name]
            assert Bt.shape == (M, sum(RANKS) + max(RANKS)) and At.shape[0] == Bt.shape[1]
            np.testing.assert_allclose(Bt @ At, residual, atol=1e-12)
            # the global model W + D_t + B̄ Ā is the mean of the clients' models exactly:
            # each client k trained W + D_{t-1} + B_k A_k
            total = state.total_update()[name]
            np.testing.assert_allclose(
                (total.U * total.S) @ total.Vt, merged_ref[name] + exact, atol=1e-10
            )
            merged_ref[name] += residual
            D = state.merged[name]
            np.testing.assert_allclose((D.U * D.S) @ D.Vt, merged_ref[name], atol=1e-10)
            # what a client of rank r restarts from: the leading slices
            for r in RANKS:
                Bk, Ak = state.client_payload(r, "us", "slice")[name]
                np.testing.assert_array_equal(Bk, B[:, :r])
                np.testing.assert_array_equal(Ak, A[:r])
            share = diagnostics["per_module"][name]["residual_share"]
            assert share == pytest.approx(
                np.linalg.norm(residual) / np.linalg.norm(exact), rel=1e-9
            )
        assert sorted(state.merged_rounds) == list(range(1, t + 1))


def test_equal_ranks_and_one_client_leave_a_residual_only_when_averaging_is_inexact() -> None:
    """One client: B̄ Ā = B A, residual 0; two clients of one rank: FedIT's inexactness."""
    one = client_factors(1)[2]["enc.0.query"]
    B_bar, A_bar, residual = ref_round(f64([one]), [5])
    assert np.abs(residual).max() < 1e-12
    two = [client_factors(1)[2]["enc.0.query"], client_factors(2)[2]["enc.0.query"]]
    B_bar, A_bar, residual = ref_round(f64(two), [1, 1])
    assert np.linalg.norm(residual) > 0.1 * np.linalg.norm(B_bar @ A_bar)
    B, A = aggregate("fedex", f64(two), [1, 1])  # the public API: the averaged factors
    np.testing.assert_allclose(B @ A, B_bar @ A_bar, atol=1e-12)


# --------------------------------------------------------------------------- Flower strategy


@pytest.fixture(autouse=True)
def _identity():
    with task_identity():
        yield


def fedex_strategy(residual_wire: str = "factored", wire: str = "rounds") -> HeteroRankStrategy:
    federation = {
        "method": "fedex",
        "options": {"residual_wire": residual_wire},
        "merged_wire": wire,
    }
    config = config_from_dict(
        {"clients": {"num_clients": 3, "ranks": RANKS}, "federation": federation}
    )
    head = {"classifier.weight": np.zeros((2, 4), np.float32)}
    s = HeteroRankStrategy(
        config=config,
        state=GlobalState(0, {}, {}, head, {}),
        expectation=Expectation(modules=dict(MODULES), dense={"classifier.weight": (2, 4)}),
    )
    s.register_nodes(NodeInfo(NODE[k], k, r, SIZES[k]) for k, r in enumerate(RANKS))
    return s


def replies(t: int, through: int):
    return [
        train_reply(
            NODE[k],
            client_factors(t)[k],
            SIZES[k],
            {"classifier.weight": np.full((2, 4), float(k), np.float32)},
            extra={msg.MERGED_THROUGH: through},
        )
        for k in range(3)
    ]


def received(out) -> dict[int, msg.Payload]:
    by_node = {m.metadata.dst_node_id: m for m in out}
    return {k: msg.unpack_payload(by_node[NODE[k]].content[msg.ARRAYS]) for k in range(3)}


def test_two_rounds_through_the_strategy_what_clients_receive_and_bytes() -> None:
    s = fedex_strategy()
    first = received(list(s.configure_train(1, None, ConfigRecord(), grid=None)))
    assert all(p.lora == {} and p.rounds == {} for p in first.values())  # fresh LoRA, W_0
    s.aggregate_train(1, replies(1, through=0))
    out = list(s.configure_train(2, None, ConfigRecord(), grid=None))
    got = received(out)
    floats = 0
    for k, r in enumerate(RANKS):
        payload = got[k]
        assert list(payload.rounds) == [1] and payload.merged == {}
        for name in MODULES:
            B_bar, A_bar, residual = ref_round(f64([f[name] for f in client_factors(1)]), SIZES)
            B, A = payload.lora[name]  # the slices of the averaged factors, not an SVD
            np.testing.assert_allclose(B, B_bar[:, :r], atol=1e-6)
            np.testing.assert_allclose(A, A_bar[:r], atol=1e-6)
            Bt, At = payload.rounds[1][name]  # round 1's residual, factored
            assert Bt.shape == (M, sum(RANKS) + max(RANKS))
            np.testing.assert_allclose(Bt.astype(np.float64) @ At, residual, atol=1e-5)
        floats += sum(x.size for pair in payload.lora.values() for x in pair)
        floats += sum(x.size for pair in payload.rounds[1].values() for x in pair)
        floats += sum(x.size for x in payload.dense.values())
    # down, per module: Σ_k r_k (m + n) slices + K (Σ_k r_k + r_max)(m + n) residual, + heads
    R = sum(RANKS) + max(RANKS)
    assert floats == len(MODULES) * (M + N) * (sum(RANKS) + 3 * R) + 3 * 8
    assert s.current.bytes_sent == sum(m.content[msg.ARRAYS].count_bytes() for m in out)
    assert 4 * floats < s.current.bytes_sent < 4 * floats + 250 * 3 * (4 * len(MODULES) + 1)
    # round 2: the clients confirm round 1, so round 3 carries round 2's residual only
    s.aggregate_train(2, replies(2, through=1))
    got = received(list(s.configure_train(3, None, ConfigRecord(), grid=None)))
    assert all(list(p.rounds) == [2] for p in got.values())
    for name in MODULES:
        _, _, residual = ref_round(f64([f[name] for f in client_factors(2)]), SIZES)
        Bt, At = got[0].rounds[2][name]
        np.testing.assert_allclose(Bt.astype(np.float64) @ At, residual, atol=1e-5)


# --------------------------------------------------------------------------- the dense wire

NPY_HEADER = 128  # Flower's count_bytes: per array 4 bytes a float + the npy header + its key


def array_bytes(key: str, floats: int) -> int:
    return 4 * floats + NPY_HEADER + len(key)


def base_model(seed: int = 0) -> torch.nn.Module:
    """Linear layers at the MODULES' names, weight (m, n) = (out, in), like a client's base."""
    torch.manual_seed(seed)
    layer = {"0": {"query": torch.nn.Linear(N, M)}, "1": {"value": torch.nn.Linear(N, M)}}
    return torch.nn.ModuleDict(
        {"enc": torch.nn.ModuleDict({k: torch.nn.ModuleDict(v) for k, v in layer.items()})}
    )


def run_rounds(residual_wire: str, rounds: int) -> tuple[HeteroRankStrategy, list[dict]]:
    """``rounds`` rounds through the strategy (clients confirm each merged round); per round
    what each client received, and the bytes the strategy counted."""
    s = fedex_strategy(residual_wire)
    out = []
    for t in range(1, rounds + 1):
        sent = list(s.configure_train(t, None, ConfigRecord(), grid=None))
        out.append({"payloads": received(sent), "bytes": s.current.bytes_sent})
        s.aggregate_train(t, replies(t, through=t - 1))
    return s, out


def test_the_dense_residual_wire_sends_the_papers_matrix_and_counts_m_n_floats() -> None:
    """``residual_wire = "dense"``: from round 2 each client gets the previous round's residual
    as one m×n array per module (the numpy reference's, to float32 rounding), once; its bytes
    are the factored round's with (Σ r_k + r_max)(m + n) replaced by m n per module."""
    dense_strategy, dense = run_rounds("dense", 3)
    factored_strategy, factored = run_rounds("factored", 3)
    assert dense[0]["bytes"] == factored[0]["bytes"]  # round 1: nothing merged yet
    R = sum(RANKS) + max(RANKS)
    for t in (2, 3):
        for k in range(len(RANKS)):
            payload = dense[t - 1]["payloads"][k]
            assert list(payload.rounds) == [t - 1] and payload.merged == {}
            for name in MODULES:
                _, _, residual = ref_round(f64([f[name] for f in client_factors(t - 1)]), SIZES)
                D, none = payload.rounds[t - 1][name]
                assert none is None and D.shape == (M, N)
                np.testing.assert_allclose(D, residual, atol=1e-5)
                # the adapter slices are the factored wire's
                for got, want in zip(
                    payload.lora[name], factored[t - 1]["payloads"][k].lora[name], strict=True
                ):
                    np.testing.assert_array_equal(got, want)
        per_client_dense = sum(array_bytes(f"{n}.merged@{t - 1}", M * N) for n in MODULES)
        per_client_factored = sum(
            array_bytes(f"{n}.merged_B@{t - 1}", M * R)
            + array_bytes(f"{n}.merged_A@{t - 1}", R * N)
            for n in MODULES
        )
        slices = sum(
            array_bytes(f"{n}.lora_B", M * r) + array_bytes(f"{n}.lora_A", r * N)
            for n in MODULES
            for r in RANKS
        )
        head = array_bytes("dense.classifier.weight", 8)
        assert dense[t - 1]["bytes"] == slices + 3 * (per_client_dense + head)
        assert dense[t - 1]["bytes"] - factored[t - 1]["bytes"] == 3 * (
            per_client_dense - per_client_factored
        )
    # the same global state either way (the wire does not change the aggregation)
    for name in MODULES:
        a, b = (
            dense_strategy.state.total_update()[name],
            factored_strategy.state.total_update()[name],
        )
        np.testing.assert_allclose((a.U * a.S) @ a.Vt, (b.U * b.S) @ b.Vt, atol=1e-6)


def test_a_client_base_is_the_same_from_either_wire() -> None:
    """A client that holds round 1 and receives round 2 (`client.merged_factors`, then
    `merge_into_base`) ends at W_0 + residual_1 + residual_2 (numpy reference) either way."""
    from raflora.federation.client import merge_into_base, merged_factors

    bases = {}
    for wire in ("dense", "factored"):
        _, out = run_rounds(wire, 3)
        held = {1: out[1]["payloads"][0].rounds[1]}  # kept from round 2's message
        sent = out[2]["payloads"][0].rounds  # round 3's message: round 2 only
        merged = merged_factors([1, 2], held, sent, refusal=msg.MISSING_ROUNDS)
        if wire == "dense":
            assert all(A is None and D.shape == (M, N) for D, A in merged.values())
        bases[wire] = base_model()
        merge_into_base(bases[wire], merged)
    start = base_model()
    for name in MODULES:
        want = start.get_submodule(name).weight.detach().double().numpy()
        for t in (1, 2):
            want = want + ref_round(f64([f[name] for f in client_factors(t)]), SIZES)[2]
        for wire, model in bases.items():
            got = model.get_submodule(name).weight.detach().double().numpy()
            np.testing.assert_allclose(got, want, atol=2e-5, err_msg=wire)


def test_the_whole_merged_sum_goes_dense_too() -> None:
    """``merged_wire = "total"`` with the dense residual: every message carries D_{t-1} =
    Σ residuals as one m×n array per module."""
    s = fedex_strategy("dense", wire="total")
    want = {name: np.zeros((M, N)) for name in MODULES}
    for t in (1, 2, 3):
        got = received(list(s.configure_train(t, None, ConfigRecord(), grid=None)))
        for payload in got.values():
            assert payload.rounds == {}
            assert set(payload.merged) == (set(MODULES) if t > 1 else set())
            for name, (D, none) in payload.merged.items():
                assert none is None
                np.testing.assert_allclose(D, want[name], atol=1e-5)
        s.aggregate_train(t, replies(t, through=0))
        for name in MODULES:
            want[name] += ref_round(f64([f[name] for f in client_factors(t)]), SIZES)[2]


def test_dense_and_factored_merged_pairs_survive_pack_and_unpack() -> None:
    D = np.arange(M * N, dtype=np.float32).reshape(M, N)
    B, A = client_factors(1)[0]["enc.0.query"]
    record = msg.pack(merged={"a.b": (D, None)}, rounds={2: {"a.b": (D, None), "c": (B, A)}})
    assert sorted(record) == ["a.b.merged", "a.b.merged@2", "c.merged_A@2", "c.merged_B@2"]
    payload = msg.unpack_payload(record)
    np.testing.assert_array_equal(payload.merged["a.b"][0], D)
    assert payload.merged["a.b"][1] is None and payload.rounds[2]["a.b"][1] is None
    np.testing.assert_array_equal(payload.rounds[2]["c"][1], A)
    mixed = msg.pack(rounds={2: {"c": (B, A)}})
    mixed["c.merged@2"] = mixed["c.merged_B@2"]
    with pytest.raises(msg.MessageFormatError, match="'c'"):
        msg.unpack_payload(mixed)


def test_residual_wire_is_checked() -> None:
    with pytest.raises(ValueError, match="residual_wire = 'sparse' must be 'factored'"):
        get_method("fedex").build_options(residual_wire="sparse")


@pytest.mark.usefixtures("single_torch_thread")
def test_whole_runs_with_either_wire_end_at_the_same_model(tiny_bert_dir, tmp_path) -> None:
    """Three in-process rounds on the tiny BERT through the real ClientApp: the clients keep
    the dense residuals in their node state and train and evaluate as with the factored wire
    (same losses to float32 rounding); from round 2 every client receives m n floats per
    module for the residual of the round before."""
    from helpers.runs import run_in_process, tiny_config
    from raflora.federation import client_app

    runs = {}
    for wire in ("factored", "dense"):
        config = tiny_config(
            tiny_bert_dir,
            "federation.method=fedex",
            "federation.rounds=3",
            f"federation.options.residual_wire={wire}",
        )
        runs[wire] = run_in_process(config, tmp_path / wire, finish=False)
    for t in (1, 2, 3):
        a, b = runs["dense"]["history"][t], runs["factored"]["history"][t]
        assert a["server_loss"] == pytest.approx(b["server_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    grid = runs["dense"]["grid"]
    for t in (2, 3):
        sent = [
            m
            for m in grid.sent
            if m.metadata.group_id == str(t) and m.metadata.message_type == MessageType.TRAIN
        ]
        assert len(sent) == 3
        for message in sent:
            payload = msg.unpack_payload(message.content[msg.ARRAYS])
            assert list(payload.rounds) == [t - 1]
            assert all(A is None and D.shape == (32, 32) for D, A in payload.rounds[t - 1].values())
            assert len(payload.rounds[t - 1]) == 4  # query, value × 2 layers
    for context in grid.contexts.values():
        keys = [k for k in context.state if k.startswith(client_app.STATE_PREFIX)]
        assert sorted(int(k.rsplit("@", 1)[1]) for k in keys) == [1, 2, 3]
