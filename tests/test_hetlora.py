"""HetLoRA's tail regulariser and rank self-pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raflora.math.methods.hetlora import prune_rank, tail_regularizer


def test_tail_regularizer_value():
    B = np.arange(24, dtype=np.float64).reshape(4, 6)
    A = np.arange(30, dtype=np.float64).reshape(6, 5)
    # γ = 0.5, r = 6: tail is index 3:6
    expected = np.linalg.norm(B[:, 3:]) * np.linalg.norm(A[3:])
    assert tail_regularizer(B, A, 0.5) == pytest.approx(expected)
    # γ = 0.4: ⌊2.4⌋ = 2
    assert tail_regularizer(B, A, 0.4) == pytest.approx(
        np.linalg.norm(B[:, 2:]) * np.linalg.norm(A[2:])
    )


def test_tail_regularizer_is_differentiable_and_touches_only_the_tail():
    torch.manual_seed(0)
    B = torch.randn(5, 4, requires_grad=True)
    A = torch.randn(4, 3, requires_grad=True)
    tail_regularizer(B, A, 0.5).backward()
    assert torch.all(B.grad[:, :2] == 0) and torch.all(A.grad[:2] == 0)
    assert torch.any(B.grad[:, 2:] != 0) and torch.any(A.grad[2:] != 0)


def test_prune_rank():
    rng = np.random.default_rng(0)
    B, A = rng.standard_normal((6, 8)), rng.standard_normal((8, 5))
    B[:, 2:] *= 1e-6  # only the first two directions matter
    assert prune_rank(B, A, gamma=0.5, threshold=1e-3) == 2  # 8 → 4 → 2, stops: tail 1:2 is big
    assert prune_rank(B, A, gamma=0.5, threshold=0.0) == 8
    assert prune_rank(B, A, gamma=0.5, threshold=1e9) == 1  # never below 1
    assert prune_rank(B[:, :1], A[:1], gamma=0.5, threshold=1e9) == 1
    assert (
        prune_rank(torch.from_numpy(B), torch.from_numpy(A), 0.75, 1e-3) == 2
    )  # 8 → 6 → 4 → 3 → 2


@pytest.mark.parametrize("gamma", [0, 1, -0.5, 1.5, True])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        tail_regularizer(np.ones((3, 2)), np.ones((2, 3)), gamma)
    with pytest.raises(ValueError, match="gamma"):
        prune_rank(np.ones((3, 2)), np.ones((2, 3)), gamma, 0.1)


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        prune_rank(np.ones((3, 2)), np.ones((2, 3)), 0.5, -1)
