"""The server's defences against hostile replies (issue 22): num-examples bounded by the query
round and a cap, products beyond float32 rejected (never a dead server), norm bounds on what a
client *contributes* (‖B A − G‖ per module and in total, and the head's change), clipping that
keeps rank and never vanishes, and non-finite metrics kept out of metrics.json.

Each defence is checked on `check_update` against numbers computed here, then in a whole
in-process run (FakeGrid) whose chosen replies are replaced after the client trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from helpers.fakegrid import FakeGrid
from helpers.runs import run_in_process, tiny_config
from raflora.federation import messages as msg
from raflora.federation.validation import Expectation, RejectedUpdate, check_update

pytestmark = pytest.mark.usefixtures("single_torch_thread")

M, N, R = 8, 6, 3
MODULES = {"q": (M, N), "v": (M, N)}
HEAD = {"classifier.weight": (2, 4)}


def pair(seed: int, rank: int = R, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    B = (scale * rng.standard_normal((M, rank))).astype(np.float32)
    return B, rng.standard_normal((rank, N)).astype(np.float32)


def product(factors) -> np.ndarray:
    B, A = factors
    return np.asarray(B, np.float64) @ np.asarray(A, np.float64)


def with_norm(factors, norm: float):
    """`factors` with B rescaled so that ‖B A‖_F = norm."""
    B, A = factors
    return (B * np.float32(norm / np.linalg.norm(product(factors)))).astype(np.float32), A


def StartPoint(*args, **kwargs):
    from raflora.federation.validation import StartPoint

    return StartPoint(*args, **kwargs)


def head(value: float = 0.25) -> dict[str, np.ndarray]:
    return {"classifier.weight": np.full((2, 4), value, np.float32)}


def check(lora, dense=None, num_examples=10, start=None, metrics=None, **expect):
    expectation = Expectation(dict.fromkeys(lora, (M, N)), dict(HEAD), **expect)
    dense = head() if dense is None else dense
    where = {} if start is None else {"start": start}
    return check_update(3, lora, dense, num_examples, R, expectation, metrics=metrics, **where)


# --------------------------------------------------------------------------- 22.2 num-examples


def test_num_examples_is_bounded_by_the_query_round_and_the_cap() -> None:
    ones = (np.ones((4, 2), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(RejectedUpdate, match="num-examples is 1e\\+300, beyond 2\\^53"):
        check_update(0, {"q": ones}, {}, 1e300, 2, Expectation({"q": (4, 3)}, {}))  # the issue's
    lora = {"q": pair(0)}
    start = StartPoint(num_examples=120)
    assert check(lora, num_examples=120, start=start)[0].num_examples == 120
    with pytest.raises(RejectedUpdate, match="121, more than the 120 the client reported"):
        check(lora, num_examples=121, start=start)
    with pytest.raises(RejectedUpdate, match=r"61, above federation\.max_num_examples 60"):
        check(lora, num_examples=61, max_num_examples=60)


# --------------------------------------------------------------------------- 22.3 overflow


def test_a_product_beyond_float32_is_a_rejected_reply() -> None:
    B, A = np.full((M, R), 1e19, np.float32), np.full((R, N), 1e19, np.float32)  # finite
    with pytest.raises(RejectedUpdate, match=r"q: ‖B A‖_F = .* is beyond 1e\+15"):
        check({"q": (B, A)})
    with pytest.raises(RejectedUpdate, match=r"dense\.classifier\.weight: ‖x‖_F .* beyond 1e\+15"):
        check({"q": pair(0)}, dense=head(1e19))


# --------------------------------------------------------------------------- 22.4 the bound


def test_the_bound_is_on_the_contribution_not_on_the_reply() -> None:
    """The issue's numbers: a global share G of norm 0.9 and a bound of 1.0."""
    B0, A0 = with_norm(pair(1), 0.9)
    start = StartPoint({"q": (B0, A0)}, head())
    honest = (np.float32(1 + 0.12 / 0.9) * B0, A0)  # a step of 0.12 along G: ‖B A‖ = 1.02
    update, review = check({"q": honest}, start=start, max_norm=1.0)
    assert review.clipped_modules == 0 and update.factors["q"][0] is honest[0]
    assert review.norm == pytest.approx(0.12, rel=1e-5)
    hostile = (np.float32(-1.1) * B0, A0)  # ‖B A‖ = 0.99 but it moves G by 2.1 · 0.9 = 1.89
    with pytest.raises(RejectedUpdate, match=r"q: contribution ‖ΔW‖_F = 1\.89 exceeds max_update"):
        check({"q": hostile}, start=start, max_norm=1.0)


