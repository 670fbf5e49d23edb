"""Diagnostics against closed forms (diagonal updates with known singular values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raflora import diagnostics as D


def diagonal_update(sigma, m=10, n=9):
    """B (m, k), A (k, n) with B A = diag(σ) in the top-left corner."""
    k = len(sigma)
    B = np.zeros((m, k))
    B[np.arange(k), np.arange(k)] = sigma
    A = np.eye(k, n)
    return B, A


SIGMA = [4.0, 3.0, 2.0, 2.0, 1.0, 1.0]  # σ² = 16, 9, 4, 4, 1, 1: total 35


def test_singular_values_of_a_diagonal_update():
    B, A = diagonal_update(SIGMA[::-1])  # order does not matter
    assert D.singular_values(B, A) == pytest.approx(SIGMA, rel=1e-12)


def test_partition_energy_closed_form():
    shares = D.partition_energy(SIGMA, [1, 2, 4])
    assert shares == pytest.approx([16 / 35, 9 / 35, 8 / 35, 2 / 35])
    assert sum(shares) == pytest.approx(1.0)
    # bounds beyond the spectrum: empty buckets are 0
    assert D.partition_energy([1.0, 1.0], [1, 4, 8]) == pytest.approx([0.5, 0.5, 0.0, 0.0])


def test_top_effective_stable_rank():
    assert D.top_energy(SIGMA, 2) == pytest.approx(25 / 35)
    assert D.top_energy(SIGMA, 100) == pytest.approx(1.0)
    assert D.effective_rank([1.0] * 7) == pytest.approx(7.0)
    e = np.array([16, 9, 4, 4, 1, 1]) / 35
    assert D.effective_rank(SIGMA) == pytest.approx(math.exp(-np.sum(e * np.log(e))))
    assert D.stable_rank(SIGMA) == pytest.approx(35 / 16)
    assert D.effective_rank(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)


def test_zero_update_is_defined():
    zeros = [0.0, 0.0, 0.0]
    assert D.partition_energy(zeros, [1, 2]) == [0.0, 0.0, 0.0]
    assert D.top_energy(zeros, 1) == 0.0
    assert D.effective_rank(zeros) == 0.0
    assert D.stable_rank(zeros) == 0.0
    summary = D.summarize_update(np.zeros((5, 3)), np.ones((3, 4)), [1, 3], [1, 1])
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary.values())
    assert summary["partition_energy"] == [0.0, 0.0, 0.0]


def test_predicted_retention_hand_computed():
    # p = (0.1, 0.2, 0.3, 0.4) for ranks (2, 4, 4, 8)
    c = D.predicted_retention([2, 4, 4, 8], [1, 2, 3, 4])
    assert c == pytest.approx([1.0, 1.0, 0.9, 0.9, 0.4, 0.4, 0.4, 0.4])


def test_summarize_update_is_json_ready():
    B, A = diagonal_update(SIGMA)
    summary = D.summarize_update(B, A, ranks=[2, 4, 2], weights=[1, 1, 2])
    json.dumps(summary)
    assert summary["partition_bounds"] == [2, 4]
    assert summary["partition_energy"] == pytest.approx([25 / 35, 8 / 35, 2 / 35])
    assert summary["top_rmin_energy"] == pytest.approx(25 / 35)
    assert summary["norm"] == pytest.approx(math.sqrt(35))
    assert summary["stable_rank"] == pytest.approx(35 / 16)
    assert summary["predicted_retention"] == pytest.approx([1.0, 1.0, 0.25, 0.25])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: D.partition_energy([1.0], [2, 1]), "strictly increasing"),
        (lambda: D.partition_energy([-1.0], [1]), "non-negative"),
        (lambda: D.top_energy([1.0], -1), "non-negative"),
        (lambda: D.predicted_retention([2, 0], [1, 1]), "client 1: rank 0"),
        (lambda: D.predicted_retention([2, 4], [1]), "len"),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
