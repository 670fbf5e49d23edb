"""Checks on a client's reply before it reaches aggregation.

A reply must carry exactly the expected LoRA modules, factors ``B (m, r)``, ``A (r, n)`` of
float32 with the rank the client was allocated (HetLoRA clients may return a lower rank after
self-pruning), finite values, the expected dense tensors, numbers (not lists) as metrics, and
a positive integer ``num-examples``. An optional bound on ``‖B A‖_F`` per module either
rejects the reply or clips the update to the bound (``B ← B · bound / ‖B A‖_F``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raflora.math import factored_norm, get_method
from raflora.math.round import ClientUpdate, Factors

if TYPE_CHECKING:
    from raflora.config import Config


class RejectedUpdate(ValueError):
    """A reply that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class Expectation:
    """What a valid reply looks like for this run."""

    modules: dict[str, tuple[int, int]]  # module → (m, n)
    dense: dict[str, tuple[int, ...]]  # dense trainable → shape
    max_norm: float | None = None  # bound on ‖B A‖_F per module
    norm_policy: str = "reject"  # "reject" | "clip"
    allow_lower_rank: bool = False  # HetLoRA self-pruning


def expectation_for(
    config: Config, modules: dict[str, tuple[int, int]], dense: dict[str, tuple[int, ...]]
) -> Expectation:
    """What a valid reply looks like in a run of ``config``: these module shapes ``(m, n)`` and
    dense tensors, the run's norm bound, and a lower rank allowed where the method's ranks may
    shrink (`Method.ranks_may_shrink`: HetLoRA's self-pruning)."""
    fed = config.federation
    return Expectation(
        modules=dict(modules),
        dense=dict(dense),
        max_norm=fed.max_update_norm,
        norm_policy=fed.norm_policy,
        allow_lower_rank=get_method(fed.method).ranks_may_shrink,
    )


def _check_array(name: str, value: np.ndarray) -> None:
    if value.dtype != np.float32:
        raise RejectedUpdate(f"{name}: dtype {value.dtype}, expected float32")
    if not np.all(np.isfinite(value)):
        raise RejectedUpdate(f"{name}: contains NaN or Inf")


def _check_factors(name: str, pair: Factors, m: int, n: int, rank: int, lower_ok: bool) -> int:
    B, A = pair
    _check_array(f"{name}.lora_B", B)
    _check_array(f"{name}.lora_A", A)
    if B.ndim != 2 or A.ndim != 2 or B.shape[0] != m or A.shape[1] != n:
        raise RejectedUpdate(
            f"{name}: shapes B {B.shape}, A {A.shape}; expected B ({m}, r), A (r, {n})"
        )
    r = A.shape[0]
    if B.shape[1] != r:
        raise RejectedUpdate(f"{name}: B has rank {B.shape[1]} but A has rank {r}")
    if r != rank and not (lower_ok and 1 <= r < rank):
        raise RejectedUpdate(f"{name}: rank {r}, but the client was allocated rank {rank}")
    return r


def _bounded(name: str, pair: Factors, expect: Expectation) -> tuple[Factors, bool]:
    if expect.max_norm is None:
        return pair, False
    norm = factored_norm(pair[0].astype(np.float64), pair[1].astype(np.float64))
    if norm <= expect.max_norm:
        return pair, False
    if expect.norm_policy == "reject":
        raise RejectedUpdate(
            f"{name}: ‖ΔW‖_F = {norm:.4g} exceeds max_update_norm {expect.max_norm}"
        )
    scale = np.float32(expect.max_norm / norm)
    return (pair[0] * scale, pair[1]), True


def check_update(
    partition_id: int,
    lora: dict[str, Factors],
    dense: dict[str, np.ndarray],
    num_examples: object,
    allocated_rank: int,
    expect: Expectation,
    metrics: dict[str, float] | None = None,
) -> tuple[ClientUpdate, int]:
    """Validate one reply; returns the update and how many modules were clipped."""
    if not lora:
        raise RejectedUpdate("empty reply: no LoRA factors")
    missing = sorted(set(expect.modules) - set(lora))
    extra = sorted(set(lora) - set(expect.modules))
    if missing or extra:
        raise RejectedUpdate(f"modules missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in (metrics or {}).items():  # the server computes with these
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RejectedUpdate(f"metric {key!r} is {value!r:.60}, expected a number")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        raise RejectedUpdate(f"num-examples is {num_examples!r}, expected a positive integer")
    if not math.isfinite(num_examples) or num_examples <= 0 or int(num_examples) != num_examples:
        raise RejectedUpdate(f"num-examples is {num_examples}, expected a positive integer")
    ranks = set()
    factors, clipped = {}, 0
    for name, (m, n) in expect.modules.items():
        ranks.add(_check_factors(name, lora[name], m, n, allocated_rank, expect.allow_lower_rank))
        factors[name], was_clipped = _bounded(name, lora[name], expect)
        clipped += was_clipped
    if len(ranks) != 1:
        raise RejectedUpdate(f"modules have different ranks {sorted(ranks)}")
    if set(dense) != set(expect.dense):
        raise RejectedUpdate(f"dense tensors {sorted(dense)}, expected {sorted(expect.dense)}")
    for name, value in dense.items():
        _check_array(f"dense.{name}", value)
        if value.shape != expect.dense[name]:
            raise RejectedUpdate(
                f"dense.{name}: shape {value.shape}, expected {expect.dense[name]}"
            )
    update = ClientUpdate(
        partition_id=partition_id,
        rank=ranks.pop(),
        num_examples=int(num_examples),
        factors=factors,
        dense=dense,
        metrics=dict(metrics or {}),
    )
    return update, clipped
