"""Split training indices across clients: IID or Dirichlet(α) label skew, reproducible by seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.table import Table


def _check_sizes(n: int, num_clients: int, min_size: int) -> None:
    """At least one client, and n examples enough for ``min_size`` each (ValueError)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1 (got {num_clients})")
    if n < num_clients * min_size:
        raise ValueError(f"{n} examples cannot give {num_clients} clients {min_size} each")


def partition_iid(n: int, num_clients: int, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into ``num_clients`` near-equal sorted parts
    (sizes ⌊n/K⌋ or ⌈n/K⌉); raises ``ValueError`` when ⌊n/K⌋ < ``min_size``."""
    _check_sizes(n, num_clients, max(min_size, 1))
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def _dirichlet_once(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        shares = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,) sums to 1
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def partition_dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Per-class Dirichlet split (Hsu et al. 2019): for each class c, shares
    ``q_c ~ Dir(α·1_K)`` give client k the next ``⌊q_ck · n_c⌋``-sized run of that class's
    shuffled indices. Small α ⇒ few classes per client; large α ⇒ close to IID.

    Draws again (same seeded stream) until every client has ``>= min_size`` examples, at most
    ``max_tries`` times, then raises ``ValueError`` suggesting a larger α or fewer clients.
    Returns sorted, disjoint index arrays covering ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    _check_sizes(len(labels), num_clients, min_size)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0 (got {alpha})")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts = _dirichlet_once(labels, num_clients, alpha, rng)
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples gave all {num_clients} "
        f"clients >= {min_size} examples in {max_tries} tries; raise alpha, lower min_size or "
        "use fewer clients"
    )


def partition_table(
    labels: Sequence[int] | np.ndarray,
    parts: Sequence[np.ndarray],
    ranks: Sequence[int] | None = None,
    label_names: Sequence[str] | None = None,
) -> Table:
    """A rich table with one row per client: size, rank (if given) and per-label counts."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    names = [label_names[c] if label_names else str(c) for c in classes]
    table = Table(title="client partitions")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    if ranks is not None:
        table.add_column("rank", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for client, part in enumerate(parts):
        counts = [int(np.sum(labels[part] == c)) for c in classes]
        rank = [str(ranks[client])] if ranks is not None else []
        table.add_row(str(client), str(len(part)), *rank, *map(str, counts))
    return table