def test_the_strategy_measures_each_reply_from_the_share_it_sent() -> None:
    """The issue's failure through the strategy: every module of the global update has norm 0.9
    (rank 2, so every client's share is all of it) and the bound is 1.0. Honest clients step
    0.12 along their share (‖B A‖ = 1.02), a hostile one replies −1.1 × its share (‖B A‖ =
    0.99, contribution 1.89): the honest replies pass, the hostile one is rejected."""
    from helpers.fakegrid import task_identity
    from helpers.replies import train_reply
    from raflora.config import config_from_dict
    from raflora.federation.strategy import HeteroRankStrategy, NodeInfo
    from raflora.math.round import GlobalState, compress

    rng = np.random.default_rng(0)
    adapter = {}
    for name in MODULES:
        B, A = rng.standard_normal((M, 2)), rng.standard_normal((2, N))
        adapter[name] = compress(B * 0.9 / np.linalg.norm(B @ A), A)
    state = GlobalState(1, adapter, {}, head(), {})
    config = config_from_dict(
        {"clients": {"num_clients": 3, "ranks": [2, 4, 8]},
         "federation": {"method": "raflora", "max_update_norm": 1.0}}
    )  # fmt: skip
    expectation = Expectation(dict(MODULES), dict(HEAD), max_norm=1.0)
    s = HeteroRankStrategy(config=config, state=state, expectation=expectation)
    nodes = {pid: 1000 + pid for pid in range(3)}
    s.register_nodes(NodeInfo(nodes[pid], pid, [2, 4, 8][pid], 50) for pid in range(3))
    with task_identity():
        messages = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), grid=None))
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        lora, _, dense = msg.unpack(message.content[msg.ARRAYS])
        factor = -1.1 if node == nodes[2] else 1 + 0.12 / 0.9
        rank = [2, 4, 8][node - 1000]  # the share has rank 2; fresh directions start at B = 0
        fresh = rng.standard_normal((rank - 2, N)).astype(np.float32)
        reply = {
            n: (np.hstack([np.float32(factor) * B, np.zeros((M, rank - 2), np.float32)]),
                np.vstack([A, fresh]))
            for n, (B, A) in lora.items()
        }  # fmt: skip
        assert all(np.linalg.norm(product(pair)) > 0.98 for pair in reply.values())
        replies.append(train_reply(node, reply, 40, {k: v + 0.01 for k, v in dense.items()}))
    s.aggregate_train(2, replies)
    assert s.current.ok == [0, 1]
    assert list(s.current.rejected) == [2]
    assert "contribution ‖ΔW‖_F = 1.89 (and 1 more tensors) exceeds" in s.current.rejected[2]
    assert all(0.12 < c["total"] < 0.2 for c in s.current.contributions.values())


def test_a_fresh_lora_start_bounds_the_whole_product() -> None:
    """Merge mode and round 1: the client starts from B = 0, so its contribution is B A."""
    reply = with_norm(pair(2), 2.0)
    with pytest.raises(RejectedUpdate, match="contribution ‖ΔW‖_F = 2 exceeds"):
        check({"q": reply}, start=StartPoint({}, head()), max_norm=1.5)


def test_the_total_bound_covers_every_module_and_the_head() -> None:
    start = StartPoint({"q": pair(3), "v": pair(4)}, head())
    steps = {name: with_norm(pair(5 + i), 0.6) for i, name in enumerate(("q", "v"))}
    lora = {n: (start.lora[n][0] + steps[n][0], start.lora[n][1]) for n in steps}
    lora = {n: (B.astype(np.float32), A) for n, (B, A) in lora.items()}
    moved = head(0.25 + 0.3 / np.sqrt(8))  # the head moves by 0.3
    total = np.sqrt(sum(np.linalg.norm(product(lora[n]) - product(start.lora[n])) ** 2
                        for n in lora) + 0.3**2)  # fmt: skip
    _, review = check(lora, dense=moved, start=start, max_norm=1.0, max_total_norm=total + 1e-3)
    assert review.norm == pytest.approx(total, rel=1e-5) and review.clipped_modules == 0
    with pytest.raises(RejectedUpdate, match="over all tensors exceeds max_total_update_norm"):
        check(lora, dense=moved, start=start, max_norm=1.0, max_total_norm=0.5 * total)
    update, review = check(
        lora, dense=moved, start=start, max_total_norm=0.5 * total, norm_policy="clip"
    )
    after = sum(
        np.linalg.norm(product(update.factors[n]) - product(start.lora[n])) ** 2 for n in lora
    ) + np.linalg.norm(update.dense["classifier.weight"] - head()["classifier.weight"]) ** 2
    assert np.sqrt(after) == pytest.approx(0.5 * total, rel=1e-4)
    assert review.clipped_modules == 3 and "clipped to max_total_update_norm" in review.clipped


