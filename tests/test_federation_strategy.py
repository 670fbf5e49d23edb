"""`HeteroRankStrategy` driven hook by hook with hand-built replies (no Flower run, no Ray)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from helpers.fakegrid import task_identity
from helpers.replies import error_reply, evaluate_reply, train_reply
from raflora.config import config_from_dict
from raflora.federation import messages as msg
from raflora.federation.strategy import HeteroRankStrategy, NodeInfo
from raflora.federation.validation import Expectation
from raflora.math import get_method
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    RoundSettings,
    aggregate_round,
    compress,
)

M, N = 16, 15  # above Σ r_k = 14: the global update keeps every direction
MODULES = {"enc.0.query": (M, N), "enc.0.value": (M, N)}
HEAD = {"classifier.weight": (2, 4)}
RANKS = {0: 2, 1: 4, 2: 8}
NODE = {pid: 2**63 + 1000 - 7 * pid for pid in range(16)}  # uint64-sized, not in pid order


@pytest.fixture(autouse=True)
def _identity():
    with task_identity():
        yield


def config(**federation):
    return config_from_dict(
        {
            "clients": {"num_clients": federation.pop("num_clients", 3), "ranks": [2, 4, 8]},
            "federation": {"method": "raflora", **federation},
        }
    )


def global_state(rank: int = 14, merged: bool = False) -> GlobalState:
    rng = np.random.default_rng(0)
    updates = {
        name: compress(rng.standard_normal((m, rank)), rng.standard_normal((rank, n)))
        for name, (m, n) in MODULES.items()
    }
    dense = {"classifier.weight": np.full((2, 4), 0.25, np.float32)}
    if merged:
        return GlobalState(1, {}, updates, dense, {})
    return GlobalState(1, updates, {}, dense, {})


def strategy(cfg=None, state=None, num_examples=None) -> HeteroRankStrategy:
    cfg = cfg or config()
    s = HeteroRankStrategy(
        config=cfg,
        state=state or global_state(),
        expectation=Expectation(modules=dict(MODULES), dense=dict(HEAD)),
    )
    count = cfg.clients.num_clients
    sizes = num_examples or [10 * (pid + 1) for pid in range(count)]
    ranks = [[2, 4, 8][pid % 3] for pid in range(count)]
    s.register_nodes(
        NodeInfo(NODE[pid], pid, ranks[pid], sizes[pid]) for pid in reversed(range(count))
    )
    return s


def trained(pid: int, rank: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, pid])
    return {
        name: (
            rng.standard_normal((m, rank)).astype(np.float32),
            rng.standard_normal((rank, n)).astype(np.float32),
        )
        for name, (m, n) in MODULES.items()
    }


def head(pid: int) -> dict:
    return {"classifier.weight": np.full((2, 4), float(pid), np.float32)}


def good_reply(pid: int, rank: int | None = None, examples: int | None = None, loss=1.0):
    rank = RANKS[pid % 3] if rank is None else rank
    examples = 10 * (pid + 1) if examples is None else examples
    return train_reply(NODE[pid], trained(pid, rank), examples, head(pid), train_loss=loss)


# --------------------------------------------------------------------------- configure


def test_each_node_gets_the_truncation_at_its_own_rank() -> None:
    s = strategy()
    state = s.state
    out = list(s.configure_train(3, ArrayRecord(), ConfigRecord({"lr": 0.1}), grid=None))
    assert len(out) == 3
    by_node = {m.metadata.dst_node_id: m for m in out}
    for pid, rank in RANKS.items():
        message = by_node[NODE[pid]]
        assert message.metadata.message_type == MessageType.TRAIN
        assert message.metadata.group_id == "3"
        lora, merged, dense = msg.unpack(message.content[msg.ARRAYS])
        assert merged == {}
        assert np.array_equal(dense["classifier.weight"], state.dense["classifier.weight"])
        for name, (m, n) in MODULES.items():
            B, A = lora[name]
            assert B.shape == (m, rank) and A.shape == (rank, n)
            update = state.adapter[name]
            best = (update.U[:, :rank] * update.S[:rank]).astype(np.float64) @ update.Vt[:rank]
            np.testing.assert_allclose(B.astype(np.float64) @ A, best, atol=1e-5)
        record = message.content[msg.CONFIG]
        assert record[msg.RANK] == rank and record[msg.SERVER_ROUND] == 3
        assert record["lr"] == 0.1
        assert json.loads(record[msg.RUN_CONFIG]) == json.loads(s.config.to_json())
    assert s.current.sampled == [0, 1, 2]
    assert s.current.bytes_sent == sum(m.content[msg.ARRAYS].count_bytes() for m in out)


def test_configure_train_does_not_write_into_the_callers_record() -> None:
    s = strategy()
    base = ConfigRecord({"lr": 0.1})
    list(s.configure_train(1, ArrayRecord(), base, grid=None))
    assert dict(base) == {"lr": 0.1}


def test_first_round_sends_no_factors_and_merge_mode_sends_the_merged_update() -> None:
    empty = GlobalState(0, {}, {}, {"classifier.weight": np.zeros((2, 4), np.float32)}, {})
    out = list(strategy(state=empty).configure_train(1, None, ConfigRecord(), grid=None))
    for message in out:
        lora, merged, dense = msg.unpack(message.content[msg.ARRAYS])
        assert lora == {} and merged == {} and set(dense) == {"classifier.weight"}
        assert message.content[msg.CONFIG][msg.MERGED_ROUNDS] == []

    state = global_state(rank=5, merged=True)
    cfg = config(method="flora", merged_wire="total")
    out = list(strategy(cfg, state=state).configure_train(2, None, ConfigRecord(), grid=None))
    for message in out:
        lora, merged, _ = msg.unpack(message.content[msg.ARRAYS])
        assert lora == {}
        for name in MODULES:  # the whole merged update, whatever the client's rank
            B, A = merged[name]
            assert B.shape[1] == A.shape[0] == 5
            update = state.merged[name]
            np.testing.assert_allclose(
                B.astype(np.float64) @ A,
                (update.U * update.S).astype(np.float64) @ update.Vt,
                atol=1e-5,
            )


def merged_rounds(rounds: list[int], rank: int = 3) -> dict[int, dict[str, tuple]]:
    """Per round t, factors (m, rank + t), (rank + t, n) for every module."""
    rng = np.random.default_rng(5)
    return {
        t: {
            name: (
                rng.standard_normal((m, rank + t)).astype(np.float32),
                rng.standard_normal((rank + t, n)).astype(np.float32),
            )
            for name, (m, n) in MODULES.items()
        }
        for t in rounds
    }


def sent_rounds(out, listed: list[int]) -> dict[int, list[int]]:
    """partition id → the merged rounds its message carries (every message lists them all)."""
    pid_of = {NODE[pid]: pid for pid in NODE}
    sent = {}
    for message in out:
        payload = msg.unpack_payload(message.content[msg.ARRAYS])
        assert payload.merged == {}
        assert message.content[msg.CONFIG][msg.MERGED_ROUNDS] == listed
        sent[pid_of[message.metadata.dst_node_id]] = sorted(payload.rounds)
    return sent


def test_merged_rounds_go_to_each_client_once_until_it_refuses() -> None:
    """merged_wire = rounds: a client gets the merged rounds after the last one it confirmed
    (its reply's merged-through); one that refuses for lack of a round gets them all again."""
    rounds = merged_rounds([1, 3])
    state = replace(global_state(rank=5, merged=True), round=3, merged_rounds=rounds)
    s = strategy(config(method="flora"), state=state)
    out = list(s.configure_train(4, None, ConfigRecord(), grid=None))
    # round 2 merged nothing (skipped); nothing confirmed yet
    assert sent_rounds(out, [1, 3]) == {0: [1, 3], 1: [1, 3], 2: [1, 3]}
    for message in out:  # what travels is the rounds' own factors, bit for bit
        payload = msg.unpack_payload(message.content[msg.ARRAYS])
        for t, factors in rounds.items():
            for name, (B, A) in factors.items():
                assert payload.rounds[t][name][0].tobytes() == B.tobytes()
                assert payload.rounds[t][name][1].tobytes() == A.tobytes()
    # per client and module Σ_t R_t (m + n) floats, R_t = 3 + t, plus the head (2×4)
    floats = 3 * (sum((m + n) * (3 + t) for t in (1, 3) for m, n in MODULES.values()) + 2 * 4)
    arrays = 3 * (2 * 2 * len(MODULES) + 1)  # B and A per round and module, and the head
    assert s.current.bytes_sent == sum(m.content[msg.ARRAYS].count_bytes() for m in out)
    assert 4 * floats < s.current.bytes_sent < 4 * floats + 250 * arrays  # + keys, npy headers
    replies = [
        train_reply(NODE[0], trained(0, 2), 10, head(0), extra={msg.MERGED_THROUGH: 3}),
        train_reply(NODE[1], trained(1, 4), 20, head(1), extra={msg.MERGED_THROUGH: 1}),
        error_reply(NODE[2], f"ClientAppException: {msg.MISSING_ROUNDS} [1]"),
    ]
    s.aggregate_train(4, replies)
    assert s.confirmed == {0: 3, 1: 1}
    # round 4 merged its own factors; client 0 needs only those, client 1 also round 3
    s.state = replace(s.state, merged_rounds={**rounds, 4: merged_rounds([4])[4]})
    out = list(s.configure_train(5, None, ConfigRecord(), grid=None))
    assert sent_rounds(out, [1, 3, 4]) == {0: [4], 1: [3, 4], 2: [1, 3, 4]}
    # a refusal (the client's node lost its state) resets what it confirmed
    s.aggregate_train(5, [error_reply(NODE[0], f"x: {msg.MISSING_ROUNDS} [1, 3]")])
    assert 0 not in s.confirmed and s.confirmed == {1: 1}
    # a merged-through beyond what the server merged, or not an integer, is not believed
    s.aggregate_train(
        5,
        [
            train_reply(NODE[1], trained(1, 4), 20, head(1), extra={msg.MERGED_THROUGH: 9}),
            train_reply(NODE[2], trained(2, 8), 30, head(2), extra={msg.MERGED_THROUGH: 2.5}),
        ],
    )
    assert s.confirmed == {1: 1}


def test_seeded_sampling_is_reproducible_and_ignores_node_ids() -> None:
    cfg = config(num_clients=10, fraction_train=0.5)
    a, b = strategy(cfg), strategy(cfg)
    b.nodes = {pid: node for pid, node in sorted(b.nodes.items(), reverse=True)}
    samples = [a.sample(r) for r in range(1, 9)]
    assert samples == [b.sample(r) for r in range(1, 9)]
    assert all(len(s) == 5 and s == sorted(set(s)) for s in samples)
    assert len({tuple(s) for s in samples}) > 1  # rounds differ
    other_seed = config_from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "seed": 1}})
    assert [strategy(other_seed).sample(r) for r in range(1, 9)] != samples
    sent = {m.metadata.dst_node_id for m in a.configure_train(4, None, ConfigRecord(), None)}
    assert sent == {NODE[pid] for pid in samples[3]}


