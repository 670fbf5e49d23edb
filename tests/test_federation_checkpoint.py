"""Checkpoints: bit-identical round trip, every kind of damage refused, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from raflora.federation import checkpoint as ckpt
from raflora.federation.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from raflora.math.round import GlobalState, StackedUpdate, compress, decompose

EXTRA = {"history": [{"round": 1, "server_accuracy": 0.5}], "config": {"run": {"seed": 3}}}


def state(round_number: int = 2, merged: bool = False, svd: bool = False) -> GlobalState:
    """A state as the server keeps it: adapter updates as stacked factors + leading triplets,
    merged ones as thin SVDs (``svd``: the adapter as a thin SVD too, as format 1 held it)."""
    rng = np.random.default_rng(round_number)
    updates = {
        name: (compress if merged or svd else lambda B, A: decompose(B, A, top=3))(
            rng.standard_normal((8, 5)), rng.standard_normal((5, 6))
        )
        for name in ("bert.encoder.layer.0.attention.self.query", "layer.1.value")
    }
    dense = {"classifier.weight": rng.standard_normal((2, 8)).astype(np.float32)}
    adapter, merged_updates = ({}, updates) if merged else (updates, {})
    return GlobalState(round_number, adapter, merged_updates, dense, {0: 2, 1: 4, 10: 8})


def assert_identical(a: GlobalState, b: GlobalState) -> None:
    assert (a.round, a.ranks) == (b.round, b.ranks)
    for kind in ("adapter", "merged"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert x.keys() == y.keys()
        for name in x:
            assert type(x[name]) is type(y[name])
            parts = ("B", "A", "U", "S", "Vt") if isinstance(x[name], StackedUpdate) else ("U",)
            for part in (*parts, "S", "Vt"):
                p, q = getattr(x[name], part), getattr(y[name], part)
                assert p.dtype == q.dtype and p.shape == q.shape
                assert p.tobytes() == q.tobytes()
    assert a.dense.keys() == b.dense.keys()
    assert all(a.dense[k].tobytes() == b.dense[k].tobytes() for k in a.dense)


@pytest.mark.parametrize("merged", [False, True])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, merged: bool) -> None:
    original = state(merged=merged)
    path = save_checkpoint(tmp_path, original, EXTRA)
    assert path == checkpoint_dir(tmp_path, 2) == tmp_path / "checkpoints" / "round_002"
    loaded, meta = load_checkpoint(path)
    assert_identical(original, loaded)
    assert meta["history"] == EXTRA["history"] and meta["config"] == EXTRA["config"]


def test_a_format_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """Format 1 (before the adapter kept its stacked factors) held thin SVDs only."""
    original = state(svd=True)
    path = save_checkpoint(tmp_path, original, EXTRA)
    assert json.loads((path / ckpt.META).read_text())["format"] == 3
    rewrite_meta(path, lambda m: m.update(format=1), rehash=True)
    loaded, meta = load_checkpoint(path)
    assert meta["format"] == 1
    assert_identical(original, loaded)


def test_latest_checkpoint_is_the_highest_complete_round(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for r in (1, 2, 10):
        save_checkpoint(tmp_path, state(r), EXTRA)
    assert latest_checkpoint(tmp_path).name == "round_010"
    (tmp_path / "checkpoints" / "round_011").mkdir()  # no state.json: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "round_010"


def test_saving_a_round_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, state(2), EXTRA)
    newer = state(2, merged=True)
    save_checkpoint(tmp_path, newer, {"history": []})
    loaded, meta = load_checkpoint(checkpoint_dir(tmp_path, 2))
    assert_identical(newer, loaded)
    assert meta["history"] == []


# --------------------------------------------------------------------------- merged rounds


def with_rounds(round_number: int, rounds: list[int]) -> GlobalState:
    """A merge-mode state whose merged rounds are ``rounds`` (factors of rank 2 + t)."""
    rng = np.random.default_rng(99)
    merged_rounds = {
        t: {
            name: (
                rng.standard_normal((8, 2 + t)).astype(np.float32),
                rng.standard_normal((2 + t, 6)).astype(np.float32),
            )
            for name in ("bert.encoder.layer.0.attention.self.query", "layer.1.value")
        }
        for t in rounds
    }
    return dataclasses.replace(state(round_number, merged=True), merged_rounds=merged_rounds)


def assert_same_rounds(a: GlobalState, b: GlobalState) -> None:
    assert list(a.merged_rounds) == list(b.merged_rounds)
    for t, factors in a.merged_rounds.items():
        assert factors.keys() == b.merged_rounds[t].keys()
        for name, pair in factors.items():
            for x, y in zip(pair, b.merged_rounds[t][name], strict=True):
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_merged_rounds_are_written_once_and_shared_by_later_checkpoints(tmp_path: Path) -> None:
    states = [with_rounds(1, [1]), with_rounds(2, [1]), with_rounds(3, [1, 3])]  # 2 skipped
    written = {}
    for original in states:
        path = save_checkpoint(tmp_path, original, EXTRA)
        folder = tmp_path / "checkpoints" / ckpt.ROUNDS
        written[original.round] = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        loaded, meta = load_checkpoint(path)
        assert_identical(original, loaded)
        assert_same_rounds(original, loaded)
        assert sorted(meta["merged_rounds"]) == [str(t) for t in original.merged_rounds]
    assert sorted(written[3]) == ["round_001.safetensors", "round_003.safetensors"]
    first = written[1]["round_001.safetensors"]
    assert written[2]["round_001.safetensors"] == written[3]["round_001.safetensors"] == first
    # every checkpoint still loads its own rounds
    loaded, _ = load_checkpoint(checkpoint_dir(tmp_path, 1))
    assert_same_rounds(states[0], loaded)


def test_a_modified_or_missing_merged_round_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, with_rounds(2, [1, 2]), EXTRA)
    round_file = ckpt.merged_round_path(tmp_path, 1)
    original = round_file.read_bytes()
    flip(round_file, 100)
    with pytest.raises(CheckpointError, match=r"round_001\.safetensors: SHA-256 does not match"):
        load_checkpoint(path)
    round_file.unlink()
    with pytest.raises(CheckpointError, match="merged round 1 is missing"):
        load_checkpoint(path)
    round_file.write_bytes(original)
    load_checkpoint(path)


def test_a_format_2_checkpoint_has_its_merged_sum_as_one_merged_round(tmp_path: Path) -> None:
    original = with_rounds(4, [1, 2, 4])
    path = save_checkpoint(tmp_path, original, EXTRA)
    rewrite_meta(path, lambda m: (m.update(format=2), m.pop("merged_rounds")), rehash=True)
    loaded, _ = load_checkpoint(path)
    assert_identical(original, loaded)
    assert list(loaded.merged_rounds) == [4]
    for name, update in original.merged.items():
        B, A = loaded.merged_rounds[4][name]
        np.testing.assert_allclose(B @ A, (update.U * update.S) @ update.Vt, atol=1e-5)


# --------------------------------------------------------------------------- damage


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path, state(), EXTRA)


def test_truncated_arrays_are_refused(saved: Path) -> None:
    arrays = saved / ckpt.ARRAYS
    data = arrays.read_bytes()
    arrays.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or modified"):
        load_checkpoint(saved)


def test_truncated_metadata_is_refused(saved: Path) -> None:
    meta = saved / ckpt.META
    meta.write_bytes(meta.read_bytes()[:-40])
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [0, 9, 200, -1, -5])
def test_a_flipped_byte_in_the_arrays_is_refused(saved: Path, where: int) -> None:
    flip(saved / ckpt.ARRAYS, where)
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


def test_a_flipped_byte_anywhere_in_the_metadata_is_refused(tmp_path: Path) -> None:
    """Every single-bit change of state.json (keys, ranks, round, history) is detected."""
    path = save_checkpoint(tmp_path, state(), EXTRA)
    meta = path / ckpt.META
    original = meta.read_bytes()
    for offset in range(0, len(original), max(1, len(original) // 97)):
        flip(meta, offset)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        meta.write_bytes(original)
    load_checkpoint(path)  # restored: loads again


def rewrite_meta(path: Path, change, rehash: bool = False) -> None:
    """Edit state.json; with `rehash` its own digest is recomputed (a consistent-looking file
    whose content no longer matches the arrays)."""
    meta = json.loads((path / ckpt.META).read_text())
    change(meta)
    if rehash:
        meta["meta_sha256"] = ckpt._meta_digest(meta)
    (path / ckpt.META).write_text(json.dumps(meta))


INCONSISTENT = {  # edits that no longer describe the arrays file
    "no ranks": lambda m: m.pop("ranks"),
    "extra dense": lambda m: m["dense"].append("pooler.weight"),
    "extra module": lambda m: m["adapter"].append("layer.9.query"),
    "missing module": lambda m: m["adapter"].pop(),
    "not a list": lambda m: m.update(adapter="oops"),
    "bad rank": lambda m: m["ranks"].update({"0": "two"}),
}
EDITS = {
    **INCONSISTENT,
    "round": lambda m: m.update(round=7),
    "rank": lambda m: m["ranks"].update({"0": 16}),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_metadata_is_refused(saved: Path, edit: str) -> None:
    rewrite_meta(saved, EDITS[edit])
    with pytest.raises(CheckpointError, match="modified"):
        load_checkpoint(saved)


@pytest.mark.parametrize("edit", sorted(INCONSISTENT))
def test_inconsistent_metadata_is_refused_even_with_a_fresh_digest(saved: Path, edit: str) -> None:
    rewrite_meta(saved, INCONSISTENT[edit], rehash=True)
    with pytest.raises(CheckpointError, match=r"inconsistent|arrays|lacks array"):
        load_checkpoint(saved)


@pytest.mark.parametrize("missing", [ckpt.ARRAYS, ckpt.META])
def test_a_missing_file_is_refused(saved: Path, missing: str) -> None:
    (saved / missing).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(saved)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "checkpoints" / "round_001")


def test_another_format_is_refused(saved: Path) -> None:
    rewrite_meta(saved, lambda m: m.update(format=99))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(saved)


def test_a_foreign_file_is_refused(saved: Path) -> None:
    (saved / ckpt.META).write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


# --------------------------------------------------------------------------- atomicity


def test_a_failed_write_leaves_no_partial_folder(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, state(1), EXTRA)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    def broken_save_file(arrays, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state(2), EXTRA)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert latest_checkpoint(tmp_path).name == "round_001"


def test_a_failed_rewrite_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch) -> None:
    original = state(2)
    save_checkpoint(tmp_path, original, EXTRA)

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path, state(2, merged=True), EXTRA)
    monkeypatch.setattr(ckpt.os, "replace", os.replace)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round_002"]
    loaded, _ = load_checkpoint(checkpoint_dir(tmp_path, 2))
    assert_identical(original, loaded)
