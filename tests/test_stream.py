"""The module-streamed round step (issue 21, bounded server memory): the step over replies
spooled to safetensors equals the in-memory `aggregate_round` for every registered method, with
and without carry-over and partial participation, over several rounds; ``keep="leading"``
hands clients the same factors and reports the same diagnostics; the spool round-trips, is
deleted after the round and rejects a bad folder by naming its config field."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
from flwr.app import ConfigRecord

from helpers.fakegrid import task_identity
from helpers.replies import train_reply
from raflora.config import ConfigError, config_from_dict
from raflora.federation.spool import ReplySpool, SpoolError, spool_root
from raflora.federation.strategy import HeteroRankStrategy, NodeInfo
from raflora.federation.validation import Expectation
from raflora.math import available_methods, get_method
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    RoundSettings,
    SVDUpdate,
    aggregate_round,
    aggregate_streamed,
)

SHAPES = {"enc.0.query": (24, 20), "enc.0.value": (24, 20), "enc.1.ffn": (30, 20)}
WEIGHTS = [30, 10, 20, 40, 25]


def client_ranks(method: str) -> list[int]:
    return [4] * 5 if get_method(method).equal_ranks else [2, 4, 4, 8, 2]


def round_updates(method: str, round_: int, clients: list[int]) -> list[ClientUpdate]:
    """Random float32 replies of ``clients`` (FFA-LoRA: A = the shared rows A_0[:r_k])."""
    ranks = client_ranks(method)
    shared = {
        name: np.random.default_rng([9, i]).standard_normal((8, n)).astype(np.float32)
        for i, (name, (_, n)) in enumerate(SHAPES.items())
    }
    out = []
    for k in clients:
        rng = np.random.default_rng([round_, k])
        factors = {}
        for name, (m, n) in SHAPES.items():
            B = rng.standard_normal((m, ranks[k])).astype(np.float32)
            A = rng.standard_normal((ranks[k], n)).astype(np.float32)
            factors[name] = (B, shared[name][: ranks[k]].copy() if _frozen(method) else A)
        dense = {"head": np.full(3, float(k + round_), np.float32)}
        out.append(ClientUpdate(k, ranks[k], WEIGHTS[k], factors, dense, {"loss": 1.0 + k}))
    return out


def _frozen(method: str) -> bool:
    return get_method(method).frozen_a


def settings(method: str, carry_over: bool, keep: str = "all") -> RoundSettings:
    bounds = tuple(sorted(set(client_ranks(method))))
    return RoundSettings.of(get_method(method), carry_over=carry_over, bounds=bounds, keep=keep)


def spooled(tmp_path, round_: int, updates: list[ClientUpdate]) -> ReplySpool:
    spool = ReplySpool(tmp_path, round_)
    for update in reversed(updates):  # arrival order must not matter
        spool.add(update)
    return spool


def assert_same_update(a, b) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name


def assert_same_diagnostics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if key == "per_module":
            for name, module in value.items():
                assert module.keys() == b[key][name].keys()
                for k, v in module.items():
                    np.testing.assert_allclose(v, b[key][name][k], rtol=1e-6, atol=1e-9)
        else:
            np.testing.assert_allclose(value, b[key], rtol=1e-6, atol=1e-9)


# three rounds: everybody, then without the largest-rank client (carry-over), then a subset
PARTICIPANTS = [[0, 1, 2, 3, 4], [0, 1, 2, 4], [1, 3]]


@pytest.mark.parametrize("carry_over", [False, True])
@pytest.mark.parametrize("method", available_methods())
def test_streamed_step_from_a_spool_equals_the_in_memory_step(
    tmp_path, method: str, carry_over: bool
) -> None:
    """keep="all" from the spool: the very same state and diagnostics as `aggregate_round`
    (float32 on disk is bit-exact); keep="leading": what every client is handed, D_t, the
    merged rounds and the diagnostics are the same, round after round."""
    empty = GlobalState(0, {}, {}, {}, {})
    memory = streamed = leading = empty
    for t, clients in enumerate(PARTICIPANTS, start=1):
        updates = round_updates(method, t, clients)
        memory, diag_memory = aggregate_round(memory, updates, settings(method, carry_over))
        with spooled(tmp_path, t, updates) as spool:
            streamed, diag_stream = aggregate_streamed(
                streamed, spool, settings(method, carry_over)
            )
            leading, diag_leading = aggregate_streamed(
                leading, spool, settings(method, carry_over, "leading")
            )
        assert diag_stream == diag_memory
        assert_same_diagnostics(diag_leading, diag_memory)
        for kind in ("adapter", "merged"):
            assert getattr(streamed, kind).keys() == getattr(memory, kind).keys()
            for name, update in getattr(memory, kind).items():
                assert_same_update(getattr(streamed, kind)[name], update)
        for name, update in memory.merged.items():
            assert_same_update(leading.merged[name], update)
        assert streamed.merged_rounds.keys() == memory.merged_rounds.keys()
        for r, modules in memory.merged_rounds.items():
            for name, (B, A) in modules.items():
                assert np.array_equal(streamed.merged_rounds[r][name][0], B)
                assert np.array_equal(leading.merged_rounds[r][name][1], A)
        for state in (streamed, leading):
            assert state.ranks == memory.ranks and state.round == memory.round
            assert np.array_equal(state.dense["head"], memory.dense["head"])
        allocation = get_method(method).allocation
        for rank in sorted(set(client_ranks(method))):
            for split in ("us", "sqrt"):
                want = memory.client_payload(rank, split, allocation)
                got = leading.client_payload(rank, split, allocation)
                for name, (B, A) in want.items():
                    np.testing.assert_allclose(got[name][0], B, rtol=1e-6, atol=1e-7)
                    np.testing.assert_allclose(got[name][1], A, rtol=1e-6, atol=1e-7)


def test_keep_leading_stores_only_the_top_triplets(tmp_path) -> None:
    """raflora at R = Σ r_k = 20 > r_cap = 8: the kept update is the thin SVD of its first 8
    triplets (float32), (m + n)·8 floats instead of (m + n)·(20 + 16)."""
    updates = round_updates("raflora", 1, [0, 1, 2, 3, 4])
    _, diagnostics = aggregate_streamed(
        GlobalState(0, {}, {}, {}, {}), spooled(tmp_path, 1, updates), settings("raflora", True)
    )
    full, _ = aggregate_round(GlobalState(0, {}, {}, {}, {}), updates, settings("raflora", True))
    lean, lean_diag = aggregate_round(
        GlobalState(0, {}, {}, {}, {}), updates, settings("raflora", True, "leading")
    )
    for name, (m, n) in SHAPES.items():
        kept = lean.adapter[name]
        assert isinstance(kept, SVDUpdate) and kept.U.dtype == np.float32
        assert kept.U.shape == (m, 8) and kept.S.shape == (8,) and kept.Vt.shape == (8, n)
        np.testing.assert_array_equal(kept.S, full.adapter[name].S[:8])
        assert full.adapter[name].B.shape == (m, 20)
    # the global rank is that of the round's whole update, not of the kept truncation
    assert lean_diag["global_rank"] == diagnostics["global_rank"] == 20


def test_settings_refuse_an_unknown_keep() -> None:
    with pytest.raises(ValueError, match="keep 'some'"):
        RoundSettings.of(get_method("raflora"), keep="some")


# --------------------------------------------------------------------------- the spool


def test_spool_round_trip_and_cleanup(tmp_path) -> None:
    updates = round_updates("raflora", 1, [3, 0, 2])
    spool = spooled(tmp_path, 7, updates)
    assert spool.folder.parent == tmp_path and spool.folder.name.startswith("round_007_")
    headers = spool.updates
    assert [h.partition_id for h in headers] == [0, 2, 3]
    assert all(h.factors == {} for h in headers)
    again = ReplySpool.reopen(spool.folder)
    by_pid = {u.partition_id: u for u in updates}
    for source in (spool, again):
        assert source.modules == sorted(SHAPES)
        for name in SHAPES:
            for header, (B, A) in zip(source.updates, source.load(name), strict=True):
                want = by_pid[header.partition_id]
                assert (header.rank, header.num_examples) == (want.rank, want.num_examples)
                assert header.metrics == want.metrics
                assert np.array_equal(header.dense["head"], want.dense["head"])
                assert B.dtype == np.float32 and np.array_equal(B, want.factors[name][0])
                assert np.array_equal(A, want.factors[name][1])
    spool.close()
    assert not spool.folder.exists() and list(tmp_path.iterdir()) == []


def test_spool_refuses_a_second_reply_and_other_modules(tmp_path) -> None:
    a, b = round_updates("raflora", 1, [0, 1])
    with ReplySpool(tmp_path, 1) as spool:
        spool.add(a)
        with pytest.raises(ValueError, match="partition 0 is already spooled"):
            spool.add(a)
        fewer = ClientUpdate(1, b.rank, b.num_examples, {"enc.0.query": b.factors["enc.0.query"]})
        with pytest.raises(ValueError, match="partition 1 has modules"):
            spool.add(fewer)
    assert list(tmp_path.iterdir()) == []


def test_spool_root_settings(tmp_path) -> None:
    assert spool_root("") is None
    assert spool_root(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert (tmp_path / "new" / "deeper").is_dir()
    assert spool_root("auto").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SpoolError, match=r"federation\.spool_dir"):
        spool_root(str(a_file))


def test_a_bad_spool_dir_is_a_config_error_naming_the_field(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"federation\.spool_dir.*not a writable directory"):
        config_from_dict({"federation": {"spool_dir": str(a_file / "spool")}})
    with pytest.raises(ConfigError, match=r"federation\.server_keep"):
        config_from_dict({"federation": {"server_keep": "most"}})


# --------------------------------------------------------------------------- the strategy

MODULES = {"enc.0.query": (16, 15), "enc.0.value": (16, 15)}
NODES = {pid: 1000 + pid for pid in range(3)}


def strategy(**federation) -> HeteroRankStrategy:
    cfg = config_from_dict(
        {
            "clients": {"num_clients": 3, "ranks": [2, 4, 8]},
            "federation": {"method": "raflora", **federation},
        }
    )
    s = HeteroRankStrategy(
        config=cfg,
        state=GlobalState(0, {}, {}, {}, {}),
        expectation=Expectation(modules=dict(MODULES), dense={"head": (3,)}),
    )
    s.register_nodes(NodeInfo(NODES[pid], pid, [2, 4, 8][pid], 10 * (pid + 1)) for pid in NODES)
    return s


def reply(pid: int, round_: int):
    rank = [2, 4, 8][pid]
    rng = np.random.default_rng([round_, pid])
    lora = {
        name: (
            rng.standard_normal((m, rank)).astype(np.float32),
            rng.standard_normal((rank, n)).astype(np.float32),
        )
        for name, (m, n) in MODULES.items()
    }
    return train_reply(NODES[pid], lora, 10 * (pid + 1), {"head": np.full(3, pid, np.float32)})


def test_a_spooled_run_gives_the_in_memory_runs_state(tmp_path) -> None:
    """Two rounds through the strategy: spooled (keep all) = in memory, bit for bit; the
    spool's folder holds nothing after each round; replies are spooled as they arrive."""
    root = tmp_path / "spool"
    with task_identity():
        memory, spooled_ = strategy(), strategy(spool_dir=str(root))
        for t in (1, 2):
            for s in (memory, spooled_):
                list(s.configure_train(t, None, ConfigRecord(), None))

            def arriving(pids, t=t):
                for i, pid in enumerate(pids):
                    if i:  # the previous reply is on disk before the next one is read
                        (folder,) = root.iterdir()
                        assert len(list(folder.iterdir())) == i
                    yield reply(pid, t)

            memory.aggregate_train(t, [reply(pid, t) for pid in (2, 0, 1)])
            spooled_.aggregate_train(t, arriving((2, 0, 1)))
            assert list(root.iterdir()) == []
            assert spooled_.current.ok == memory.current.ok == [0, 1, 2]
            assert spooled_.current.bytes_received == memory.current.bytes_received
            for name in MODULES:
                assert_same_update(spooled_.state.adapter[name], memory.state.adapter[name])
            assert np.array_equal(spooled_.state.dense["head"], memory.state.dense["head"])