def test_ranks_in_the_state_win_over_the_nodes_report() -> None:
    state = global_state()
    state = GlobalState(state.round, state.adapter, {}, state.dense, {2: 5})  # HetLoRA-pruned
    s = strategy(state=state)
    assert s.rank_of(2) == 5
    assert s.settings.bounds == (2, 4, 8)  # partitions: the configured ranks, as before resuming
    out = {m.metadata.dst_node_id: m for m in s.configure_train(2, None, ConfigRecord(), None)}
    lora, _, _ = msg.unpack(out[NODE[2]].content[msg.ARRAYS])
    assert lora["enc.0.query"][1].shape[0] == 5


# --------------------------------------------------------------------------- aggregate


def test_good_replies_are_aggregated_like_aggregate_round() -> None:
    s = strategy()
    before = s.state
    list(s.configure_train(2, None, ConfigRecord(), None))
    replies = [good_reply(pid, loss=float(pid + 1)) for pid in (2, 0, 1)]
    arrays, metrics = s.aggregate_train(2, replies)
    assert arrays is None  # the global state lives in the strategy; nothing serialises it
    assert s.current.ok == [0, 1, 2] and not s.current.failed and not s.current.rejected
    updates = [
        ClientUpdate(pid, RANKS[pid], 10 * (pid + 1), trained(pid, RANKS[pid]), head(pid))
        for pid in range(3)
    ]
    expected, _ = aggregate_round(
        before, updates, RoundSettings.of(get_method("raflora"), bounds=(2, 4, 8))
    )
    for name in MODULES:
        for part in ("U", "S", "Vt"):
            assert np.array_equal(
                getattr(s.state.adapter[name], part), getattr(expected.adapter[name], part)
            )
    np.testing.assert_allclose(s.state.dense["classifier.weight"], (10 * 0 + 20 + 60) / 60)
    assert metrics["num-examples"] == 60
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
    assert s.current.bytes_received == sum(r.content[msg.ARRAYS].count_bytes() for r in replies)
    assert s.state.round == 2


