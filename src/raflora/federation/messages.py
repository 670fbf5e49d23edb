"""The wire format between server and clients: arrays and scalars only, no pickle.

Arrays travel in one `ArrayRecord` per message, keyed by

- ``"<module>.lora_B"`` / ``"<module>.lora_A"``: LoRA factors with the scaling folded in,
  ``B (m, r)`` and ``A (r, n)`` (server → client: the client's start; client → server: its
  trained factors);
- ``"<module>.merged_B"`` / ``"<module>.merged_A"``: the update merged into the base weights
  (merge mode, server → client);
- ``"dense.<name>"``: non-LoRA trainables such as a classifier head.

Scalars travel in a `ConfigRecord` (server → client) and a `MetricRecord` (client → server),
with the kebab-case keys below.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Factors = tuple[np.ndarray, np.ndarray]

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server → client)
SERVER_ROUND = "server-round"
RANK = "rank"
RUN_CONFIG = "raflora-config"  # the resolved Config as JSON: clients need nothing else
SEED = "seed"

# MetricRecord keys (client → server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
SECONDS = "seconds"
TRAIN_SECONDS = "train-seconds"

LORA_B, LORA_A = ".lora_B", ".lora_A"
MERGED_B, MERGED_A = ".merged_B", ".merged_A"
DENSE = "dense."


def pack(
    lora: dict[str, Factors] | None = None,
    merged: dict[str, Factors] | None = None,
    dense: dict[str, np.ndarray] | None = None,
) -> ArrayRecord:
    """Put factors and dense tensors into one ArrayRecord (float32, C-contiguous)."""
    arrays: dict[str, Array] = {}

    def put(key: str, value: np.ndarray) -> None:
        arrays[key] = Array(np.ascontiguousarray(value, dtype=np.float32))

    for suffix_b, suffix_a, group in ((LORA_B, LORA_A, lora), (MERGED_B, MERGED_A, merged)):
        for name, (B, A) in (group or {}).items():
            put(name + suffix_b, B)
            put(name + suffix_a, A)
    for name, value in (dense or {}).items():
        put(DENSE + name, value)
    return ArrayRecord(arrays)


class MessageFormatError(ValueError):
    """An ArrayRecord whose keys do not follow the schema above."""


def unpack(
    record: ArrayRecord,
) -> tuple[dict[str, Factors], dict[str, Factors], dict[str, np.ndarray]]:
    """Inverse of `pack`: ``(lora, merged, dense)``; unpaired or unknown keys are errors."""
    halves: dict[str, dict[str, dict[str, np.ndarray]]] = {"lora": {}, "merged": {}}
    dense: dict[str, np.ndarray] = {}
    for key in record:
        try:
            value = record[key].numpy()
        except (ValueError, TypeError, EOFError, OSError) as error:  # malformed bytes from a peer
            reason = " ".join(str(error).split())[:160]
            raise MessageFormatError(
                f"array {key!r} is not a readable numpy array ({reason})"
            ) from None
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
    out = []
    for group in ("lora", "merged"):
        pairs = {}
        for name, parts in halves[group].items():
            if set(parts) != {"A", "B"}:
                raise MessageFormatError(
                    f"module {name!r} has only {sorted(parts)} of its {group} factors"
                )
            pairs[name] = (parts["B"], parts["A"])
        out.append(pairs)
    return out[0], out[1], dense
