"""Array-library handling and input validation for the math layer.

Inputs are numpy arrays or torch tensors of float32/float64. Everything is computed in torch:
``torch.from_numpy`` shares memory, so a numpy input costs no copy, and a :class:`Backend`
records the caller's library, dtype and device so results go back the way they came.

A client update is a pair ``(B_k, A_k)`` with ``B_k`` of shape (m, r_k) and ``A_k`` of shape
(r_k, n); every check below names the client index (or the argument) and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """Where the caller's arrays live, so results can be returned the same way."""

    library: str  # "numpy" or "torch"
    dtype: torch.dtype  # float32 or float64
    device: torch.device  # always cpu for numpy

    def out(self, t: Tensor) -> Any:
        """Return ``t`` in the caller's array library (zero-copy for numpy on cpu)."""
        if self.library == "numpy":
            return t.detach().cpu().numpy()
        return t


@dataclass(frozen=True)
class Clients:
    """Validated client factors as torch tensors, with normalised weights p_k (Σ p_k = 1)."""

    Bs: tuple[Tensor, ...]  # each (m, r_k)
    As: tuple[Tensor, ...]  # each (r_k, n)
    p: tuple[float, ...]  # normalised weights
    ranks: tuple[int, ...]  # r_k
    m: int
    n: int


def library_of(x: Any, name: str) -> str:
    """Name the array library of ``x`` ("numpy" or "torch"), or fail naming ``name``."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, Tensor):
        return "torch"
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def to_tensor(x: Any, name: str) -> Tensor:
    """Check that ``x`` is a finite 2-D float32/float64 array and return it as a torch tensor."""
    library = library_of(x, name)
    if library == "numpy":
        if x.dtype.kind not in "f" or x.dtype.itemsize not in (4, 8):
            raise ValueError(f"{name} has dtype {x.dtype}; use float32 or float64")
        # from_numpy needs a writable, native-endian array with non-negative strides.
        if not x.flags.writeable or not x.dtype.isnative or any(s < 0 for s in x.strides):
            x = np.array(x, dtype=x.dtype.newbyteorder("="))
        t = torch.from_numpy(x)
    else:
        t = x
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use float32 or float64")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    # A finite sum means every entry is finite (nan/inf propagate through sums); one pass and no
    # boolean temporary. Only a non-finite sum (possibly overflow) needs the entry-wise check.
    if not math.isfinite(float(t.detach().sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return t


def backend_of(x: Any, t: Tensor) -> Backend:
    return Backend(library_of(x, "array"), t.dtype, t.device)


def check_same_backend(first: Backend, other: Backend, name: str, first_name: str) -> None:
    """Fail unless ``other`` uses the same library, dtype and device as ``first``."""
    if other.library != first.library:
        raise ValueError(
            f"{name} is a {other.library} array but {first_name} is a {first.library} array; "
            "mixed array libraries are not supported"
        )
    if other.dtype != first.dtype:
        raise ValueError(
            f"{name} has dtype {other.dtype} but {first_name} has {first.dtype}; "
            "mixed dtypes are not supported"
        )
    if other.device != first.device:
        raise ValueError(f"{name} is on {other.device} but {first_name} is on {first.device}")


def validate_pair(B: Any, A: Any, where: str = "") -> tuple[Tensor, Tensor, Backend]:
    """Validate one factor pair B (m, r), A (r, n); ``where`` prefixes messages ("client 3: ")."""
    Bt = to_tensor(B, f"{where}B")
    At = to_tensor(A, f"{where}A")
    backend = backend_of(B, Bt)
    check_same_backend(backend, backend_of(A, At), f"{where}A", f"{where}B")
    if Bt.shape[1] != At.shape[0]:
        raise ValueError(
            f"{where}B has {Bt.shape[1]} columns but A has {At.shape[0]} rows "
            "(B.shape[1] must equal A.shape[0], the rank)"
        )
    if Bt.shape[1] == 0:
        raise ValueError(f"{where}rank 0 (B shape {tuple(Bt.shape)}); ranks must be at least 1")
    if Bt.shape[0] == 0 or At.shape[1] == 0:
        raise ValueError(f"{where}empty update: B {tuple(Bt.shape)}, A {tuple(At.shape)}")
    return Bt, At, backend


def normalise_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """p_k = w_k / Σ w after checking length, finiteness and signs."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ValueError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"len(weights) = {len(weights)} but there are {count} clients")
    w = []
    for k, value in enumerate(weights):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"client {k}: weight {value!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"client {k}: weight {v} is not finite")
        if v < 0:
            raise ValueError(f"client {k}: weight {v} is negative")
        w.append(v)
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("weights are all zero; at least one client needs a positive weight")
    return tuple(v / total for v in w)


def validate_factors(
    factors: Sequence[tuple[Any, Any]], weights: Sequence[float]
) -> tuple[Clients, Backend]:
    """Check every client's factors against the first one's library, dtype, device, m and n."""
    if isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__"):
        raise ValueError(f"factors must be a sequence of (B, A) pairs, got {type(factors)}")
    if len(factors) == 0:
        raise ValueError("factors is empty: need at least one client (B, A) pair")
    Bs, As, backend = [], [], None
    for k, pair in enumerate(factors):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"client {k}: expected a (B, A) pair, got {type(pair).__name__}")
        B, A, b = validate_pair(pair[0], pair[1], where=f"client {k}: ")
        if backend is None:
            backend = b
        else:
            check_same_backend(backend, b, f"client {k}: B", "client 0: B")
            if B.shape[0] != Bs[0].shape[0]:
                raise ValueError(
                    f"client {k}: B has {B.shape[0]} rows (m) but client 0 has {Bs[0].shape[0]}"
                )
            if A.shape[1] != As[0].shape[1]:
                raise ValueError(
                    f"client {k}: A has {A.shape[1]} columns (n) but client 0 has {As[0].shape[1]}"
                )
        Bs.append(B)
        As.append(A)
    p = normalise_weights(weights, len(factors))
    ranks = tuple(int(B.shape[1]) for B in Bs)
    clients = Clients(tuple(Bs), tuple(As), p, ranks, int(Bs[0].shape[0]), int(As[0].shape[1]))
    assert backend is not None
    return clients, backend


def check_ranks(ranks: Sequence[int], name: str = "ranks") -> tuple[int, ...]:
    """Validate a non-empty sequence of positive integer ranks."""
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive integers")
    out = []
    for k, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise ValueError(f"client {k}: rank {r!r} is not an integer")
        if r < 1:
            raise ValueError(f"client {k}: rank {r} must be at least 1")
        out.append(int(r))
    return tuple(out)


def check_bounds(bounds: Sequence[int]) -> tuple[int, ...]:
    """Validate strictly increasing positive partition bounds."""
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) == 0:
        raise ValueError(f"partitions must be a non-empty sequence of integers, got {bounds!r}")
    out = []
    for j, b in enumerate(bounds):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"partitions[{j}] = {b!r} must be a positive integer")
        if out and b <= out[-1]:
            raise ValueError(f"partitions must be strictly increasing, got {list(bounds)}")
        out.append(int(b))
    return tuple(out)
