"""Bad client replies in a whole run: each is rejected with its reason, logged, and counted per
round in metrics.json; a round without enough valid replies is skipped and the global update kept.

test_federation_messages.py checks `check_update` case by case. Here the real server loop runs
in-process (FakeGrid) and the replies of chosen clients are replaced after they trained, so
every case of the issue (and a few a hostile peer could send) travels the whole path:
unpacking, validation, aggregation, metrics.json, the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from helpers.fakegrid import FakeGrid
from helpers.runs import run_in_process, tiny_config
from raflora.federation import messages as msg
from raflora.federation.finish import finish_run

pytestmark = pytest.mark.usefixtures("single_torch_thread")
Tamper = Callable[[dict, dict, dict], RecordDict]  # (lora, dense, metrics) -> bad content


def replies(lora: dict, dense: dict, metrics: dict, arrays: ArrayRecord | None = None):
    arrays = msg.pack(lora=lora, dense=dense) if arrays is None else arrays
    return RecordDict({msg.ARRAYS: arrays, msg.METRICS: MetricRecord(metrics)})


def changed(lora: dict, name: str, part: int, value: np.ndarray) -> dict:
    pair = list(lora[name])
    pair[part] = value
    return {**lora, name: tuple(pair)}


def first(lora: dict) -> str:
    return sorted(lora)[0]


def with_nan(lora, dense, metrics):
    B = lora[first(lora)][0].copy()
    B[0, 0] = np.nan
    return replies(changed(lora, first(lora), 0, B), dense, metrics)


def with_inf(lora, dense, metrics):
    A = lora[first(lora)][1].copy()
    A[-1, -1] = np.inf
    return replies(changed(lora, first(lora), 1, A), dense, metrics)


def wrong_shape(lora, dense, metrics):
    B = lora[first(lora)][0]
    return replies(changed(lora, first(lora), 0, np.vstack([B, B[:1]])), dense, metrics)


def wrong_rank(lora, dense, metrics):  # consistent B, A of rank r - 1 in every module
    return replies({k: (B[:, :-1], A[:-1]) for k, (B, A) in lora.items()}, dense, metrics)


def missing_module(lora, dense, metrics):
    return replies({k: v for k, v in lora.items() if k != first(lora)}, dense, metrics)


def extra_module(lora, dense, metrics):
    return replies({**lora, "bert.encoder.layer.9.attention.self.query": lora[first(lora)]},
                   dense, metrics)  # fmt: skip


def float64(lora, dense, metrics):
    arrays = msg.pack(lora=lora, dense=dense)
    key = first(lora) + msg.LORA_A
    arrays[key] = Array(lora[first(lora)][1].astype(np.float64))
    return replies(lora, dense, metrics, arrays)


def huge_norm(lora, dense, metrics):
    B = lora[first(lora)][0]
    return replies(changed(lora, first(lora), 0, B * np.float32(1e8) + 1), dense, metrics)


def empty_content(lora, dense, metrics):
    return RecordDict({})


def no_factors(lora, dense, metrics):
    return replies({}, {}, metrics)


def zero_examples(lora, dense, metrics):
    return replies(lora, dense, {**metrics, msg.NUM_EXAMPLES: 0})


def negative_examples(lora, dense, metrics):
    return replies(lora, dense, {**metrics, msg.NUM_EXAMPLES: -5})


def unreadable_array(lora, dense, metrics):  # bytes that np.load cannot parse
    arrays = msg.pack(lora=lora, dense=dense)
    arrays[first(lora) + msg.LORA_B] = Array(
        dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not a .npy file"
    )
    return replies(lora, dense, metrics, arrays)


def list_metric(lora, dense, metrics):  # MetricRecord allows lists; the server needs numbers
    return replies(lora, dense, {**metrics, msg.TRAIN_LOSS: [0.5, 0.25]})


CASES: dict[str, tuple[Tamper, str]] = {
    "NaN": (with_nan, r"lora_B: contains NaN or Inf"),
    "Inf": (with_inf, r"lora_A: contains NaN or Inf"),
    "wrong shape": (wrong_shape, r"shapes B \(33, \d\)"),
    "wrong rank": (wrong_rank, r"rank \d, but the client was allocated rank \d"),
    "missing module": (missing_module, r"modules missing \['bert\."),
    "extra module": (extra_module, r"unexpected \['bert\.encoder\.layer\.9\."),
    "wrong dtype": (float64, r"lora_A: dtype float64, expected float32"),
    "huge norm": (huge_norm, r"exceeds max_update_norm 1000"),
    "empty reply": (empty_content, r"reply lacks its arrays or metrics record"),
    "no factors": (no_factors, r"empty reply: no LoRA factors"),
    "zero examples": (zero_examples, r"num-examples is 0, expected a positive integer"),
    "negative examples": (negative_examples, r"num-examples is -5, expected a positive"),
    "unreadable array": (unreadable_array, r"lora_B' is not a readable numpy array"),
    "list metric": (list_metric, r"metric 'train-loss' is \[0\.5, 0\.25\], expected a number"),
}
# (round, partition id) -> case; rounds 1-3 keep one good client each, round 4 none at all
PLAN = {
    (1, 0): "NaN", (1, 1): "wrong shape", (1, 2): "missing module",
    (2, 1): "Inf", (2, 2): "wrong rank", (2, 3): "extra module",
    (3, 0): "wrong dtype", (3, 2): "huge norm", (3, 3): "empty reply",
    (4, 0): "no factors", (4, 1): "zero examples", (4, 2): "unreadable array",
    (4, 3): "list metric",
}  # fmt: skip
GOOD = {1: 3, 2: 0, 3: 1}
BAD_EVALUATION = 2  # in this round the good client's evaluation reply is malformed too


class TamperingGrid(FakeGrid):
    """A FakeGrid that replaces the train replies named in `PLAN` after the client trained."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids, strict=True):
            kind = message.metadata.message_type
            server_round = int(message.metadata.group_id or 0)  # the query has no round
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            if kind == MessageType.TRAIN and (server_round, pid) in PLAN:
                good = self.replies[message_id]
                lora, _, dense = msg.unpack(good.content[msg.ARRAYS])
                tamper = CASES[PLAN[server_round, pid]][0]
                content = tamper(lora, dense, dict(good.content[msg.METRICS]))
            elif kind == MessageType.EVALUATE and server_round == BAD_EVALUATION:
                content = RecordDict({msg.METRICS: MetricRecord({msg.NUM_EXAMPLES: [1, 2]})})
            else:
                continue
            reply = Message(content, reply_to=message)
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
            self.replies[message_id] = reply
        return ids


