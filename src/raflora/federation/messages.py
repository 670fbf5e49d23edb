"""The wire format between server and clients: arrays and scalars only, no pickle.

Arrays travel in one `ArrayRecord` per message, keyed by

- ``"<module>.lora_B"`` / ``"<module>.lora_A"``: LoRA factors with the scaling folded in,
  ``B (m, r)`` and ``A (r, n)`` (server → client: the client's start; client → server: its
  trained factors);
- ``"<module>.merged_B"`` / ``"<module>.merged_A"``: the whole update merged into the base
  weights, ``D`` (server → client, ``federation.merged_wire = "total"``);
- ``"<module>.merged_B@<t>"`` / ``"<module>.merged_A@<t>"``: the factors round t merged into
  the base (server → client, ``merged_wire = "rounds"``: the rounds the client has not
  confirmed; the config's ``merged-rounds`` lists every round its base must contain);
- ``"<module>.merged"`` / ``"<module>.merged@<t>"``: the same updates as one dense ``(m, n)``
  array each, when the method sends them dense (FedEx-LoRA's ``residual_wire = "dense"``); in
  a `Payload` such an update is the pair ``(D, None)``;
- ``"dense.<name>"``: non-LoRA trainables such as a classifier head.

A frozen-A method (FFA-LoRA, ``Method.frozen_a``) sends ``"<module>.lora_B"`` alone, both ways:
each side rebuilds the shared A from the run seed (``pack(..., frozen_a=True)``, and
``unpack(record, frozen_a=rows)`` with ``rows(module, r) -> A (r, n)``).

Every array crosses the wire in ``federation.wire_dtype`` (`to_wire` / `from_wire`): float32
as is; float16 as numpy float16; bfloat16, which numpy lacks, as the upper 16 bits of each
float32 (round to nearest even) in a uint16 array. The receiver decodes to float32 before any
math; a finite value the wire dtype cannot hold (float16 beyond ±65504) is an error on the
sender's side (`WireRangeError`), never a silent inf.

Scalars travel in a `ConfigRecord` (server → client) and a `MetricRecord` (client → server),
with the kebab-case keys below.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord

Factors = tuple[np.ndarray, np.ndarray]
# a merged update: factors (B (m, r), A (r, n)), or (D (m, n), None) sent dense
Merged = tuple[np.ndarray, np.ndarray | None]
SharedRows = Callable[[str, int], np.ndarray]  # (module, r) → the shared frozen A (r, n)

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server → client)
SERVER_ROUND = "server-round"
RANK = "rank"
RUN_CONFIG = "raflora-config"  # the resolved Config as JSON: clients need nothing else
SEED = "seed"
MERGED_ROUNDS = "merged-rounds"  # list[int]: every round whose factors the base must contain

# MetricRecord keys (client → server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
SECONDS = "seconds"
TRAIN_SECONDS = "train-seconds"
MERGED_THROUGH = "merged-through"  # the last round of merged-rounds the client's base contains

# how a client that lacks an earlier merged round refuses (the server then resends them all)
MISSING_ROUNDS = "missing merged rounds"

LORA_B, LORA_A = ".lora_B", ".lora_A"
MERGED_B, MERGED_A = ".merged_B", ".merged_A"
MERGED_D = ".merged"  # a dense merged update (m, n)
DENSE = "dense."
_ROUND_KEY = re.compile(r"^(?P<name>.+)\.merged(?:_(?P<part>[AB]))?@(?P<round>[1-9][0-9]*)$")

WIRE_DTYPES = ("float32", "float16", "bfloat16")
# the numpy dtype each wire dtype travels as
_CARRIER = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class WireRangeError(ValueError):
    """A finite value the wire dtype cannot carry (it would arrive as ±inf)."""


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 as uint16: the upper half of each float32, rounded to nearest even
    (NaN stays a quiet NaN)."""
    bits = x.view(np.uint32).astype(np.uint64)  # no wrap-around when the rounding carries
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def to_wire(value: np.ndarray, wire_dtype: str, what: str) -> np.ndarray:
    """``value`` as a C-contiguous array of ``wire_dtype``'s carrier (see the module
    docstring); raises `WireRangeError` naming ``what`` when a finite value would overflow."""
    x = np.ascontiguousarray(value, dtype=np.float32)
    if wire_dtype == "float32":
        return x
    if wire_dtype == "float16":
        with np.errstate(over="ignore"):  # reported below, naming the array
            out = x.astype(np.float16)
    elif wire_dtype == "bfloat16":
        out = _bfloat16_bits(x)
    else:
        raise ValueError(f"federation.wire_dtype {wire_dtype!r}: expected one of {WIRE_DTYPES}")
    overflow = np.isfinite(x) & ~np.isfinite(from_wire(out, wire_dtype, what))
    if overflow.any():
        largest = float(np.max(np.abs(x[overflow])))
        raise WireRangeError(
            f"{what}: |value| {largest:.4g} overflows federation.wire_dtype = {wire_dtype!r} "
            f"(it would arrive as inf); set federation.wire_dtype to 'bfloat16' or 'float32'"
        )
    return np.ascontiguousarray(out)


