"""The method registry: one :class:`Method` per aggregation method, declared by its module.

A method declares everything the rest of raflora needs to know about it, so that nothing else
asks for it by name (PEFT's ``register_peft_method`` pattern):

- ``aggregate(clients, options) -> (B, A)``: the round's global factors, B (m, R), A (R, n);
- ``allocation``: what a client of rank r starts from, given the update the server keeps:
  ``"svd"`` the best rank-r truncation of B A (Eckart–Young, FlexLoRA's allocation) or
  ``"slice"`` the leading columns ``B[:, :r]``, ``A[:r, :]`` of the averaged (padded) factors
  (FedIT, zero-padding, HetLoRA, RB-LoRA);
- ``apply``: ``"adapter"`` (the aggregate is the new global LoRA) or ``"merge"`` (folded into
  the base weights each round, clients restart from a fresh LoRA: FLoRA);
- ``residual(clients, options, aggregate) -> (B, A)``: what the kept aggregate misses of the
  clients' mean update, as factors folded into the base weights every round while the
  aggregate stays the adapter (FedEx-LoRA: ``Σ p_k B_k A_k − B̄ Ā``); None: nothing is folded
  (in merge mode the aggregate itself is);
- ``dense_merged(options)``: whether what a round merges into the base travels to the clients
  as one dense m×n array per module instead of its factors (FedEx-LoRA's
  ``residual_wire = "dense"``, the paper's own ``ΔW_res``); default: factored;
- ``carry_over``: default for keeping the directions (r_sampled, r_max] that no sampled client
  trained (partial participation);
- ``equal_ranks``: all clients must share one rank; ``ranks_may_shrink``: a client may reply at
  a lower rank than it was given (HetLoRA's self-pruning);
- ``options``: a frozen dataclass that validates itself (``None``: no options);
- ``check(options, ranks)``: refuse options that cannot work with these client ranks, before
  any round runs;
- client hooks: ``penalty(options)`` a term added to the local loss of every module's factors,
  ``prune(options, factors)`` what the client sends back after training;
- ``frozen_a``: A is not trained but fixed at a shared seeded initialisation, the same for every
  client and round (A of rank r is the first r rows of that of the largest rank); clients train
  B only, and only B travels (both sides rebuild A from the run seed; FFA-LoRA);
- ``columns``: for methods whose global factors are the clients' own stacked with one weight
  per column (``B = [B_1 diag(q_1) …]``, ``A = [A_1; …]``), those weights, so aggregation and
  allocation can run in one pass without the stack (:mod:`raflora.math.stacked`);
- ``paper``, ``code``, ``wire``: citation, public code, bytes per round as a formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from raflora.math._arrays import Clients, check_ranks, validate_factors

Factors = tuple[Any, Any]  # (B (m, r), A (r, n)), numpy or torch
AggregateFn = Callable[[Clients, Any], tuple[Tensor, Tensor]]
ColumnsFn = Callable[[Clients, Any], "list[list[float]] | None"]
PenaltyFn = Callable[[Tensor, Tensor], Tensor]  # per-module term of the local loss
# (clients, options, the aggregate (B (m, R), A (R, n))) → residual factors (B' (m, R'), A' (R', n))
ResidualFn = Callable[[Clients, Any, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]


def _no_check(options: Any, ranks: Sequence[int]) -> None:
    return None


def _no_penalty(options: Any) -> PenaltyFn | None:
    return None


def _no_prune(options: Any, factors: dict[str, Factors]) -> dict[str, Factors]:
    return factors


def _factored(options: Any) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """Everything about one aggregation method (see the module docstring)."""

    name: str
    summary: str  # one line for `raflora methods`
    paper: str  # citation
    aggregate: AggregateFn
    allocation: Literal["svd", "slice"] = "svd"
    apply: Literal["adapter", "merge"] = "adapter"
    residual: ResidualFn | None = None
    carry_over: bool = False
    equal_ranks: bool = False
    ranks_may_shrink: bool = False
    frozen_a: bool = False
    options: type | None = None
    columns: ColumnsFn | None = None
    check: Callable[[Any, Sequence[int]], None] = _no_check
    penalty: Callable[[Any], PenaltyFn | None] = _no_penalty
    prune: Callable[[Any, dict[str, Factors]], dict[str, Factors]] = _no_prune
    dense_merged: Callable[[Any], bool] = _factored
    code: str = ""  # public code of the paper, if any
    # floats per module per round, summed over the K sampled clients
    wire: str = "down Σ_k r_k (m + n), up Σ_k r_k (m + n)"
    # predicted share of direction i of the previous update that the aggregate keeps when
    # clients barely train, for the reports: "c_i" = Σ_{r_k ≥ i} p_k (rank-agnostic averaging
    # of products), "1" (each direction averaged over its holders only), None (not predicted)
    retention: Literal["c_i", "1"] | None = None

    def build_options(self, **options: Any) -> Any:
        """This method's validated options dataclass (None for a method without options)."""
        allowed = [] if self.options is None else [f.name for f in dataclasses.fields(self.options)]
        for key in options:
            if key not in allowed:
                raise ValueError(
                    f"unknown option {key!r} for method {self.name!r}; allowed options: {allowed}"
                )
        return None if self.options is None else self.options(**options)

    def check_ranks(self, options: Any, ranks: Sequence[int]) -> None:
        """Raise ValueError if these client ranks cannot run with this method and options."""
        ranks = check_ranks(ranks)
        if self.equal_ranks and len(set(ranks)) > 1:
            raise ValueError(
                f"{self.name} needs all clients to have the same rank, got ranks "
                f"{sorted(set(ranks))}; use zeropad, flexlora or raflora for heterogeneous ranks"
            )
        self.check(options, ranks)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its unique lower-case identifier name; returns it."""
    name = method.name
    if not isinstance(name, str) or not name or name != name.lower() or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a non-empty lower-case identifier")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if method.options is not None and not dataclasses.is_dataclass(method.options):
        raise ValueError(f"options for {name!r} must be a dataclass")
    if method.allocation not in ("svd", "slice") or method.apply not in ("adapter", "merge"):
        raise ValueError(f"{name}: allocation must be svd|slice and apply adapter|merge")
    if method.frozen_a and method.allocation != "slice":
        raise ValueError(f"{name}: a frozen A needs slice allocation (an SVD would rotate A)")
    _REGISTRY[name] = method
    return method


def register_with_svd_variant(method: Method, svd_summary: str) -> Method:
    """Register a slice-allocated factor-averaging ``method`` and ``<name>_svd``: the same
    aggregate, options and client hooks, but clients get the best rank-r truncation of the
    kept ``B̄ Ā`` (the "SVD-based allocation" the raFLoRA paper compares against)."""
    register(method)
    variant = dataclasses.replace(
        method, name=f"{method.name}_svd", allocation="svd", summary=svd_summary
    )
    return register(variant)


def available_methods() -> list[str]:
    """Names of the registered aggregation methods, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the known ones otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {available_methods()}")
    return _REGISTRY[name]


