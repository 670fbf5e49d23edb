"""FFA-LoRA and FLoRIST: each protocol against an independent numpy reference over two rounds
(what each client receives, the global update, the bytes), plus their synthetic and federated
runs (tiny BERT, in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from helpers.fakegrid import FakeGrid
from helpers.runs import run_in_process, tiny_config
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.math import aggregate, get_method
from raflora.math.methods.florist import FloristOptions, kept_rank
from raflora.math.round import ClientUpdate, GlobalState, RoundSettings, aggregate_round
from raflora.synthetic import SyntheticConfig, frozen_a, local_train, make_task, run
from raflora.training import in_features, set_lora_A_trainable, shared_lora_A

M, N = 12, 10
RANKS = [2, 4, 4, 8]
WEIGHTS = [30.0, 10.0, 20.0, 40.0]
P = np.array(WEIGHTS) / sum(WEIGHTS)


def empty_state() -> GlobalState:
    return GlobalState(round=0, adapter={}, merged={}, dense={}, ranks={})


def updates(factors: list[tuple[np.ndarray, np.ndarray]]) -> list[ClientUpdate]:
    return [
        ClientUpdate(k, B.shape[1], int(WEIGHTS[k]), {"w": (B, A)})
        for k, (B, A) in enumerate(factors)
    ]


def product(pair) -> np.ndarray:
    B, A = pair
    return np.asarray(B, np.float64) @ np.asarray(A, np.float64)


# --------------------------------------------------------------------- FFA-LoRA protocol


def ffa_reference_round(A0: np.ndarray, starts: list[np.ndarray], steps: list[np.ndarray]):
    """Numpy FFA-LoRA round: client k trains B_k = start_k + step_k with A_0[:r_k] fixed; the
    server zero-pads and averages B. Returns (B̄ (m, r_max), ΔW = B̄ A_0[:r_max])."""
    r_max = max(RANKS)
    B_bar = np.zeros((M, r_max))
    for k, r in enumerate(RANKS):
        B_bar[:, :r] += P[k] * (starts[k] + steps[k])
    return B_bar, B_bar @ A0[:r_max]


def test_ffa_lora_two_rounds_match_the_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    A0 = rng.standard_normal((max(RANKS), N))  # the shared frozen A
    settings = RoundSettings.of(get_method("ffa_lora"), bounds=(2, 4, 8), dtype=np.float64)
    state = empty_state()
    starts = [np.zeros((M, r)) for r in RANKS]  # round 1: LoRA's B = 0
    for _ in range(2):
        steps = [rng.standard_normal((M, r)) for r in RANKS]
        B_ref, W_ref = ffa_reference_round(A0, starts, steps)
        trained = [(s + d, A0[:r]) for s, d, r in zip(starts, steps, RANKS, strict=True)]
        # exact by construction: the average of products is the product of the averages
        exact = sum(P[k] * product(pair) for k, pair in enumerate(trained))
        np.testing.assert_allclose(W_ref, exact, atol=1e-12)
        state, _ = aggregate_round(state, updates(trained), settings)
        np.testing.assert_allclose(product(state.adapter["w"].whole()), W_ref, atol=1e-10)
        starts = []
        for r in RANKS:  # what a client of rank r receives: B̄[:, :r] with A_0[:r]
            B, A = state.client_payload(r, "us", "slice")["w"]
            np.testing.assert_allclose(B, B_ref[:, :r], atol=1e-12)
            np.testing.assert_array_equal(A, A0[:r])
            starts.append(B)
    # bytes: a rank-r client gets B (m, r) alone; A travels neither way
    record = msg.pack(lora=state.client_payload(8, "us", "slice"), frozen_a=True)
    assert list(record) == ["w.lora_B"] and record["w.lora_B"].numpy().shape == (M, 8)
    full = msg.pack(lora=state.client_payload(8, "us", "slice"))
    assert full.count_bytes() - record.count_bytes() == len("w.lora_A") + len(
        full["w.lora_A"].data
    )


def test_ffa_lora_refuses_a_client_that_changed_a() -> None:
    rng = np.random.default_rng(1)
    A0 = rng.standard_normal((8, N))
    factors = [(rng.standard_normal((M, r)), A0[:r].copy()) for r in RANKS]
    _, A = aggregate("ffa_lora", factors, WEIGHTS)
    np.testing.assert_array_equal(A, A0)
    factors[1][1][0, 0] += 1e-3
    with pytest.raises(ValueError, match="client 1's A is not the shared frozen A"):
        aggregate("ffa_lora", factors, WEIGHTS)


def test_ffa_lora_needs_slice_allocation() -> None:
    from raflora.math.methods import Method, register

    with pytest.raises(ValueError, match="frozen A needs slice allocation"):
        register(
            Method(name="frozen_svd", summary="", paper="", aggregate=None, frozen_a=True)
        )


# --------------------------------------------------------------------- FLoRIST protocol


def florist_reference(factors, tau: float) -> tuple[np.ndarray, int]:
    """Numpy FLoRIST server step: the dense Σ p_k B_k A_k, its SVD, the fewest directions with
    energy share ≥ τ; returns (U_p S_p V_pᵀ, p)."""
    W = sum(P[k] * B @ A for k, (B, A) in enumerate(factors))
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    share = np.cumsum(S**2) / np.sum(S**2)
    p = int(np.argmax(share >= tau - 1e-12)) + 1
    return (U[:, :p] * S[:p]) @ Vt[:p], p


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_florist_two_rounds_match_the_numpy_reference(tau: float) -> None:
    rng = np.random.default_rng(2)
    settings = RoundSettings.of(
        get_method("florist"), {"threshold": tau}, bounds=(2, 4, 8), dtype=np.float64
    )
    state, merged = empty_state(), np.zeros((M, N))
    for _ in range(2):  # clients start each round from a fresh LoRA: any new factors
        factors = [(rng.standard_normal((M, r)), rng.standard_normal((r, N))) for r in RANKS]
        W_ref, p = florist_reference(factors, tau)
        B_g, A_g = aggregate("florist", factors, WEIGHTS, threshold=tau)
        assert B_g.shape == (M, p) and A_g.shape == (p, N)  # one pair for every client
        np.testing.assert_allclose(B_g @ A_g, W_ref, atol=1e-10)
        np.testing.assert_allclose(A_g @ A_g.T, np.eye(p), atol=1e-10)  # A_g = V_pᵀ
        state, diagnostics = aggregate_round(state, updates(factors), settings)
        merged = merged + W_ref  # clients fold each round's global adapters into the base
        spectrum = diagnostics["per_module"]["w"]["energy_spectrum"]  # the round's own ΔW_t
        assert len(spectrum) == p and sum(spectrum) == pytest.approx(1.0)
        assert state.adapter == {} and state.client_payload(8, "us", "svd") == {}
        np.testing.assert_allclose(product(state.merged["w"].whole()), merged, atol=1e-9)
    # down: the global adapters, p_t (m + n) floats per client, below FLoRA's Σ r_k (m + n)
    assert p * (M + N) < sum(RANKS) * (M + N)


def test_florist_threshold_one_is_the_exact_aggregate() -> None:
    rng = np.random.default_rng(3)
    factors = [(rng.standard_normal((M, r)), rng.standard_normal((r, N))) for r in RANKS]
    B, A = aggregate("florist", factors, WEIGHTS, threshold=1.0)
    exact = sum(P[k] * B_k @ A_k for k, (B_k, A_k) in enumerate(factors))
    np.testing.assert_allclose(B @ A, exact, atol=1e-10)
    assert B.shape[1] == min(M, N)  # every direction of a full-rank Σ


def test_florist_kept_rank_and_options() -> None:
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    thresholds = (0.5, 9 / 14, 0.92, 13 / 14, 0.93, 1.0)
    assert [kept_rank(S, t) for t in thresholds] == [1, 1, 2, 2, 3, 3]
    assert kept_rank(torch.zeros(3), 0.9) == 1
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="threshold"):
            FloristOptions(threshold=bad)


# --------------------------------------------------------------------- synthetic


def test_synthetic_frozen_a_trains_b_only_and_both_methods_run() -> None:
    config = SyntheticConfig(m=16, n=12, target_rank=6, ranks=(1, 2, 2, 6), rounds=6)
    A = frozen_a(config, 6)
    np.testing.assert_array_equal(frozen_a(config, 2), A[:2])  # rank r: the first r rows
    B0 = torch.zeros(16, 6, dtype=torch.float64)
    B, A_after = local_train(B0, A, 0.0, make_task(config), 0, config, train_a=False)
    assert torch.equal(A_after, A) and B.abs().sum() > 0
    results = run(
        SyntheticConfig(**{**config.__dict__, "methods": ("ffa_lora", "florist")}),
        progress=False,
    )
    for method in ("ffa_lora", "florist"):
        errors = results[method]["rel_error"]
        assert np.all(np.isfinite(errors)) and errors[-1] < errors[0], method


# --------------------------------------------------------------------- federation


class RecordingGrid(FakeGrid):
    """A FakeGrid that also keeps every reply the server pulled."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list = []

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        self.received.extend(out)
        return out