def from_wire(value: np.ndarray, wire_dtype: str, what: str) -> np.ndarray:
    """A received array back to float32; a float32 wire passes arrays through unchanged (the
    validation checks their dtype), the others must arrive in their carrier dtype."""
    if wire_dtype == "float32":
        return value
    if value.dtype != _CARRIER[wire_dtype]:
        raise MessageFormatError(
            f"{what}: dtype {value.dtype}, but federation.wire_dtype = {wire_dtype!r} sends "
            f"{np.dtype(_CARRIER[wire_dtype]).name}"
        )
    if wire_dtype == "float16":
        return value.astype(np.float32)
    return (value.astype(np.uint32) << 16).view(np.float32)


def pack(
    lora: dict[str, Factors] | None = None,
    merged: dict[str, Merged] | None = None,
    dense: dict[str, np.ndarray] | None = None,
    rounds: dict[int, dict[str, Merged]] | None = None,
    *,
    frozen_a: bool = False,
    wire_dtype: str = "float32",
) -> ArrayRecord:
    """Put factors and dense tensors into one ArrayRecord (``wire_dtype``, C-contiguous; see
    `to_wire`); ``rounds`` maps a round t ≥ 1 to the factors it merged, per module; a merged
    pair ``(D, None)`` goes as the one dense array D (m, n); with ``frozen_a`` only the B of
    each ``lora`` pair (the receiver knows A)."""
    arrays: dict[str, Array] = {}

    def put(key: str, value: np.ndarray) -> None:
        arrays[key] = Array(to_wire(value, wire_dtype, f"array {key!r}"))

    groups = ((LORA_B, LORA_A, lora, frozen_a), (MERGED_B, MERGED_A, merged, False))
    for suffix_b, suffix_a, group, b_only in groups:
        for name, (B, A) in (group or {}).items():
            if A is None and group is merged:  # a dense merged update
                put(name + MERGED_D, B)
                continue
            put(name + suffix_b, B)
            if not b_only:
                put(name + suffix_a, A)
    for t, factors in sorted((rounds or {}).items()):
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"merged round {t!r} must be an integer ≥ 1")
        for name, (B, A) in factors.items():
            if A is None:
                put(f"{name}{MERGED_D}@{t}", B)
                continue
            put(f"{name}{MERGED_B}@{t}", B)
            put(f"{name}{MERGED_A}@{t}", A)
    for name, value in (dense or {}).items():
        put(DENSE + name, value)
    return ArrayRecord(arrays)


class MessageFormatError(ValueError):
    """An ArrayRecord whose keys do not follow the schema above."""


@dataclass(frozen=True)
class Payload:
    """Everything one ArrayRecord holds (see the module docstring)."""

    lora: dict[str, Factors] = field(default_factory=dict)
    merged: dict[str, Merged] = field(default_factory=dict)  # (D, None): sent dense
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    rounds: dict[int, dict[str, Merged]] = field(default_factory=dict)


def _with_shared_a(name: str, parts: dict[str, np.ndarray], rows: SharedRows) -> Factors:
    """A frozen-A method's B-only pair completed with the shared A of B's rank."""
    if set(parts) != {"B"}:
        raise MessageFormatError(f"module {name!r}: a frozen-A method sends lora_B alone")
    B = parts["B"]
    if B.ndim != 2:
        raise MessageFormatError(f"module {name!r}: lora_B has shape {B.shape}, expected (m, r)")
    try:
        return B, np.asarray(rows(name, int(B.shape[1])), np.float32)
    except (KeyError, ValueError) as error:
        raise MessageFormatError(f"module {name!r}: no shared A for it ({error})") from None


