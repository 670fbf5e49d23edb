"""raflora's math layer: pure numpy/torch, no I/O.

- :mod:`~raflora.math.lowrank`: factored SVD of B @ A, Eckart–Young allocation to any ranks.
- :mod:`~raflora.math.aggregation`: the aggregation methods, their registry and `aggregate`.
- :mod:`~raflora.math.stacked`: `aggregate_allocate`, both in one pass without the stack.
- :mod:`~raflora.math.diagnostics`: spectrum-based rank-collapse diagnostics.
- :mod:`~raflora.math.hetlora`: HetLoRA's client-side rank self-pruning.
"""

from raflora.math.aggregation import (
    aggregate,
    available_methods,
    method_options,
    partition_bounds,
    partition_weights,
    register_method,
)
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
from raflora.math.stacked import aggregate_allocate

__all__ = [
    "aggregate",
    "aggregate_allocate",
    "allocate",
    "available_methods",
    "factored_norm",
    "factored_svd",
    "leading_svd",
    "method_options",
    "partition_bounds",
    "partition_weights",
    "register_method",
    "significant_svd",
    "significant_values",
    "spectrum",
    "truncate",
]
