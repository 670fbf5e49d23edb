"""``federation.wire_dtype``: float32, float16 or bfloat16 arrays on the wire, both ways.

Encoding is checked against torch's own float16/bfloat16 casts (round to nearest even), bytes
against numpy's item sizes, and a tiny federated run in float16 against the float32 run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.runs import run_in_process, tiny_config
from raflora.federation import messages as msg
from raflora.federation.dryrun import dry_run
from raflora.federation.validation import Expectation, RejectedUpdate, check_update

EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TINY = {w: float(torch.finfo(t).tiny) for w, t in TORCH.items()}  # smallest normal


def round_trip(value: np.ndarray, wire: str) -> np.ndarray:
    """pack → Flower's protobuf serialisation of a message and back → unpack, one tensor."""
    from flwr.app import Message, RecordDict

    from raflora.experiments.inprocess import _wire, task_identity

    record = msg.pack(dense={"head.weight": value}, wire_dtype=wire)
    with task_identity():
        message = _wire(Message(RecordDict({msg.ARRAYS: record}), 7, "train"))
    return msg.unpack(message.content[msg.ARRAYS], wire_dtype=wire)[2]["head.weight"]


def torch_cast(value: np.ndarray, wire: str) -> np.ndarray:
    """The independent reference: torch's cast to the wire dtype and back to float32."""
    return torch.from_numpy(value).to(TORCH[wire]).to(torch.float32).numpy()


@pytest.mark.parametrize("wire", msg.WIRE_DTYPES)
def test_round_trip_matches_torch_and_is_within_half_an_eps(wire: str) -> None:
    rng = np.random.default_rng(0)
    value = (rng.standard_normal((64, 33)) * 10.0 ** rng.integers(-4, 4, (64, 33))).astype(
        np.float32
    )
    value[0, :4] = [0.0, -0.0, 1.0, -2.5]
    back = round_trip(value, wire)
    assert back.dtype == np.float32 and back.shape == value.shape
    np.testing.assert_array_equal(back, torch_cast(value, wire))
    error, size = np.abs(back - value), np.abs(value)
    normal = size >= TINY[wire]  # relative error ≤ eps / 2 there; below, absolute error
    assert normal.sum() > 1000 and (wire != "float16" or (~normal).sum() > 100)
    assert np.all(error[normal] <= EPS[wire] / 2 * size[normal])
    assert np.all(error[~normal] <= EPS[wire] / 2 * TINY[wire])
    representable = torch_cast(value, wire)  # values the wire dtype holds come back exactly
    np.testing.assert_array_equal(round_trip(representable, wire), representable)


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_the_wire_halves_the_array_bytes(wire: str) -> None:
    rng = np.random.default_rng(1)
    lora = {
        f"layer{i}.q": (rng.standard_normal((40, 8)), rng.standard_normal((8, 24))) for i in (0, 1)
    }
    full = msg.pack(lora=lora).count_bytes()
    half = msg.pack(lora=lora, wire_dtype=wire).count_bytes()
    data = 2 * (40 * 8 + 8 * 24) * 4  # float32 bytes of the four arrays
    assert full - half == data // 2  # same framing, half the data
    carrier = {"float16": np.float16, "bfloat16": np.uint16}[wire]
    assert all(
        arr.numpy().dtype == carrier for arr in msg.pack(lora=lora, wire_dtype=wire).values()
    )


@pytest.mark.parametrize(("wire", "big"), [("float16", 7e4), ("bfloat16", 3.4e38)])
def test_overflow_on_encode_names_the_module_and_the_setting(wire: str, big: float) -> None:
    B = np.zeros((4, 2), np.float32)
    B[1, 1] = -big
    with pytest.raises(
        msg.WireRangeError, match=rf"'enc\.0\.query\.lora_B'.*federation\.wire_dtype = '{wire}'"
    ):
        msg.pack(lora={"enc.0.query": (B, np.ones((2, 3), np.float32))}, wire_dtype=wire)
    assert np.isfinite(round_trip(np.float32([65504.0, 3e38]), "bfloat16")).all()


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_non_finite_values_arrive_as_such_and_validation_rejects_them(wire: str) -> None:
    B = np.ones((4, 2), np.float32)
    B[0, 0] = np.nan
    A = np.full((2, 3), np.inf, np.float32)
    lora = msg.unpack(msg.pack(lora={"m": (B, A)}, wire_dtype=wire), wire_dtype=wire)[0]
    assert np.isnan(lora["m"][0][0, 0]) and np.isposinf(lora["m"][1]).all()
    expectation = Expectation(modules={"m": (4, 3)}, dense={})
    with pytest.raises(RejectedUpdate, match="NaN or Inf"):
        check_update(0, lora, {}, 5, 2, expectation)


