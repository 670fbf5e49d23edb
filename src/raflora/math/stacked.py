"""Aggregate and allocate in one pass, never forming the stacked global factors.

flexlora, flora and raflora aggregate by stacking: with weights q_k (r_k,) per client column,

    B = [B_1 diag(q_1) … B_K diag(q_K)]  (m, R),   A = [A_1; …; A_K]  (R, n),   R = Σ r_k,

a copy of every client's factors. A server that only hands each client the best rank-r_k
factors of B A (FlexLoRA's server) needs from the stack only two R×R Gram matrices and two
thin products, each a sum over blocks of rows of B (columns of A):

    G_B = BᵀB = Σ_blocks B[rows]ᵀ B[rows],      G_A = A Aᵀ = Σ_blocks A[:, cols] A[:, cols]ᵀ
    U = B M_B = [B[rows] M_B]_blocks (m, top),  Vᵀ = M_Aᵀ A = [M_Aᵀ A[:, cols]]_blocks (top, n)

with M_B, M_A (R, top) from the Cholesky route of :mod:`raflora.math.lowrank` (same maps, same
orthonormality check, the mirrored side if B's Gram is ill-conditioned). Each block of B or A is
assembled, weighted, in one small buffer, so memory beyond the inputs is O(R² + (m + n)·top +
block·R) instead of O((m + n)·R); the flops are those of ``aggregate`` + ``allocate``. When
neither Cholesky side is accurate enough the stack is formed for allocate's Householder QR
route, and when R ≥ min(m, n) for its dense product, so results never depend on the path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import Tensor

from raflora.math import lowrank
from raflora.math._arrays import Clients, validate_factors
from raflora.math.lowrank import (
    SPLITS,
    _cholesky_of_gram,
    _core_maps,
    _fix_signs,
    _orthonormal,
    _summed_gram,
    _top_svd,
    rank_list,
    shares,
)
from raflora.math.methods import method_options, run_method, stacked_columns
from raflora.math.methods._common import stacked as _stacked

BLOCK_BYTES = 4 << 20  # one assembled block of B rows or A columns: about 4 MiB


def _block_edges(length: int, R: int, itemsize: int) -> list[int]:
    """Split ``length`` rows (or columns) into blocks of about BLOCK_BYTES at width R."""
    size = max(64, BLOCK_BYTES // max(1, R * itemsize))
    return [*range(0, length, size), length]


class _Stack:
    """The stacked factors B (m, R), A (R, n) of ``columns`` as blocks assembled on demand."""

    def __init__(self, c: Clients, columns: Sequence[Sequence[float]]) -> None:
        self.c = c
        B0 = c.Bs[0]
        self.q = [torch.tensor(qk, dtype=B0.dtype, device=B0.device) for qk in columns]
        self.offsets = [0, *accumulate(c.ranks)]  # client k owns columns offsets[k]:offsets[k+1]
        self.R = self.offsets[-1]
        self.row_edges = _block_edges(c.m, self.R, B0.element_size())
        self.col_edges = _block_edges(c.n, self.R, B0.element_size())

    def b_blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, B[rows]) with B[rows] = [B_k[rows] diag(q_k)]_k (h, R), one buffer reused."""
        buffer = self.c.Bs[0].new_empty(self.row_edges[1], self.R)
        for lo, hi in pairwise(self.row_edges):
            block = buffer[: hi - lo]
            for k, (start, stop) in enumerate(pairwise(self.offsets)):
                torch.mul(self.c.Bs[k][lo:hi], self.q[k], out=block[:, start:stop])
            yield slice(lo, hi), block

    def a_blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(cols, A[:, cols]) with A[:, cols] = [A_k[:, cols]]_k (R, w), one buffer reused."""
        buffer = self.c.As[0].new_empty(self.R, self.col_edges[1])
        for lo, hi in pairwise(self.col_edges):
            block = buffer[:, : hi - lo]
            for k, (start, stop) in enumerate(pairwise(self.offsets)):
                block[start:stop].copy_(self.c.As[k][:, lo:hi])
            yield slice(lo, hi), block

    def gram_b(self) -> Tensor:
        """BᵀB (R, R)."""
        return _summed_gram((block for _, block in self.b_blocks()), self.R)

    def gram_a(self) -> Tensor:
        """A Aᵀ (R, R)."""
        return _summed_gram((block.mT for _, block in self.a_blocks()), self.R)

    def left(self, M: Tensor) -> Tensor:
        """B M (m, top) for M (R, top)."""
        out = M.new_empty(self.c.m, M.shape[1])
        for rows, block in self.b_blocks():
            torch.mm(block, M, out=out[rows])
        return out

    def right(self, M: Tensor) -> Tensor:
        """Mᵀ A (top, n) for M (R, top)."""
        out = M.new_empty(M.shape[1], self.c.n)
        for cols, block in self.a_blocks():
            torch.mm(M.mT, block, out=out[:, cols])
        return out


def _top_svd_streamed(stack: _Stack, top: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top triplets of the stack's B A by the Cholesky route on either side, or None."""
    G_A = stack.gram_a()
    L = _cholesky_of_gram(stack.gram_b())
    maps = None if L is None else _core_maps(L, G_A, top)
    if maps is not None:
        U, Vt = stack.left(maps[0]), stack.right(maps[1])
        if _orthonormal(U, Vt):
            return U, maps[2], Vt
    L = _cholesky_of_gram(G_A)  # mirrored: (B A)ᵀ = Aᵀ Bᵀ, with X = Aᵀ, Y = Bᵀ
    maps = None if L is None else _core_maps(L, stack.gram_b(), top)
    if maps is not None:
        U, Vt = stack.left(maps[1]), stack.right(maps[0])
        if _orthonormal(U, Vt):
            return U, maps[2], Vt
    return None


def aggregate_allocate(
    method: str,
    factors: Sequence[tuple[Any, Any]],
    weights: Sequence[float],
    rank: int | Sequence[int],
    split: str = "us",
    **options: Any,
) -> tuple[Any, Any] | list[tuple[Any, Any]]:
    """``allocate(*aggregate(method, factors, weights, **options), rank, split)`` in one pass.

    For a method registered with column weights (flexlora, flora, raflora) the stacked global
    factors are never formed (see the module docstring); any other method, or a stack with
    R = Σ r_k ≥ min(m, n), aggregates and allocates as usual. Arguments and results are those
    of :func:`~raflora.math.methods.aggregate` and :func:`~raflora.math.lowrank.allocate`.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    opts = method_options(method, **options)
    clients, backend = validate_factors(factors, weights)
    columns = stacked_columns(method, clients, opts)
    if columns is None or sum(clients.ranks) >= min(clients.m, clients.n):
        B, A = run_method(method, clients, opts) if columns is None else _stacked(clients, columns)
        ranks, single = rank_list(rank, min(B.shape[0], A.shape[1], B.shape[1]))
        out = _top_svd(B, A, max(ranks))  # allocate's routes (the dense product when wide)
    else:
        ranks, single = rank_list(rank, sum(clients.ranks))
        out = _top_svd_streamed(_Stack(clients, columns), max(ranks))
        if out is None:  # both Cholesky sides failed: form the stack for Householder QR
            U, S, Vt = lowrank._svd(*_stacked(clients, columns), max(ranks))
            out = (U, S[: max(ranks)], Vt)
        else:
            out = _fix_signs(*out)
    pairs = [(backend.out(Br), backend.out(Ar)) for Br, Ar in shares(*out, ranks, split)]
    return pairs[0] if single else pairs  # type: ignore[return-value]
