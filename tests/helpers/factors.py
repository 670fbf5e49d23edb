"""Random client factors for the math tests."""

from __future__ import annotations

import numpy as np


def make_factors(ranks, m=7, n=5, seed=0, dtype=np.float64):
    """One (B_k (m, r_k), A_k (r_k, n)) pair of standard normal entries per rank."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((m, r)).astype(dtype), rng.standard_normal((r, n)).astype(dtype))
        for r in ranks
    ]