def test_an_array_in_another_dtype_than_the_wire_is_a_format_error() -> None:
    record = msg.pack(lora={"m": (np.ones((4, 2)), np.ones((2, 3)))})  # float32
    with pytest.raises(msg.MessageFormatError, match=r"wire_dtype = 'float16' sends float16"):
        msg.unpack(record, wire_dtype="float16")
    halves = msg.pack(lora={"m": (np.ones((4, 2)), np.ones((2, 3)))}, wire_dtype="float16")
    with pytest.raises(msg.MessageFormatError, match=r"dtype float16.*sends uint16"):
        msg.unpack(halves, wire_dtype="bfloat16")


@pytest.mark.timeout(600)
def test_a_float16_run_counts_half_the_bytes_and_ends_close_to_float32(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """examples/tiny.toml, 2 rounds, in process: the float16 wire moves the bytes the dry run
    predicts, 2 bytes per float less than the float32 run's (the same framing), and ends with
    nearly the same metrics (losses within 1e-4, the update's norm within float16's eps)."""
    runs = {}
    for wire in ("float32", "float16"):
        config = tiny_config(tiny_bert_dir, "federation.rounds=2", f"federation.wire_dtype={wire}")
        history = run_in_process(config, tmp_path / wire, finish=False)["history"]
        steady = history[2]["bytes_sent"] + history[2]["bytes_received"]
        assert steady == dry_run(config)["bytes_per_round"]
        runs[wire] = (history, steady)
    (full, full_bytes), (half, half_bytes) = runs["float32"], runs["float16"]
    found = dry_run(tiny_config(tiny_bert_dir))
    per_rank, dense = found["target_modules"]["lora_params_per_rank"], found["dense_params"]
    floats = sum(2 * (rank * per_rank + dense) for rank in found["ranks"])  # both ways
    assert full_bytes - half_bytes == 2 * floats  # 2 bytes less per float, same framing
    assert [r["ok"] for r in half] == [r["ok"] for r in full]
    for name in ("train_loss", "server_loss", "client_val_loss"):
        assert half[-1][name] == pytest.approx(full[-1][name], abs=1e-4), name
    assert half[-1]["server_accuracy"] == full[-1]["server_accuracy"]
    # the global update's norm: float16 rounding moves it by ~eps(float16), not more
    assert half[-1]["norm"] == pytest.approx(full[-1]["norm"], rel=2.0**-10)
    assert half[-1]["norm"] != full[-1]["norm"]  # the wire did round something


@pytest.mark.parametrize("method", ["flora", "fedex", "ffa_lora"])
def test_merged_rounds_residuals_and_b_only_messages_travel_in_bfloat16(
    tiny_bert_dir: Path, tmp_path: Path, method: str
) -> None:
    """Every other wire shape (merged rounds, FedEx's residual, FFA-LoRA's B alone) in
    bfloat16: every client's reply is decoded and accepted in both rounds."""
    config = tiny_config(
        tiny_bert_dir, f"federation.method={method}", "federation.wire_dtype=bfloat16"
    )
    history = run_in_process(config, tmp_path / method, finish=False)["history"]
    assert [(r["ok"], r["failed"], r["rejected"]) for r in history[1:]] == [(3, 0, 0)] * 2
    assert all(r["bytes_received"] > 0 for r in history[1:])


def test_an_unknown_wire_dtype_is_refused_naming_the_field() -> None:
    from raflora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"federation\.wire_dtype"):
        load_config(None, ["federation.wire_dtype=float64"])