def method_summary(name: str) -> str:
    """The one-line summary ``raflora methods`` lists."""
    return get_method(name).summary


def method_options(name: str, **options: Any) -> Any:
    """Build and validate ``name``'s options dataclass (None for a method without options)."""
    return get_method(name).build_options(**options)


def aggregate(
    method: str,
    factors: Sequence[tuple[Any, Any]],
    weights: Sequence[float],
    **options: Any,
) -> tuple[Any, Any]:
    """Aggregate client factors with a registered method.

    Args:
        method: one of :func:`available_methods`.
        factors: ``[(B_k, A_k), ...]``, B_k (m, r_k), A_k (r_k, n); numpy or torch, float32 or
            float64, one library/dtype/device for all. Products include the LoRA scaling.
        weights: w_k ≥ 0 per client (data sizes), normalised inside.
        **options: method options (see each method's ``*Options`` dataclass).

    Returns:
        ``(B, A)``, B (m, R), A (R, n), with ``B @ A`` the global update, in the input's
        library, dtype and device.
    """
    spec = get_method(method)
    opts = spec.build_options(**options)
    clients, backend = validate_factors(factors, weights)
    spec.check_ranks(opts, clients.ranks)
    B, A = spec.aggregate(clients, opts)
    return backend.out(B), backend.out(A)


def run_method(method: str, clients: Clients, options: Any) -> tuple[Tensor, Tensor]:
    """``method``'s global factors B (m, R), A (R, n) for validated clients and options."""
    return get_method(method).aggregate(clients, options)


def stacked_columns(method: str, clients: Clients, options: Any) -> list[list[float]] | None:
    """Per-client column weights q_k (r_k,) of ``method``'s global factors
    B = [B_1 diag(q_1) …], A = [A_1; …], or None when the method does not stack that way."""
    columns = get_method(method).columns
    return None if columns is None else columns(clients, options)
