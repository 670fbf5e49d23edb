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


def signed_svd(W):
    """numpy's thin SVD of W (float64) with raflora's sign convention: the largest-|.| entry of
    each column of U is positive."""
    U, S, Vt = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs, S, Vt * signs[:, None]
