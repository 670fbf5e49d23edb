"""raflora's math layer: pure numpy/torch, no I/O.

- :mod:`~raflora.math.lowrank`: factored SVD of B @ A, Eckart–Young allocation to any ranks.
- :mod:`~raflora.math.methods`: one module per aggregation method, the registry, `aggregate`.
- :mod:`~raflora.math.round`: the server's round step (aggregate, keep, allocate, diagnostics).
- :mod:`~raflora.math.stacked`: `aggregate_allocate`, both in one pass without the stack.
- :mod:`~raflora.math.diagnostics`: spectrum-based rank-collapse diagnostics.
"""

from raflora.math.lowrank import (
    allocate,
    factored_norm,
    factored_svd,
    leading_svd,
    significant_svd,
    significant_values,
    spectrum,
    truncate,
)
from raflora.math.methods import (
    aggregate,
    available_methods,
    get_method,
    method_options,
    partition_bounds,
    partition_weights,
    register,
)
from raflora.math.stacked import aggregate_allocate

__all__ = [
    "aggregate",
    "aggregate_allocate",
    "allocate",
    "available_methods",
    "factored_norm",
    "factored_svd",
    "get_method",
    "leading_svd",
    "method_options",
    "partition_bounds",
    "partition_weights",
    "register",
    "significant_svd",
    "significant_values",
    "spectrum",
    "truncate",
]
