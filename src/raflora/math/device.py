"""Run the math layer's numpy-in, numpy-out calls on an accelerator.

The math functions take numpy arrays or torch tensors and return results the way they came
(`raflora.math._arrays.Backend`). :func:`computing_on` makes :func:`on_device` turn numpy
inputs into torch tensors on a device (same dtype), and :func:`on_host` turns the results back
into numpy, so a caller that works in numpy (the server's round step) can compute on a GPU by
wrapping its calls, ``on_host(*fn(*on_device(B, A)))``. Without :func:`computing_on`, or on
the CPU, both are the identity: numpy stays numpy and nothing is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

_DEVICE: ContextVar[torch.device | None] = ContextVar("raflora_math_device", default=None)


@contextmanager
def computing_on(device: torch.device | str | None) -> Iterator[None]:
    """Within the block, :func:`on_device` moves numpy arrays to ``device`` (None/cpu: not)."""
    token = _DEVICE.set(None if device is None else torch.device(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def current_device() -> torch.device | None:
    """The device set by the innermost :func:`computing_on`, or None."""
    return _DEVICE.get()


def on_device(*arrays: Any) -> tuple[Any, ...]:
    """numpy arrays as torch tensors on the current device (same dtype); anything else, and
    everything when no accelerator is current, unchanged."""
    device = _DEVICE.get()
    if device is None or device.type == "cpu":
        return arrays
    return tuple(
        torch.from_numpy(np.ascontiguousarray(a)).to(device) if isinstance(a, np.ndarray) else a
        for a in arrays
    )


def on_host(*values: Any) -> tuple[Any, ...]:
    """torch tensors as numpy arrays on the host (same dtype); anything else unchanged."""
    return tuple(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in values)