def test_clipping_scales_the_contribution_and_keeps_the_rank() -> None:
    B0, A0 = pair(6)
    start = StartPoint({"q": (B0, A0)}, head())
    step = with_norm(pair(7), 4.0)[0]
    reply = ((B0 + step).astype(np.float32), A0)  # only B moved: the path is linear in c
    G, BA = product((B0, A0)), product(reply)
    bound = 0.5 * np.linalg.norm(BA - G)
    update, review = check({"q": reply}, start=start, max_norm=bound, norm_policy="clip")
    B, A = update.factors["q"]
    assert B.shape == (M, R) and A.shape == (R, N) and B.dtype == A.dtype == np.float32
    assert review.clipped_modules == 1 and review.clipped.startswith("q: contribution")
    np.testing.assert_allclose(product((B, A)) - G, 0.5 * (BA - G), rtol=1e-4, atol=1e-5)
    # a general step (B and A moved) lands on the bound too, at the reply's rank
    reply = (reply[0], (A0 + 0.3 * pair(8)[1]).astype(np.float32))
    update, _ = check({"q": reply}, start=start, max_norm=bound, norm_policy="clip")
    got = np.linalg.norm(product(update.factors["q"]) - G)
    assert got == pytest.approx(bound, rel=1e-4) and update.rank == R


def test_a_clipped_step_that_rounds_to_nothing_is_rejected() -> None:
    """A huge global share and a tiny bound: B0 + c ΔB is B0 again in float32, which would be
    aggregated as 'no change' with the client's full weight."""
    B0, A0 = pair(9, scale=1e4)
    start = StartPoint({"q": (B0, A0)}, head())
    reply = ((B0 + pair(10)[0]).astype(np.float32), A0)
    with pytest.raises(RejectedUpdate, match="rounds to nothing in float32"):
        check({"q": reply}, start=start, max_norm=1e-9, norm_policy="clip")


# --------------------------------------------------------------------------- 22.5 the head


def test_the_classifier_head_is_bounded_like_a_module() -> None:
    start = StartPoint({"q": pair(11)}, head())
    lora = {"q": start.lora["q"]}  # no LoRA step at all
    over = r"dense\.classifier\.weight: contribution ‖ΔW‖_F = 2\.828e\+06 exceeds"
    with pytest.raises(RejectedUpdate, match=over):
        check(lora, dense=head(1e6), start=start, max_norm=1.0)  # the head of 1e6
    update, review = check(lora, dense=head(1e6), start=start, max_norm=1.0, norm_policy="clip")
    change = update.dense["classifier.weight"] - head()["classifier.weight"]
    assert np.linalg.norm(change) == pytest.approx(1.0, rel=1e-5) and np.all(change > 0)
    assert review.clipped_modules == 1


# --------------------------------------------------------------------------- 22.7 metrics


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"train-loss": float("nan")}, "'train-loss' is nan, expected a finite number"),
        ({"val-accuracy": 1e9}, "'val-accuracy' is 1e\\+09, expected an accuracy in \\[0, 1\\]"),
        ({"val-loss": float("inf")}, "'val-loss' is inf, expected a finite number"),
        ({"seconds": -1.0}, "'seconds' is -1, expected ≥ 0"),
    ],
)
def test_metrics_must_be_finite_and_in_range(metrics: dict, match: str) -> None:
    with pytest.raises(RejectedUpdate, match=match):
        check({"q": pair(0)}, metrics=metrics)


# --------------------------------------------------------------------------- whole runs

Edit = Callable[[dict, dict, dict], tuple[dict, dict, dict]]  # (lora, dense, metrics)


