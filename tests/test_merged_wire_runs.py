"""Whole in-process runs of FLoRA's wire (``federation.merged_wire``): each client gets the
stacked factors of every round it has not merged yet, keeps them in its node state, and the
run ends where the old protocol (the whole merged sum every round) ends.

The Ray simulation's own ``context.state`` is exercised by test_federation_simulation.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType, RecordDict

from helpers.fakegrid import FakeGrid
from helpers.runs import run_in_process, tiny_config
from raflora.federation import client_app
from raflora.federation import messages as msg
from raflora.federation.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODULES, M, N = 4, 32, 32  # query, value × 2 layers of the tiny BERT, 32×32
HEAD = 2 * 32 + 2  # classifier weight and bias
FLORA = ("federation.method=flora", "federation.rounds=3")


def messages(grid, kind: str, server_round: int) -> dict[int, object]:
    """partition id → the message of this kind the server sent it in this round."""
    return {
        int(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]): m
        for m in grid.sent
        if m.metadata.message_type == kind and m.metadata.group_id == str(server_round)
    }


def payload_floats(message) -> int:
    payload = msg.unpack_payload(message.content[msg.ARRAYS])
    pairs = [*payload.lora.values(), *payload.merged.values()]
    pairs += [pair for factors in payload.rounds.values() for pair in factors.values()]
    return sum(x.size for pair in pairs for x in pair) + sum(x.size for x in payload.dense.values())


def dense(update) -> np.ndarray:
    return (update.U.astype(np.float64) * update.S) @ update.Vt


@pytest.fixture(scope="module")
def flora_runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """FLoRA for 3 rounds with each wire (3 clients of ranks 2, 4, 8)."""
    out = {}
    for wire in ("rounds", "total"):
        config = tiny_config(tiny_bert_dir, *FLORA, f"federation.merged_wire={wire}")
        run_dir = tmp_path_factory.mktemp(f"flora-{wire}")
        out[wire] = {"run_dir": run_dir, **run_in_process(config, run_dir, finish=False)}
    return out


def test_each_round_sends_the_papers_stack_once(flora_runs) -> None:
    """Round t sends every client round t−1's stack: Σ_k r_k (m + n) floats per module."""
    run = flora_runs["rounds"]
    grid, history = run["grid"], run["history"]
    for t in (1, 2, 3):
        sent = messages(grid, MessageType.TRAIN, t)
        assert sorted(sent) == [0, 1, 2]
        for message in sent.values():
            payload = msg.unpack_payload(message.content[msg.ARRAYS])
            assert message.content[msg.CONFIG][msg.MERGED_ROUNDS] == list(range(1, t))
            assert list(payload.rounds) == ([t - 1] if t > 1 else [])  # only the new round
            assert payload.lora == {} and payload.merged == {}
            stacked = 0 if t == 1 else MODULES * (2 + 4 + 8) * (M + N)
            assert payload_floats(message) == stacked + HEAD
        assert history[t]["bytes_sent"] == sum(
            m.content[msg.ARRAYS].count_bytes() for m in sent.values()
        )
    # every client's node state holds the rounds it merged (train: up to t−1, evaluate: t)
    for context in grid.contexts.values():
        keys = [k for k in context.state if k.startswith(client_app.STATE_PREFIX)]
        assert sorted(int(k.rsplit("@", 1)[1]) for k in keys) == [1, 2, 3]
    # the server's evaluation messages carry the round just merged, to the same clients
    for t in (1, 2, 3):
        for message in messages(grid, MessageType.EVALUATE, t).values():
            assert message.content[msg.CONFIG][msg.MERGED_ROUNDS] == list(range(1, t + 1))
            assert list(msg.unpack_payload(message.content[msg.ARRAYS]).rounds) == [t]