def test_the_plan_covers_every_case() -> None:
    assert set(PLAN.values()) | {"negative examples"} == set(CASES)


def test_bad_replies_are_rejected_logged_and_counted_per_round(
    tiny_bert_dir, tmp_path, caplog
) -> None:
    config = tiny_config(
        tiny_bert_dir,
        "clients.num_clients=4",
        "federation.rounds=4",
        "federation.max_update_norm=1000",
        "train.local_steps=1",
    )
    grid = TamperingGrid([{"partition-id": pid} for pid in range(4)])
    with caplog.at_level(logging.WARNING, logger="raflora"):
        run = run_in_process(config, tmp_path / "run", grid=grid, finish=False)
    history = run["history"]
    for record in history[1:]:
        server_round = record["round"]
        planned = {pid: case for (r, pid), case in PLAN.items() if r == server_round}
        assert record["rejected"] == len(planned) and record["failed"] == 0
        assert set(record["rejections"]) == {str(pid) for pid in planned}
        for pid, case in planned.items():
            reason = record["rejections"][str(pid)]
            assert re.search(CASES[case][1], reason), (case, reason)
            assert f"round {server_round}: client {pid} dropped: {reason}" in caplog.text
        if server_round in GOOD:
            assert record["clients"] == [GOOD[server_round]] and not record["skipped"]
            assert np.isfinite(record["train_loss"]) and record["global_rank"] > 0
        else:  # every reply bad: the round is skipped and the previous global model kept
            assert record["skipped"] and record["ok"] == 0 and record["train_loss"] is None
            assert record["server_loss"] == history[server_round - 1]["server_loss"]
            assert f"round {server_round} skipped: 0 valid replies" in caplog.text
    assert history[BAD_EVALUATION]["client_val_accuracy"] is None  # its one reply was skipped
    assert history[1]["client_val_accuracy"] is not None
    summary = finish_run(config, tmp_path / "run")
    assert summary["rejected_updates"] == len(PLAN) and summary["skipped_rounds"] == 1
    assert run["state"].ranks == {3: 2, 0: 2, 1: 4}  # only aggregated clients
