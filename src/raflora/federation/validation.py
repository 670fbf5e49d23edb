"""Checks on a client's reply before it reaches aggregation.

A reply must carry exactly the expected LoRA modules, factors ``B (m, r)``, ``A (r, n)`` of
float32 with the rank the client was allocated (HetLoRA clients may return a lower rank after
self-pruning), finite values, the expected dense tensors, finite numbers (not lists) as
metrics (accuracies in [0, 1], losses and times ≥ 0), and a positive integer ``num-examples``
no larger than the size the client reported in the query round (`StartPoint.num_examples`),
than ``federation.max_num_examples`` and than 2⁵³ (beyond, floats no longer count exactly).

Every reply's products ``B A`` and dense tensors must have a Frobenius norm of at most
`NORM_LIMIT` (10¹⁵): the server keeps the global update in float32 and squares its singular
values, so a larger (or non-finite in float64) product would overflow there and stop the run.

Optional bounds limit what a client *contributes* in a round, measured from what the server
sent it (`StartPoint`, see `raflora.math.steps`): per LoRA module ``‖B_k A_k − G‖_F`` with
``G = B0 A0`` the factors it started from (``G = 0`` for a fresh LoRA: merge mode, round 1),
per dense tensor (classifier head) ``‖x_k − x_sent‖_F`` (``max_norm``), and over the whole
reply ``sqrt(Σ_modules ‖·‖² + Σ_dense ‖·‖²)`` (``max_total_norm``). Above a bound a reply is
rejected (``norm_policy = "reject"``) or its step is shrunk to the bound (``"clip"``): a LoRA
module moves back along ``B0 + c ΔB``, ``A0 + c ΔA`` to the c where its contribution equals the
bound (exact rank-r factors; to first order in the step this is ``G + c Δ``), a dense tensor to
``x_sent + c Δ``; the whole-reply bound uses one c for every tensor. A clipped reply whose step
rounds away in float32 is rejected, never aggregated as a zero update with its full weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from raflora.math import factored_norm, get_method
from raflora.math.round import ClientUpdate, Factors
from raflora.math.steps import StepPath, shrink_factor, step_path

NORM_LIMIT = 1e15  # largest ‖B A‖_F or ‖dense‖_F of any reply; float32 overflows at ~3.4e38
MAX_COUNT = 2**53  # largest num-examples: every integer up to it is exact as a float64

if TYPE_CHECKING:
    from raflora.config import Config


class RejectedUpdate(ValueError):
    """A reply that must not be aggregated; the message says why."""


@dataclass(frozen=True)
class Expectation:
    """What a valid reply looks like for this run."""

    modules: dict[str, tuple[int, int]]  # module → (m, n)
    dense: dict[str, tuple[int, ...]]  # dense trainable → shape
    max_norm: float | None = None  # bound on each module's / dense tensor's contribution
    norm_policy: str = "reject"  # "reject" | "clip"
    allow_lower_rank: bool = False  # HetLoRA self-pruning
    max_total_norm: float | None = None  # bound on the whole reply's contribution
    max_num_examples: int | None = None  # cap on num-examples (federation.max_num_examples)


@dataclass(frozen=True)
class StartPoint:
    """What the server sent one client this round, and what the client said in the query."""

    lora: dict[str, Factors] = field(default_factory=dict)  # B0, A0 per module; absent: G = 0
    dense: dict[str, np.ndarray] = field(default_factory=dict)  # dense trainables sent
    num_examples: int | None = None  # the client's data size from the query round


@dataclass(frozen=True)
class Review:
    """What the checks found in a valid reply: its contribution and what was clipped."""

    norm: float | None = None  # the reply's whole contribution before clipping (bounds set)
    largest: float | None = None  # its largest per-tensor contribution before clipping
    clipped_modules: int = 0  # LoRA modules and dense tensors shrunk to a bound
    clipped: str = ""  # why, in words ("" when nothing was clipped)


def expectation_for(
    config: Config, modules: dict[str, tuple[int, int]], dense: dict[str, tuple[int, ...]]
) -> Expectation:
    """What a valid reply looks like in a run of ``config``: these module shapes ``(m, n)`` and
    dense tensors, the run's norm bounds and num-examples cap, and a lower rank allowed where
    the method's ranks may shrink (`Method.ranks_may_shrink`: HetLoRA's self-pruning)."""
    fed = config.federation
    return Expectation(
        modules=dict(modules),
        dense=dict(dense),
        max_norm=fed.max_update_norm,
        norm_policy=fed.norm_policy,
        allow_lower_rank=get_method(fed.method).ranks_may_shrink,
        max_total_norm=fed.max_total_update_norm,
        max_num_examples=fed.max_num_examples,
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
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    if np.linalg.norm(B64) * np.linalg.norm(A64) <= NORM_LIMIT:  # ‖BA‖ ≤ ‖B‖ ‖A‖: cheap
        return r
    norm = factored_norm(B64, A64)
    if not norm <= NORM_LIMIT:  # NaN fails too
        raise RejectedUpdate(f"{name}: ‖B A‖_F = {norm:.4g} is beyond {NORM_LIMIT:g}")
    return r


def check_metrics(metrics: dict[str, object]) -> None:
    """Every metric a finite number; accuracies in [0, 1]; losses and times ≥ 0."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RejectedUpdate(f"metric {key!r} is {value!r:.60}, expected a number")
        if not math.isfinite(value):
            raise RejectedUpdate(f"metric {key!r} is {value}, expected a finite number")
        if "accuracy" in key and not 0 <= value <= 1:
            raise RejectedUpdate(f"metric {key!r} is {value:.4g}, expected an accuracy in [0, 1]")
        if ("loss" in key or "seconds" in key) and value < 0:
            raise RejectedUpdate(f"metric {key!r} is {value:.4g}, expected ≥ 0")