@pytest.mark.parametrize("threads", [1, 2, 0])
def test_the_server_step_runs_on_its_configured_threads(monkeypatch, threads: int) -> None:
    """MKL's last bits depend on the thread count: the server fixes it for aggregate_round
    (0 = every usable core), whatever the clients in its process set, and restores it."""
    import torch

    from raflora.federation import strategy as strategy_module

    seen = []
    original = strategy_module.aggregate_streamed
    monkeypatch.setattr(
        strategy_module,
        "aggregate_streamed",
        lambda *args: seen.append(torch.get_num_threads()) or original(*args),
    )
    s = strategy(config(server_threads=threads))
    list(s.configure_train(2, None, ConfigRecord(), None))
    before = torch.get_num_threads()
    torch.set_num_threads(3 if before != 3 else 4)  # as a client in the same process might
    caller = torch.get_num_threads()
    try:
        s.aggregate_train(2, [good_reply(pid) for pid in range(3)])
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    assert seen == [threads or len(os.sched_getaffinity(0))]


def test_errors_and_missing_replies_are_failures() -> None:
    s = strategy(config(min_clients=1))
    list(s.configure_train(1, None, ConfigRecord(), None))
    _, metrics = s.aggregate_train(1, [good_reply(0), error_reply(NODE[1], "ClientAppException")])
    assert metrics is not None  # aggregated: the round's metrics
    assert s.current.ok == [0]
    assert set(s.current.failed) == {1, 2}
    assert "client error 2" in s.current.failed[1] and "ClientAppException" in s.current.failed[1]
    assert "no reply" in s.current.failed[2]