class TamperingGrid(FakeGrid):
    """FakeGrid whose replies named in `plan` ``{(kind, round, pid): edit}`` are replaced by
    ``edit(lora, dense, metrics)`` of the honest reply after the client answered."""

    def __init__(self, num_nodes: int, plan: dict[tuple[str, int, int], Edit]) -> None:
        super().__init__([{"partition-id": pid} for pid in range(num_nodes)])
        self.plan = plan

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, message_id in zip(messages, ids, strict=True):
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            key = (message.metadata.message_type, int(message.metadata.group_id or 0), pid)
            if key not in self.plan:
                continue
            honest = self.replies[message_id].content
            lora, dense = {}, {}
            if msg.ARRAYS in honest:
                lora, _, dense = msg.unpack(honest[msg.ARRAYS])
            lora, dense, metrics = self.plan[key](lora, dense, dict(honest[msg.METRICS]))
            content = RecordDict({msg.METRICS: MetricRecord(metrics)})
            if lora:
                content[msg.ARRAYS] = msg.pack(lora=lora, dense=dense)
            reply = Message(content, reply_to=message)
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
            self.replies[message_id] = reply
        return ids


TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE


def strict_json(path: Path):
    """metrics.json as a standard JSON parser reads it: NaN / Infinity are errors."""

    def refuse(token: str):
        raise ValueError(f"{path.name} is not standard JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def tampered_run(tiny_bert_dir, tmp_path, plan, *overrides: str) -> list[dict]:
    config = tiny_config(tiny_bert_dir, "train.local_steps=1", *overrides)
    grid = TamperingGrid(config.clients.num_clients, plan)
    run_in_process(config, tmp_path / "run", grid=grid, finish=False)
    return strict_json(tmp_path / "run" / "metrics.json")


def test_an_overflowing_reply_is_rejected_and_the_run_goes_on(tiny_bert_dir, tmp_path) -> None:
    def overflow(lora, dense, metrics):
        huge = {n: (np.full_like(B, 1e19), np.full_like(A, 1e19)) for n, (B, A) in lora.items()}
        return huge, dense, metrics

    history = tampered_run(tiny_bert_dir, tmp_path, {(TRAIN, 1, 0): overflow})
    assert [r["round"] for r in history] == [0, 1, 2] and not history[1]["skipped"]
    assert set(history[1]["rejections"]) == {"0"} and history[1]["ok"] == 2
    assert "is beyond 1e+15" in history[1]["rejections"]["0"]
    assert history[2]["rejected"] == 0 and history[2]["server_accuracy"] is not None


def test_an_inflated_num_examples_is_rejected_in_a_run(tiny_bert_dir, tmp_path) -> None:
    def inflate(lora, dense, metrics):
        return lora, dense, {**metrics, msg.NUM_EXAMPLES: 10**9}

    history = tampered_run(tiny_bert_dir, tmp_path, {(TRAIN, 1, 2): inflate})
    assert set(history[1]["rejections"]) == {"2"}
    assert "more than the" in history[1]["rejections"]["2"]
    assert set(history[1]["client_examples"]) == {"0", "1"}  # the weights that were used


def test_a_huge_head_is_rejected_in_a_run(tiny_bert_dir, tmp_path) -> None:
    def huge_head(lora, dense, metrics):
        return lora, {name: np.full_like(x, 1e6) for name, x in dense.items()}, metrics

    plan = {(TRAIN, 1, 1): huge_head}
    history = tampered_run(tiny_bert_dir, tmp_path, plan, "federation.max_update_norm=1.0")
    assert set(history[1]["rejections"]) == {"1"}
    assert history[1]["rejections"]["1"].startswith("dense.classifier.")
    assert "exceeds max_update_norm 1.0" in history[1]["rejections"]["1"]


def test_non_finite_metrics_never_reach_metrics_json(tiny_bert_dir, tmp_path) -> None:
    def nan_loss(lora, dense, metrics):
        return lora, dense, {**metrics, msg.TRAIN_LOSS: float("nan")}

    def metric(key: str, value: float) -> Edit:
        return lambda lora, dense, metrics: (lora, dense, {**metrics, key: value})

    plan = {
        (TRAIN, 1, 0): nan_loss,
        (EVALUATE, 1, 1): metric("val-accuracy", 1e9),
        (EVALUATE, 2, 2): metric("val-loss", float("inf")),
    }
    history = tampered_run(tiny_bert_dir, tmp_path, plan)  # strict JSON: parses
    assert history[1]["rejections"] == {
        "0": "metric 'train-loss' is nan, expected a finite number"
    }
    assert set(history[1]["ignored_evaluations"]) == {"1"}
    assert "expected an accuracy in [0, 1]" in history[1]["ignored_evaluations"]["1"]
    assert set(history[2]["ignored_evaluations"]) == {"2"}
    for record in history[1:]:
        assert 0 <= record["client_val_accuracy"] <= 1 and record["client_val_loss"] >= 0