def check_num_examples(num_examples: object, reported: int | None, cap: int | None) -> int:
    """A positive integer, at most what the client reported in the query round and the cap."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        raise RejectedUpdate(f"num-examples is {num_examples!r}, expected a positive integer")
    if not math.isfinite(num_examples) or num_examples <= 0 or int(num_examples) != num_examples:
        raise RejectedUpdate(f"num-examples is {num_examples}, expected a positive integer")
    count = int(num_examples)
    if count > MAX_COUNT:
        raise RejectedUpdate(f"num-examples is {num_examples:.4g}, beyond 2^53")
    if reported is not None and count > reported:
        raise RejectedUpdate(
            f"num-examples is {count}, more than the {reported} the client reported in the "
            "query round"
        )
    if cap is not None and count > cap:
        raise RejectedUpdate(f"num-examples is {count}, above federation.max_num_examples {cap}")
    return count


def _dense_step(name: str, value: np.ndarray, start: StartPoint) -> np.ndarray | None:
    """``x − x_sent`` in float64, or None when the start of this tensor is not known."""
    sent = start.dense.get(name)
    if sent is None or np.shape(sent) != value.shape:
        return None
    return value.astype(np.float64) - np.asarray(sent, np.float64)


def _squared(paths: dict[str, StepPath], steps: dict[str, np.ndarray], c: float = 1.0) -> float:
    """``Σ_modules ‖B(c) A(c) − G‖² + Σ_dense ‖c Δ‖²``."""
    lora = sum(path.squared_norm(c) for path in paths.values())
    return lora + c * c * sum(float(np.sum(step * step)) for step in steps.values())


def _shrink(name: str, paths: list[StepPath], linear_sq: float, bound: float) -> float:
    try:
        return shrink_factor(paths, linear_sq, bound)
    except ValueError as error:  # a lower-rank reply dropped too much of its start
        raise RejectedUpdate(f"{name}: cannot clip: {error}") from None


def _clip_each(
    paths: dict[str, StepPath], steps: dict[str, np.ndarray], start: StartPoint, bound: float
) -> set[str]:
    """Shrink (in place) every module's and dense tensor's step above `bound` to it; returns
    the modules changed."""
    changed = set()
    for name, path in list(paths.items()):
        if path.norm() > bound:
            c = _shrink(name, [path], 0.0, bound)
            paths[name] = step_path(start.lora.get(name), path.at(c))
            changed.add(name)
    for name, step in steps.items():
        norm = float(np.linalg.norm(step))
        if norm > bound:
            steps[name] = step * (bound / norm)
    return changed


def _norms(paths: dict[str, StepPath], steps: dict[str, np.ndarray]) -> dict[str, float]:
    """Each tensor's contribution: modules by name, dense tensors as ``dense.<name>``."""
    norms = {name: path.norm() for name, path in paths.items()}
    return norms | {f"dense.{name}": float(np.linalg.norm(step)) for name, step in steps.items()}


def _over(norms: dict[str, float], bound: float) -> str:
    """The tensors whose contribution exceeds `bound`, largest first ("" if none)."""
    over = sorted(((x, name) for name, x in norms.items() if x > bound), reverse=True)
    if not over:
        return ""
    more = f" (and {len(over) - 1} more tensors)" if len(over) > 1 else ""
    return f"{over[0][1]}: contribution ‖ΔW‖_F = {over[0][0]:.4g}{more}"