def unpack(
    record: ArrayRecord, frozen_a: SharedRows | None = None, wire_dtype: str = "float32"
) -> tuple[dict[str, Factors], dict[str, Merged], dict[str, np.ndarray]]:
    """Inverse of `pack` without rounds: ``(lora, merged, dense)``; unpaired or unknown keys,
    and per-round merged factors, are errors (`unpack_payload` reads those). With ``frozen_a``
    the lora group must carry B alone, completed with ``frozen_a(module, r)``."""
    payload = unpack_payload(record, frozen_a, wire_dtype)
    if payload.rounds:
        raise MessageFormatError(
            f"unexpected per-round merged factors (rounds {sorted(payload.rounds)})"
        )
    return payload.lora, payload.merged, payload.dense


def _pairs(halves: dict[str, dict[str, np.ndarray]], what: str) -> dict[str, Merged]:
    """``{name: (B, A)}`` from ``{name: {"B": …, "A": …}}``, ``(D, None)`` from ``{"D": …}``
    (a dense merged update); a missing half, or factors and a dense array both, is an error."""
    pairs: dict[str, Merged] = {}
    for name, parts in halves.items():
        if set(parts) == {"D"} and parts["D"].ndim == 2:
            pairs[name] = (parts["D"], None)
            continue
        if set(parts) != {"A", "B"}:
            raise MessageFormatError(f"module {name!r} has only {sorted(parts)} of its {what}")
        pairs[name] = (parts["B"], parts["A"])
    return pairs


def unpack_payload(
    record: ArrayRecord, frozen_a: SharedRows | None = None, wire_dtype: str = "float32"
) -> Payload:
    """Inverse of `pack`; unpaired or unknown keys are errors, and so are arrays not in
    ``wire_dtype``'s carrier (decoded to float32 here, `from_wire`). With ``frozen_a`` the lora
    group must carry B alone, completed here with ``frozen_a(module, r)`` (the shared A of B's
    rank r)."""
    halves: dict[str, dict[str, dict[str, np.ndarray]]] = {"lora": {}, "merged": {}}
    by_round: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    dense: dict[str, np.ndarray] = {}
    for key in record:
        try:
            value = record[key].numpy()
        except (ValueError, TypeError, EOFError, OSError) as error:  # malformed bytes from a peer
            reason = " ".join(str(error).split())[:160]
            raise MessageFormatError(
                f"array {key!r} is not a readable numpy array ({reason})"
            ) from None
        value = from_wire(value, wire_dtype, f"array {key!r}")
        if match := _ROUND_KEY.match(key):
            halves_of = by_round.setdefault(int(match["round"]), {})
            halves_of.setdefault(match["name"], {})[match["part"] or "D"] = value
            continue
        if key.endswith(MERGED_D):  # a dense merged update (dense trainables never end so)
            halves["merged"].setdefault(key[: -len(MERGED_D)], {})["D"] = value
            continue
        # factor suffixes first: a module may itself be called "dense" (key "dense.lora_A"),
        # while dense trainables never end in a factor suffix (they exclude LoRA parameters)
        for group, (suffix_b, suffix_a) in (
            ("lora", (LORA_B, LORA_A)),
            ("merged", (MERGED_B, MERGED_A)),
        ):
            if key.endswith(suffix_b) or key.endswith(suffix_a):
                name, part = key[: -len(suffix_b)], "B" if key.endswith(suffix_b) else "A"
                halves[group].setdefault(name, {})[part] = value
                break
        else:
            if not key.startswith(DENSE):
                raise MessageFormatError(f"unexpected array key {key!r}")
            dense[key[len(DENSE) :]] = value
    if frozen_a is not None:
        lora = {
            name: _with_shared_a(name, parts, frozen_a) for name, parts in halves["lora"].items()
        }
    else:
        lora = _pairs(halves["lora"], "lora factors")
    return Payload(
        lora=lora,
        merged=_pairs(halves["merged"], "merged factors"),
        dense=dense,
        rounds={t: _pairs(by_round[t], f"round-{t} merged factors") for t in sorted(by_round)},
    )
