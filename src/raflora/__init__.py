"""raflora: federated LoRA fine-tuning with heterogeneous client ranks.

The math layer is re-exported here: `aggregate(method, factors, weights, **options)` builds the
global update from clients' factors, `allocate(B, A, rank)` gives each client its best rank-r
share of it, `aggregate_allocate(method, factors, weights, ranks)` both in one pass without
storing the stacked global factors, `spectrum(B, A)` the update's singular values.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_MATH = ("aggregate", "aggregate_allocate", "allocate", "available_methods", "spectrum")
__all__ = ["__version__", *_MATH]


def __getattr__(name: str) -> Any:
    # Lazy: `import raflora` stays cheap; the math layer (torch) loads on first use.
    if name in _MATH:
        return getattr(import_module("raflora.math"), name)
    raise AttributeError(f"module 'raflora' has no attribute {name!r}")
