"""The aggregation methods: one module each, all registered in :mod:`.registry`.

Adding a method is one module that builds a :class:`~.registry.Method` and calls
:func:`~.registry.register`, plus its import below (see the README, "Adding a method").
"""

from raflora.math.methods import (  # noqa: F401  (each import registers its methods)
    fedex,
    fedit,
    ffa_lora,
    flexlora,
    flexlora_nm,
    flora,
    florist,
    hetlora,
    raflora,
    rblora,
    zeropad,
)
from raflora.math.methods._common import partition_bounds, partition_weights
from raflora.math.methods.registry import (
    Method,
    aggregate,
    available_methods,
    get_method,
    method_options,
    method_summary,
    register,
    run_method,
    stacked_columns,
)

__all__ = [
    "Method",
    "aggregate",
    "available_methods",
    "get_method",
    "method_options",
    "method_summary",
    "partition_bounds",
    "partition_weights",
    "register",
    "run_method",
    "stacked_columns",
]
