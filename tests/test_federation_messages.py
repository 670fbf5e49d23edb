"""Wire format (`messages`) and reply checks (`validation`): round trips and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from raflora.federation import messages as msg
from raflora.federation.validation import Expectation, RejectedUpdate, check_update
from raflora.math import factored_norm

M, N = 6, 5
MODULES = {"enc.0.query": (M, N), "enc.0.value": (M, N)}
HEAD = {"classifier.weight": (2, 3)}


def factors(rank: int, seed: int = 0, dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.standard_normal((m, rank)).astype(dtype),
            rng.standard_normal((rank, n)).astype(dtype),
        )
        for name, (m, n) in MODULES.items()
    }


def head(dtype=np.float32) -> dict[str, np.ndarray]:
    return {"classifier.weight": np.arange(6, dtype=dtype).reshape(2, 3)}


# --------------------------------------------------------------------------- messages


def test_pack_unpack_round_trip_is_exact() -> None:
    lora = factors(3)
    merged = {"enc.0.query": (np.ones((M, 7), np.float32), np.full((7, N), 0.5, np.float32))}
    record = msg.pack(lora=lora, merged=merged, dense=head())
    assert set(record) == {
        "enc.0.query.lora_B",
        "enc.0.query.lora_A",
        "enc.0.value.lora_B",
        "enc.0.value.lora_A",
        "enc.0.query.merged_B",
        "enc.0.query.merged_A",
        "dense.classifier.weight",
    }
    lora2, merged2, dense2 = msg.unpack(record)
    for sent, got in ((lora, lora2), (merged, merged2)):
        assert sent.keys() == got.keys()
        for name in sent:
            for a, b in zip(sent[name], got[name], strict=True):
                assert b.dtype == np.float32 and np.array_equal(a, b)
    assert np.array_equal(dense2["classifier.weight"], head()["classifier.weight"])


def test_module_names_that_look_like_the_dense_prefix_round_trip() -> None:
    """A top-level module called "dense" (key "dense.lora_A") is a LoRA module, not a head."""
    lora = {"dense": (np.ones((3, 2), np.float32), np.ones((2, 4), np.float32))}
    heads = {"dense.bias": np.ones(3, np.float32), "dense": np.zeros(2, np.float32)}
    got_lora, _, got_dense = msg.unpack(msg.pack(lora=lora, dense=heads))
    assert set(got_lora) == {"dense"} and got_lora["dense"][0].shape == (3, 2)
    assert set(got_dense) == {"dense.bias", "dense"}


def test_pack_casts_to_float32_and_empty_pack_is_empty() -> None:
    record = msg.pack(lora={"m": (np.ones((2, 1)), np.ones((1, 3)))})  # float64 in
    assert record["m.lora_B"].numpy().dtype == np.float32
    assert msg.unpack(msg.pack()) == ({}, {}, {})


def test_pack_keeps_non_contiguous_values() -> None:
    B = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # a strided view
    lora, _, _ = msg.unpack(msg.pack(lora={"m": (B, B.T)}))
    assert np.array_equal(lora["m"][0], B) and np.array_equal(lora["m"][1], B.T)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (["enc.query.lora_B"], "only \\['B'\\]"),
        (["enc.query.merged_A"], "only \\['A'\\]"),
        (["enc.query.weight"], "unexpected array key"),
        (["enc.query.lora_B", "enc.query.lora_A", "bias"], "unexpected array key 'bias'"),
    ],
)
def test_unpack_rejects_malformed_keys(keys: list[str], match: str) -> None:
    record = ArrayRecord({key: Array(np.zeros((2, 2), np.float32)) for key in keys})
    with pytest.raises(msg.MessageFormatError, match=match):
        msg.unpack(record)


def test_merged_rounds_round_trip_and_only_unpack_payload_reads_them() -> None:
    rounds = {3: factors(2, seed=3), 1: factors(4, seed=1)}
    record = msg.pack(lora=factors(3), dense=head(), rounds=rounds)
    assert "enc.0.query.merged_B@3" in record and "enc.0.value.merged_A@1" in record
    payload = msg.unpack_payload(record)
    assert list(payload.rounds) == [1, 3] and payload.merged == {}
    for t, sent in rounds.items():
        for name, (B, A) in sent.items():
            got = payload.rounds[t][name]
            assert got[0].tobytes() == B.tobytes() and got[1].tobytes() == A.tobytes()
    assert set(payload.lora) == set(MODULES) and set(payload.dense) == set(HEAD)
    with pytest.raises(msg.MessageFormatError, match=r"per-round merged factors \(rounds \[1, 3\]"):
        msg.unpack(record)  # a client's reply never carries merged rounds
    with pytest.raises(ValueError, match="round 0"):
        msg.pack(rounds={0: factors(1)})


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        (["q.merged_B@2"], r"round-2 merged factors"),
        (["q.merged_B@2", "q.merged_A@3"], r"only \['B'\] of its round-2"),
        (["q.merged_B@0", "q.merged_A@0"], "unexpected array key 'q.merged_B@0'"),
        (["q.merged_B@x", "q.merged_A@x"], "unexpected array key"),
    ],
)
def test_unpack_payload_rejects_malformed_round_keys(keys: list[str], match: str) -> None:
    record = ArrayRecord({key: Array(np.zeros((2, 2), np.float32)) for key in keys})
    with pytest.raises(msg.MessageFormatError, match=match):
        msg.unpack_payload(record)


# --------------------------------------------------------------------------- validation


def expect(**kwargs) -> Expectation:
    return Expectation(modules=dict(MODULES), dense=dict(HEAD), **kwargs)


def check(lora=None, dense=None, num_examples=10, rank=3, expectation=None):
    return check_update(
        4,
        factors(rank) if lora is None else lora,
        head() if dense is None else dense,
        num_examples,
        rank,
        expectation or expect(),
    )


def test_a_valid_reply_passes_unchanged() -> None:
    lora = factors(3)
    update, review = check(lora=lora)
    assert review.clipped_modules == 0
    assert (update.partition_id, update.rank, update.num_examples) == (4, 3, 10)
    assert all(update.factors[n][0] is lora[n][0] for n in MODULES)


def broken(name: str, part: int, value: np.ndarray) -> dict:
    lora = factors(3)
    pair = list(lora[name])
    pair[part] = value
    lora[name] = tuple(pair)
    return lora


BAD_REPLIES = {
    "wrong shape": (broken("enc.0.query", 0, np.ones((M + 1, 3), np.float32)), "shapes B"),
    "wrong input size": (broken("enc.0.query", 1, np.ones((3, N - 1), np.float32)), "shapes B"),
    "B/A rank mismatch": (broken("enc.0.value", 1, np.ones((2, N), np.float32)), "B has rank 3"),
    "wrong rank": (factors(2), "rank 2, but the client was allocated rank 3"),
    "NaN": (broken("enc.0.query", 0, np.full((M, 3), np.nan, np.float32)), "NaN or Inf"),
    "Inf": (broken("enc.0.value", 1, np.full((3, N), np.inf, np.float32)), "NaN or Inf"),
    "float64": (factors(3, dtype=np.float64), "dtype float64, expected float32"),
    "missing module": ({"enc.0.query": factors(3)["enc.0.query"]}, "missing \\['enc.0.value'\\]"),
    "extra module": (
        {**factors(3), "enc.1.query": factors(3)["enc.0.query"]},
        "unexpected \\['enc.1.query'\\]",
    ),
    "empty": ({}, "empty reply"),
    "1-d factor": (broken("enc.0.query", 0, np.ones(M, np.float32)), "shapes B"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_factors_are_rejected_with_a_reason(case: str) -> None:
    lora, reason = BAD_REPLIES[case]
    with pytest.raises(RejectedUpdate, match=reason):
        check(lora=lora)


@pytest.mark.parametrize(
    ("dense", "reason"),
    [
        ({}, "dense tensors \\[\\], expected \\['classifier.weight'\\]"),
        ({**head(), "pooler.weight": np.ones(2, np.float32)}, "dense tensors"),
        (
            {"classifier.weight": np.ones((3, 2), np.float32)},
            "shape \\(3, 2\\), expected \\(2, 3\\)",
        ),
        ({"classifier.weight": np.full((2, 3), np.nan, np.float32)}, "NaN or Inf"),
        (head(np.float64), "dtype float64"),
    ],
)
def test_bad_dense_tensors_are_rejected(dense: dict, reason: str) -> None:
    with pytest.raises(RejectedUpdate, match=reason):
        check(dense=dense)


@pytest.mark.parametrize(
    "num_examples", [0, -3, 2.5, None, "12", True, float("nan"), float("inf"), -float("inf")]
)
def test_bad_num_examples_are_rejected(num_examples: object) -> None:
    with pytest.raises(RejectedUpdate, match="num-examples"):
        check(num_examples=num_examples)


def test_integral_float_num_examples_is_accepted_as_int() -> None:
    update, _ = check(num_examples=12.0)
    assert update.num_examples == 12 and isinstance(update.num_examples, int)


def test_lower_rank_only_when_allowed() -> None:
    with pytest.raises(RejectedUpdate, match="allocated rank 3"):
        check(lora=factors(2))
    update, _ = check(lora=factors(2), expectation=expect(allow_lower_rank=True))
    assert update.rank == 2
    with pytest.raises(RejectedUpdate, match="allocated rank 3"):  # higher is never allowed
        check(lora=factors(4), expectation=expect(allow_lower_rank=True))


def test_modules_of_different_ranks_are_rejected() -> None:
    lora = factors(3)
    lora["enc.0.value"] = factors(2)["enc.0.value"]
    with pytest.raises(RejectedUpdate, match="different ranks"):
        check(lora=lora, expectation=expect(allow_lower_rank=True))


def test_huge_norm_is_rejected() -> None:
    lora = factors(3)
    norm = factored_norm(*(x.astype(np.float64) for x in lora["enc.0.query"]))
    with pytest.raises(RejectedUpdate, match="exceeds max_update_norm"):
        check(lora=lora, expectation=expect(max_norm=norm / 2))
    check(lora=lora, expectation=expect(max_norm=10 * norm))  # below the bound: fine


def test_clipping_scales_the_update_to_the_bound() -> None:
    lora = factors(3)
    norms = {n: np.linalg.norm(lora[n][0].astype(np.float64) @ lora[n][1]) for n in MODULES}
    bound = 0.5 * min(norms.values())
    update, review = check(lora=lora, expectation=expect(max_norm=bound, norm_policy="clip"))
    assert review.clipped_modules == len(MODULES)
    for name in MODULES:
        B, A = update.factors[name]
        assert B.dtype == np.float32
        assert np.linalg.norm(B.astype(np.float64) @ A) == pytest.approx(bound, rel=1e-5)
        # the direction is unchanged: B A is a positive multiple of the original
        ratio = (B.astype(np.float64) @ A) / (lora[name][0].astype(np.float64) @ lora[name][1])
        np.testing.assert_allclose(ratio, bound / norms[name], rtol=1e-4)


def test_clipping_leaves_small_updates_alone() -> None:
    lora = factors(3)
    update, review = check(lora=lora, expectation=expect(max_norm=1e6, norm_policy="clip"))
    assert review.clipped_modules == 0
    assert all(np.array_equal(update.factors[n][0], lora[n][0]) for n in MODULES)
