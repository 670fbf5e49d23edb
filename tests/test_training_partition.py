"""IID and Dirichlet partitions: disjoint, complete, large enough, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from raflora.training.partition import partition_dirichlet, partition_iid, partition_table


def assert_partition(parts: list[np.ndarray], n: int, min_size: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint+complete
    assert all(len(part) >= min_size for part in parts)
    assert all(np.all(np.diff(part) > 0) for part in parts)  # sorted


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    clients=st.integers(1, 12),
    min_size=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_iid(n: int, clients: int, min_size: int, seed: int) -> None:
    if n // clients < min_size:
        with pytest.raises(ValueError, match=f"{n} examples cannot give {clients} clients"):
            partition_iid(n, clients, seed, min_size=min_size)
        return
    parts = partition_iid(n, clients, seed, min_size=min_size)
    assert_partition(parts, n, min_size)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, partition_iid(n, clients, seed), strict=True)
    )


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=40, max_size=300),
    clients=st.integers(1, 8),
    alpha=st.sampled_from([0.1, 0.5, 1.0, 10.0]),
    min_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_dirichlet(labels: list[int], clients: int, alpha: float, min_size: int, seed: int):
    try:
        parts = partition_dirichlet(labels, clients, alpha, seed, min_size=min_size)
    except ValueError as error:  # allowed only as the documented "no split found" error
        assert "tries" in str(error)
        return
    assert_partition(parts, len(labels), min_size)
    again = partition_dirichlet(labels, clients, alpha, seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_classes_per_client(alpha: float) -> float:
        parts = partition_dirichlet(labels, 10, alpha, seed=0, min_size=10)
        return float(np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 5) for p in parts]))

    assert mean_classes_per_client(0.1) < 4 < 9 < mean_classes_per_client(100.0)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            partition_dirichlet(labels, 4, 0.5, 0),
            partition_dirichlet(labels, 4, 0.5, 1),
            strict=True,
        )
    )


def test_impossible_dirichlet_requests_fail_clearly() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match="cannot give 5 clients 5 each"):
        partition_dirichlet(labels, 5, 0.5, seed=0, min_size=5)
    with pytest.raises(ValueError, match=r"in 3 tries; raise alpha"):
        partition_dirichlet(labels, 4, 0.01, seed=0, min_size=5, max_tries=3)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(labels, 2, 0.0, seed=0)


def test_table_shows_size_rank_and_label_counts() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    table = partition_table(labels, parts, ranks=[2, 8], label_names=["neg", "pos", "mixed"])
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert [c.header for c in table.columns] == ["client", "size", "rank", "neg", "pos", "mixed"]
    assert table.row_count == 2
    assert "│      1 │    4 │    8 │   1 │   2 │     1 │" in text