def _bounded(
    factors: dict[str, Factors],
    dense: dict[str, np.ndarray],
    start: StartPoint,
    expect: Expectation,
) -> tuple[dict[str, Factors], dict[str, np.ndarray], Review]:
    """Apply ``max_norm`` per tensor, then ``max_total_norm`` to the whole reply (module doc)."""
    paths = {name: step_path(start.lora.get(name), pair) for name, pair in factors.items()}
    steps = {name: _dense_step(name, value, start) for name, value in dense.items()}
    steps = {name: step for name, step in steps.items() if step is not None}
    norms = _norms(paths, steps)
    total, largest = math.sqrt(_squared(paths, steps)), max(norms.values())
    clip, notes, changed = expect.norm_policy == "clip", [], set()
    bound, limit, before = expect.max_norm, expect.max_total_norm, dict(steps)
    if bound is not None and (over := _over(norms, bound)):
        if not clip:
            raise RejectedUpdate(f"{over} exceeds max_update_norm {bound}")
        changed = _clip_each(paths, steps, start, bound)
        notes.append(f"{over} clipped to max_update_norm {bound}")
    now = math.sqrt(_squared(paths, steps))
    if limit is not None and now > limit:
        message = f"contribution ‖ΔW‖_F = {now:.4g} over all tensors"
        if not clip:
            raise RejectedUpdate(f"{message} exceeds max_total_update_norm {limit}")
        c = _shrink("the reply", list(paths.values()), _squared({}, steps), limit)
        paths = {name: step_path(start.lora.get(name), p.at(c)) for name, p in paths.items()}
        steps = {name: c * step for name, step in steps.items()}
        changed = set(paths)
        notes.append(f"{message} clipped to max_total_update_norm {limit}")
    if not notes:
        return factors, dense, Review(total, largest)
    new_factors = {n: paths[n].at(1.0) if n in changed else factors[n] for n in factors}
    new_dense = dict(dense)
    for name, step in steps.items():
        if step is not before[name]:
            new_dense[name] = (np.asarray(start.dense[name], np.float64) + step).astype(np.float32)
    clipped = len(changed) + sum(steps[n] is not before[n] for n in steps)
    # a clipped step must survive float32 rounding: a reply that came back as its start would
    # be aggregated as 'no change' with the client's full weight
    kept = {name: step_path(start.lora.get(name), pair) for name, pair in new_factors.items()}
    moved = {name: _dense_step(name, new_dense[name], start) for name in steps}
    if total > 0 and not _squared(kept, moved) > 0:
        raise RejectedUpdate(
            f"contribution ‖ΔW‖_F = {total:.4g}: clipped to the bound it rounds to nothing in "
            "float32"
        )
    return new_factors, new_dense, Review(total, largest, clipped, "; ".join(notes))


def check_update(
    partition_id: int,
    lora: dict[str, Factors],
    dense: dict[str, np.ndarray],
    num_examples: object,
    allocated_rank: int,
    expect: Expectation,
    metrics: dict[str, float] | None = None,
    start: StartPoint | None = None,
) -> tuple[ClientUpdate, Review]:
    """Validate one reply against what the client was sent (`start`; None: a fresh LoRA, no
    dense start, no query size); returns the update to aggregate and what the checks found."""
    start = start or StartPoint()
    if not lora:
        raise RejectedUpdate("empty reply: no LoRA factors")
    missing = sorted(set(expect.modules) - set(lora))
    extra = sorted(set(lora) - set(expect.modules))
    if missing or extra:
        raise RejectedUpdate(f"modules missing {missing[:3]}, unexpected {extra[:3]}")
    check_metrics(metrics or {})  # the server computes with these and writes them to JSON
    count = check_num_examples(num_examples, start.num_examples, expect.max_num_examples)
    ranks = {
        _check_factors(name, lora[name], m, n, allocated_rank, expect.allow_lower_rank)
        for name, (m, n) in expect.modules.items()
    }
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
        norm = float(np.linalg.norm(value.astype(np.float64)))
        if not norm <= NORM_LIMIT:
            raise RejectedUpdate(f"dense.{name}: ‖x‖_F = {norm:.4g} is beyond {NORM_LIMIT:g}")
    factors = {name: lora[name] for name in expect.modules}
    review = Review()
    if expect.max_norm is not None or expect.max_total_norm is not None:
        factors, dense, review = _bounded(factors, dense, start, expect)
    update = ClientUpdate(
        partition_id=partition_id,
        rank=ranks.pop(),
        num_examples=count,
        factors=factors,
        dense=dense,
        metrics=dict(metrics or {}),
    )
    return update, review