def test_the_run_ends_where_the_whole_sum_protocol_ends(flora_runs) -> None:
    """Same D_t and metrics as sending the whole D every round (the clients' bases agree to
    float32 rounding), for fewer bytes once D's rank exceeds a round's stack."""
    rounds, total = flora_runs["rounds"], flora_runs["total"]
    for t in (1, 2, 3):
        a, b = rounds["history"][t], total["history"][t]
        assert a["server_loss"] == pytest.approx(b["server_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["global_rank"] == b["global_rank"]
    for name, update in rounds["state"].merged.items():
        expected = dense(total["state"].merged[name])
        np.testing.assert_allclose(dense(update), expected, atol=1e-4 * np.abs(expected).max())
    # round 2: D_1 (rank 14) = round 1's stack; round 3: D_2 has rank 28, the stack 14
    sent = {wire: [r["bytes_sent"] for r in run["history"][1:]] for wire, run in flora_runs.items()}
    assert sent["rounds"][:2] == pytest.approx(sent["total"][:2], rel=0.01)
    assert sent["rounds"][2] < 0.6 * sent["total"][2]
    for message in messages(total["grid"], MessageType.TRAIN, 3).values():
        payload = msg.unpack_payload(message.content[msg.ARRAYS])
        assert msg.MERGED_ROUNDS not in message.content[msg.CONFIG] and payload.rounds == {}
        assert all(B.shape[1] == 28 for B, _ in payload.merged.values())


def test_a_client_that_missed_rounds_gets_all_of_them(tiny_bert_dir: Path, tmp_path) -> None:
    """4 clients, half sampled per round (seed 7: {2, 3}, {0, 1}, {2, 3}): each train message
    carries exactly the rounds after the last one its client merged; in round 3 clients 2 and
    3 (which merged nothing yet) get rounds 1 and 2."""
    config = tiny_config(
        tiny_bert_dir,
        *FLORA,
        "clients.num_clients=4",
        "clients.ranks=[2, 4, 8, 4]",
        "federation.fraction_train=0.5",
        "federation.evaluate_clients=false",
        "run.seed=7",
    )
    run = run_in_process(config, tmp_path, finish=False)
    history, grid = run["history"], run["grid"]
    sampled = [record["clients"] for record in history[1:]]
    assert sampled == [[2, 3], [0, 1], [2, 3]]
    stack = {1: 8 + 4, 2: 2 + 4}  # Σ r_k of each round's clients
    merged_through = {pid: 0 for pid in range(4)}
    for t in (1, 2, 3):
        sent = messages(grid, MessageType.TRAIN, t)
        assert sorted(sent) == sampled[t - 1]
        expected_bytes = 0
        for pid, message in sent.items():
            missed = list(range(merged_through[pid] + 1, t))
            payload = msg.unpack_payload(message.content[msg.ARRAYS])
            assert list(payload.rounds) == missed, (t, pid)
            floats = MODULES * (M + N) * sum(stack[s] for s in missed) + HEAD
            assert payload_floats(message) == floats
            expected_bytes += message.content[msg.ARRAYS].count_bytes()
            merged_through[pid] = t - 1
        assert history[t]["bytes_sent"] == expected_bytes
    assert list(
        msg.unpack_payload(messages(grid, MessageType.TRAIN, 3)[3].content[msg.ARRAYS]).rounds
    ) == [1, 2]
    state, _ = load_checkpoint(tmp_path / "checkpoints" / "round_003")
    assert sorted(state.merged_rounds) == [1, 2, 3]


class ForgetfulGrid(FakeGrid):
    """Partition ``pid``'s node loses its state (a restarted SuperNode) before round ``at``."""

    def __init__(self, num_clients: int, pid: int, at: int) -> None:
        super().__init__([{"partition-id": i} for i in range(num_clients)])
        self.pid, self.at = pid, at

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            if (
                message.metadata.message_type == MessageType.TRAIN
                and message.metadata.group_id == str(self.at)
                and context.node_config["partition-id"] == self.pid
            ):
                context.state = RecordDict()
        return super().push_messages(messages)


def test_a_client_that_lost_its_state_refuses_and_gets_every_round_next(
    tiny_bert_dir: Path, tmp_path
) -> None:
    config = tiny_config(tiny_bert_dir, "federation.method=flora", "federation.rounds=4")
    grid = ForgetfulGrid(3, pid=0, at=3)
    history = run_in_process(config, tmp_path, grid=grid, finish=False)["history"]
    failure = history[3]["failures"]["0"]
    assert msg.MISSING_ROUNDS in failure and "[1]" in failure  # it lacked round 1
    assert history[3]["ok"] == 2 and not history[3]["skipped"]
    round_3 = messages(grid, MessageType.TRAIN, 3)
    assert list(msg.unpack_payload(round_3[0].content[msg.ARRAYS]).rounds) == [2]
    round_4 = messages(grid, MessageType.TRAIN, 4)  # from scratch for client 0
    assert list(msg.unpack_payload(round_4[0].content[msg.ARRAYS]).rounds) == [1, 2, 3]
    assert list(msg.unpack_payload(round_4[1].content[msg.ARRAYS]).rounds) == [3]
    assert history[4]["ok"] == 3