def test_keep_leading_in_the_strategy_sends_the_same_factors(tmp_path) -> None:
    with task_identity():
        memory, lean = strategy(), strategy(spool_dir="auto", server_keep="leading")
        assert lean.settings.keep == "leading"
        for t in (1, 2):
            sent = []
            for s in (memory, lean):
                sent.append(list(s.configure_train(t, None, ConfigRecord(), None)))
                s.aggregate_train(t, [reply(pid, t) for pid in (0, 1, 2)])
            for a, b in zip(*sent, strict=True):
                assert a.content["arrays"].count_bytes() == b.content["arrays"].count_bytes()
        for name in MODULES:
            assert isinstance(lean.state.adapter[name], SVDUpdate)
            for rank in (2, 4, 8):
                B, A = memory.state.adapter[name].factors(rank)
                Bl, Al = lean.state.adapter[name].factors(rank)
                np.testing.assert_allclose(Bl, B, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(Al, A, rtol=1e-6, atol=1e-7)


def test_a_skipped_round_leaves_no_spool(tmp_path) -> None:
    root = tmp_path / "spool"
    with task_identity():
        s = strategy(spool_dir=str(root), min_clients=3)
        list(s.configure_train(1, None, ConfigRecord(), None))
        assert s.aggregate_train(1, [reply(0, 1)]) == (None, None)
        assert s.current.skipped and list(root.iterdir()) == []


def test_a_leading_state_survives_a_checkpoint(tmp_path) -> None:
    """keep="leading" checkpoints as thin SVDs and resumes to the same next round."""
    from raflora.federation.checkpoint import load_checkpoint, save_checkpoint

    lean = settings("raflora", True, "leading")
    state, _ = aggregate_round(
        GlobalState(0, {}, {}, {}, {}), round_updates("raflora", 1, [0, 1, 2, 3, 4]), lean
    )
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path, state, {}))
    for name in SHAPES:
        assert_same_update(loaded.adapter[name], state.adapter[name])
    updates = round_updates("raflora", 2, [0, 1, 2])  # partial: the tail (4, 8] is carried
    after, diag = aggregate_round(state, updates, lean)
    resumed, diag_resumed = aggregate_round(loaded, updates, lean)
    assert diag["carried_energy_share"] > 0 and diag_resumed == diag
    for name in SHAPES:
        assert_same_update(resumed.adapter[name], after.adapter[name])
