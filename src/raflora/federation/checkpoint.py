"""Checkpoints of the server state: safetensors for arrays, JSON for the rest, no pickle.

Layout of ``<run>/checkpoints/round_XXX/``: ``state.safetensors`` (keys
``adapter/<module>/{B,A,U,S,Vt}`` (a `StackedUpdate`; format 1, written before version 2,
held ``{U,S,Vt}``, an `SVDUpdate`, which still loads), ``merged/<module>/{U,S,Vt}``,
``dense/<name>``) and
``state.json`` (round, client ranks, metric history, resolved config, the SHA-256 of the
arrays file and of its own content, and of each merged round's file). The factors round t
merged into the base (`GlobalState.merged_rounds`) are written once, to
``<run>/checkpoints/merged_rounds/round_XXX.safetensors`` (keys ``<module>/{B,A}``), and shared
by every later checkpoint, so the checkpoints of a run grow linearly with its rounds; format
2 and earlier had none, and load with the whole merged sum as the one merged round.
A checkpoint is written into a temporary folder and renamed into place, so a crash leaves
either the whole checkpoint or none (a failed write removes its temporary folder, a failed
rewrite keeps the old checkpoint); loading checks every hash and the keys and raises
`CheckpointError` rather than returning a half-loaded state.
The hashes have no key: they catch accidents (truncation, bit rot, a stray edit), not forgery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from raflora.math.round import GlobalState, StackedUpdate, SVDUpdate, Update

FORMAT_VERSION = 3
# 1: adapter updates stored as a thin SVD (U, S, Vt) only; 1, 2: no per-round merged factors
READABLE_FORMATS = (1, 2, 3)
ARRAYS = "state.safetensors"
META = "state.json"
ROUNDS = "merged_rounds"  # folder (beside the round_XXX checkpoints) of the merged rounds


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, damaged or edited, or of another format."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(state: GlobalState) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for kind, updates in (("adapter", state.adapter), ("merged", state.merged)):
        for name, update in updates.items():
            for part in _parts(type(update)):
                arrays[f"{kind}/{name}/{part}"] = np.ascontiguousarray(getattr(update, part))
    for name, value in state.dense.items():
        arrays[f"dense/{name}"] = np.ascontiguousarray(value)
    return arrays


def merged_round_path(run_dir: Path, server_round: int) -> Path:
    """The file holding the factors round ``server_round`` merged into the base."""
    return Path(run_dir) / "checkpoints" / ROUNDS / f"round_{server_round:03d}.safetensors"


_DIGESTS: dict[Path, tuple[int, int, str]] = {}  # path → (size, mtime_ns, SHA-256)


def _digest(path: Path) -> str:
    """SHA-256 of a file, remembered while its size and modification time stay the same."""
    info = path.stat()
    cached = _DIGESTS.get(path)
    if cached is not None and cached[:2] == (info.st_size, info.st_mtime_ns):
        return cached[2]
    digest = _sha256(path)
    _DIGESTS[path] = (info.st_size, info.st_mtime_ns, digest)
    return digest


def _save_merged_rounds(run_dir: Path, state: GlobalState) -> dict[str, str]:
    """Write the merged rounds' files that are missing, and always this round's own (a file
    of that name may be left by an interrupted earlier attempt or another run in the same
    folder); returns round → SHA-256 of its file."""
    digests = {}
    for t, factors in sorted(state.merged_rounds.items()):
        path = merged_round_path(run_dir, t)
        if t == state.round or not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
            arrays = {
                f"{name}/{part}": np.ascontiguousarray(x)
                for name, pair in factors.items()
                for part, x in zip("BA", pair, strict=True)
            }
            try:
                save_file(arrays, str(tmp))
                with tmp.open("rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        digests[str(t)] = _digest(path)
    return digests


def _load_merged_rounds(path: Path, meta: dict[str, Any]) -> dict[int, dict[str, tuple]]:
    """The merged rounds a checkpoint names, each file checked against its SHA-256."""
    rounds: dict[int, dict[str, tuple]] = {}
    for key, digest in sorted(meta["merged_rounds"].items(), key=lambda item: int(item[0])):
        t = int(key)
        file = merged_round_path(path.parent.parent, t)
        if not file.is_file():
            raise CheckpointError(f"{path}: merged round {t} is missing ({file})")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: SHA-256 does not match {path / META} (modified)")
        try:
            arrays = load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file}: unreadable ({error})") from None
        halves: dict[str, dict[str, np.ndarray]] = {}
        for name_part, value in arrays.items():
            name, _, part = name_part.rpartition("/")
            if part not in ("B", "A") or not name:
                raise CheckpointError(f"{file}: unexpected array {name_part!r}")
            halves.setdefault(name, {})[part] = value
        if any(set(h) != {"A", "B"} for h in halves.values()):
            raise CheckpointError(f"{file}: a module lacks one of its factors")
        rounds[t] = {name: (h["B"], h["A"]) for name, h in halves.items()}
    return rounds


def _parts(kind: type[Update]) -> tuple[str, ...]:
    """The arrays of an update class, in constructor order: B, A, U, S, Vt or U, S, Vt."""
    return tuple(field.name for field in dataclasses.fields(kind))


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata without its own digest (canonical JSON)."""
    body = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unflatten(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> GlobalState:
    groups: dict[str, dict[str, Update]] = {"adapter": {}, "merged": {}}
    for kind in groups:
        for name in meta[kind]:
            # a StackedUpdate (format ≥ 2) has B, A; format 1 held thin SVDs only
            cls = StackedUpdate if f"{kind}/{name}/B" in arrays else SVDUpdate
            try:
                parts = [arrays[f"{kind}/{name}/{p}"] for p in _parts(cls)]
            except KeyError as missing:
                raise CheckpointError(f"checkpoint lacks array {missing}") from None
            groups[kind][name] = cls(*parts)
    dense = {name: arrays[f"dense/{name}"] for name in meta["dense"]}
    expected = len(_flatten(GlobalState(0, groups["adapter"], groups["merged"], dense, {})))
    if expected != len(arrays):
        raise CheckpointError(
            f"checkpoint has {len(arrays)} arrays, its state.json names {expected}"
        )
    ranks = {int(pid): int(rank) for pid, rank in meta["ranks"].items()}
    return GlobalState(meta["round"], groups["adapter"], groups["merged"], dense, ranks)


def checkpoint_dir(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{round_number:03d}"


def save_checkpoint(run_dir: Path, state: GlobalState, extra: dict[str, Any]) -> Path:
    """Write round `state.round` atomically; `extra` (history, config…) goes into the JSON."""
    final = checkpoint_dir(run_dir, state.round)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    for stale in final.parent.glob(".tmp-round_*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    merged_rounds = _save_merged_rounds(run_dir, state)
    tmp.mkdir()
    try:
        save_file(_flatten(state), str(tmp / ARRAYS))
        meta = {
            "format": FORMAT_VERSION,
            "round": state.round,
            "adapter": sorted(state.adapter),
            "merged": sorted(state.merged),
            "dense": sorted(state.dense),
            "ranks": {str(pid): rank for pid, rank in sorted(state.ranks.items())},
            "sha256": _sha256(tmp / ARRAYS),
            "merged_rounds": merged_rounds,
            **extra,
        }
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for path in (tmp / ARRAYS, tmp / META):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # keep the old round until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old.exists() and not final.exists():
                os.rename(old, final)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[GlobalState, dict[str, Any]]:
    """Load and verify one checkpoint folder; returns the state and its JSON metadata."""
    path = Path(path)
    meta_path, arrays_path = path / META, path / ARRAYS
    if not meta_path.is_file() or not arrays_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (needs {META} and {ARRAYS})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a raflora checkpoint (expected a JSON object)")
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{meta_path}: format {meta.get('format')!r}, expected one of {READABLE_FORMATS}"
        )
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{meta_path}: SHA-256 does not match its content (modified)")
    if _sha256(arrays_path) != meta.get("sha256"):
        raise CheckpointError(
            f"{arrays_path}: SHA-256 does not match {META} (truncated or modified)"
        )
    try:
        arrays = load_file(str(arrays_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{arrays_path}: unreadable ({error})") from None
    try:
        state = _unflatten(arrays, meta)
        if meta["format"] >= 3:
            rounds = _load_merged_rounds(path, meta)
        else:  # no rounds kept: the whole merged sum stands for every round so far
            whole = {name: update.factors() for name, update in state.merged.items()}
            rounds = {state.round: whole} if whole else {}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{meta_path}: inconsistent checkpoint ({error!r})") from None
    return dataclasses.replace(state, merged_rounds=rounds), meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    rounds = sorted(p for p in root.glob("round_*") if (p / META).is_file())
    return rounds[-1] if rounds else None