def test_invalid_replies_are_rejected_with_their_reason() -> None:
    s = strategy()
    list(s.configure_train(1, None, ConfigRecord(), None))
    bad_rank = good_reply(1, rank=2)
    no_examples = good_reply(2, examples=0)
    s.aggregate_train(1, [good_reply(0), bad_rank, no_examples])
    assert s.current.ok == [0]
    assert "allocated rank 4" in s.current.rejected[1]
    assert "num-examples" in s.current.rejected[2]
    assert s.current.failed == {}


def test_replies_from_unsampled_or_unknown_nodes_are_ignored() -> None:
    s = strategy(config(num_clients=6, fraction_train=0.5))
    list(s.configure_train(1, None, ConfigRecord(), None))
    sampled = s.current.sampled
    outsider = next(pid for pid in range(6) if pid not in sampled)
    replies = [good_reply(pid) for pid in sampled] + [good_reply(outsider)]
    replies.append(train_reply(12345, trained(0, 2), 10, head(0)))  # not a known node
    s.aggregate_train(1, replies)
    assert s.current.ok == sampled
    assert s.state.ranks == {pid: RANKS[pid % 3] for pid in sampled}


def test_too_few_valid_replies_skip_the_round_and_keep_the_state() -> None:
    s = strategy(config(min_clients=2))
    before = s.state
    list(s.configure_train(2, None, ConfigRecord(), None))
    arrays, metrics = s.aggregate_train(2, [good_reply(0), error_reply(NODE[1]), good_reply(2, 3)])
    assert (arrays, metrics) == (None, None)
    assert s.current.skipped
    assert s.state.adapter is before.adapter and s.state.dense is before.dense
    assert s.state.round == 2
    assert list(s.configure_evaluate(2, None, ConfigRecord(), None)) == []


# --------------------------------------------------------------------------- evaluate


def test_evaluation_goes_to_this_rounds_good_clients_at_their_rank() -> None:
    s = strategy()
    list(s.configure_train(1, None, ConfigRecord(), None))
    s.aggregate_train(1, [good_reply(0), good_reply(2)])
    out = list(s.configure_evaluate(1, None, ConfigRecord(), None))
    assert {m.metadata.dst_node_id for m in out} == {NODE[0], NODE[2]}
    for message in out:
        assert message.metadata.message_type == MessageType.EVALUATE
        pid = {NODE[0]: 0, NODE[2]: 2}[message.metadata.dst_node_id]
        lora, _, _ = msg.unpack(message.content[msg.ARRAYS])
        assert lora["enc.0.value"][0].shape == (M, RANKS[pid])


def test_no_client_evaluation_when_switched_off() -> None:
    s = strategy(config(evaluate_clients=False))
    list(s.configure_train(1, None, ConfigRecord(), None))
    s.aggregate_train(1, [good_reply(pid) for pid in range(3)])
    assert list(s.configure_evaluate(1, None, ConfigRecord(), None)) == []


def test_client_metrics_are_example_weighted_and_errors_skipped() -> None:
    s = strategy()
    replies = [
        evaluate_reply(NODE[0], {"num-examples": 10, "val-accuracy": 0.5, "val-loss": 1.0}),
        evaluate_reply(NODE[1], {"num-examples": 30, "val-accuracy": 0.9, "val-loss": 0.2}),
        error_reply(NODE[2]),
    ]
    out = s.aggregate_evaluate(1, replies)
    assert out["val-accuracy"] == pytest.approx((5 + 27) / 40)
    assert out["val-loss"] == pytest.approx((10 + 6) / 40)
    assert "num-examples" not in out
    assert s.current.client_eval == dict(out)
    assert s.aggregate_evaluate(1, [error_reply(NODE[0])]) is None