@pytest.fixture(scope="module")
def ffa_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    config = tiny_config(tiny_bert_dir, "federation.method=ffa_lora")
    grid = RecordingGrid([{"partition-id": i} for i in range(config.clients.num_clients)])
    run = run_in_process(config, tmp_path_factory.mktemp("ffa"), grid=grid, finish=False)
    return {**run, "config": config}


@pytest.mark.usefixtures("single_torch_thread")
def test_ffa_lora_federated_run_sends_b_only_and_keeps_the_shared_a(ffa_run) -> None:
    config, grid, state, history = (ffa_run[k] for k in ("config", "grid", "state", "history"))
    ranks = {0: 2, 1: 4, 2: 8}
    assert state.ranks == ranks and len(history) == 3
    modules = sorted(state.adapter)
    assert len(modules) == 4
    # the server's kept A is the shared A_0[:r_max], rebuilt from the run seed alone
    for name in modules:
        B, A = state.adapter[name].whole()
        np.testing.assert_array_equal(A, task.shared_a(config, name, 8, 32))
        assert B.shape == (32, 8)
    head = {"classifier.weight": np.zeros((2, 32)), "classifier.bias": np.zeros(2)}

    def b_only_bytes(rank: int) -> int:
        lora = {name: (np.zeros((32, rank)), None) for name in modules}
        return msg.pack(lora=lora, dense=head, frozen_a=True).count_bytes()

    # every reply carries B alone: what the server counted is Σ_k of B-only records
    expected = sum(b_only_bytes(r) for r in ranks.values())
    assert all(record["bytes_received"] == expected for record in history[1:])
    train_replies = [r for r in grid.received if r.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) == 6
    for reply in train_replies:
        keys = list(reply.content[msg.ARRAYS])
        assert keys and not any(key.endswith(msg.LORA_A) for key in keys)
    # round 2: each client is sent B̄[:, :r] alone (B̄ = Σ p_k [B_k 0] of the round-1
    # replies, the numpy reference), which it completes with A_0[:r]
    first = train_replies[:3]
    weights = np.array([r.content[msg.METRICS][msg.NUM_EXAMPLES] for r in first], float)
    rows = task.shared_a_rows(config, lambda name: 32, 8)
    B_bar = {name: np.zeros((32, 8)) for name in modules}
    for reply, p in zip(first, weights / weights.sum(), strict=True):
        lora, _, _ = msg.unpack(reply.content[msg.ARRAYS], frozen_a=rows)
        for name in modules:
            B_k = lora[name][0]
            B_bar[name][:, : B_k.shape[1]] += p * B_k
    sent = [
        m
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == "2"
    ]
    assert history[2]["bytes_sent"] == sum(b_only_bytes(r) for r in ranks.values())
    for message in sent:
        rank = message.content[msg.CONFIG][msg.RANK]
        lora, _, _ = msg.unpack(message.content[msg.ARRAYS], frozen_a=rows)
        for name in modules:
            B, A = lora[name]
            np.testing.assert_allclose(B, B_bar[name][:, :rank], rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(A, task.shared_a(config, name, rank, 32))
        with pytest.raises(msg.MessageFormatError, match="lora_B alone"):
            msg.unpack(msg.pack(lora=lora), frozen_a=rows)  # a pair where B alone is due
    # a B beyond the largest rank, or of a module nobody has, gets no shared A
    too_wide = {modules[0]: (np.zeros((32, 9), np.float32), None)}
    with pytest.raises(msg.MessageFormatError, match=r"outside 1\.\.8"):
        msg.unpack(msg.pack(lora=too_wide, frozen_a=True), frozen_a=rows)
    strict = task.shared_a_rows(config, lambda name: {modules[0]: 32}[name], 8)
    unknown = {"no.such.module": (np.zeros((32, 2), np.float32), None)}
    with pytest.raises(msg.MessageFormatError, match="no shared A"):
        msg.unpack(msg.pack(lora=unknown, frozen_a=True), frozen_a=strict)


@pytest.mark.usefixtures("single_torch_thread")
def test_ffa_lora_client_trains_b_and_keeps_the_shared_a(ffa_run) -> None:
    """The client's own factors after a round: A is still A_0[:r] (frozen), B moved from the
    received B̄[:, :r]."""
    from raflora.federation import client as work

    config, state = ffa_run["config"], ffa_run["state"]
    ctx = work.client_context(config.to_json(), 1)  # rank 4
    lora = state.client_payload(ctx.rank, "us", "slice")
    factors, _, metrics = work.train_round(ctx, 3, ctx.rank, lora, {}, state.dense)
    assert metrics["rank"] == 4 and set(factors) == set(lora)
    for name, (B, A) in factors.items():
        np.testing.assert_array_equal(A, task.shared_a(config, name, 4, 32))
        assert not np.allclose(B, lora[name][0])
    # round 1 (nothing received): B starts at 0 with the same shared A, never a fresh init
    factors, _, _ = work.train_round(ctx, 1, ctx.rank, {}, {}, {})
    for name, (_, A) in factors.items():
        np.testing.assert_array_equal(A, task.shared_a(config, name, 4, 32))


def test_frozen_a_helpers(tiny_bert_dir: Path) -> None:
    from raflora.training import build_lora_model, load_base_model

    base, _ = load_base_model(str(tiny_bert_dir), "classification", num_labels=2)
    name = "bert.encoder.layer.0.attention.self.query"
    assert in_features(base, name) == 32
    with pytest.raises(KeyError, match="no module"):
        in_features(base, "bert.nothing")
    a8, a3 = shared_lora_A(5, name, 8, 32), shared_lora_A(5, name, 3, 32)
    assert torch.equal(a8[:3], a3) and not torch.equal(a8, shared_lora_A(6, name, 8, 32))
    model = build_lora_model(base, 4, 8.0, ["query", "value"], rslora=False, dropout=0.0, seed=0)
    set_lora_A_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_A" in n for n in trainable)
    assert any("lora_B" in n for n in trainable)
    set_lora_A_trainable(model, True)
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("method", ["ffa_lora", "florist"])
def test_partial_participation_runs(method: str, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Two of three clients a round: a rank-8 client may get fewer columns than its rank (it
    pads B with zeros over its shared A) and nothing is rejected."""
    config = tiny_config(
        tiny_bert_dir, f"federation.method={method}", "federation.fraction_train=0.67", "run.seed=3"
    )
    history = run_in_process(config, tmp_path, finish=False)["history"]
    for record in history[1:]:
        assert (record["sampled"], record["ok"], record["rejected"], record["failed"]) == (
            2,
            2,
            0,
            0,
        )
        assert not record["skipped"] and record["bytes_received"] > 0
