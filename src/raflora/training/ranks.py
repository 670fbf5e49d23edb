"""Client LoRA ranks: from an explicit list, from tiers, or from memory budgets.

Memory model used by `ranks_from_memory` (float32 everywhere, MiB = 2**20 bytes)::

    mem(r) = base_memory_mb + activation_mb + 4 · (4 bytes · r · P₁) / 2**20

where P₁ = Σ over target layers (m + n) is the LoRA parameter count per unit rank (a rank-r
adapter on an m×n layer has r·(m + n) parameters), and the factor 4 counts the LoRA weights,
their gradients and AdamW's two moments. ``base_memory_mb`` covers the frozen base weights
(see `base_memory_mb`); ``activation_mb`` is a rank-independent estimate of activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1 (got {rank!r})")
    return int(rank)


def ranks_from_list(ranks: Sequence[int], num_clients: int) -> list[int]:
    """One rank per client; a list shorter than ``num_clients`` is a pattern repeated in order
    (``[2, 4]`` for 5 clients → ``[2, 4, 2, 4, 2]``); a longer list is an error."""
    if not ranks:
        raise ValueError("ranks: needs at least one rank")
    if len(ranks) > num_clients:
        raise ValueError(f"ranks: {len(ranks)} ranks for only {num_clients} clients")
    checked = [_check_rank(rank) for rank in ranks]
    return [checked[i % len(checked)] for i in range(num_clients)]


def ranks_from_tiers(num_clients: int, tiers: dict[int, float], seed: int) -> list[int]:
    """Ranks in the given proportions, e.g. ``{4: .5, 8: .3, 16: .2}``.

    Counts are ``⌊f·K⌋`` per tier plus one more for the tiers with the largest remainders
    (ties: smaller rank first) until they sum to K; the list is then shuffled with ``seed``.
    """
    if not tiers:
        raise ValueError("rank_tiers: needs at least one tier")
    for rank, share in tiers.items():
        _check_rank(rank)
        if share < 0:
            raise ValueError(f"rank_tiers: fraction for rank {rank} is negative ({share})")
    if abs(sum(tiers.values()) - 1.0) > 1e-6:
        raise ValueError(f"rank_tiers: fractions must sum to 1 (got {sum(tiers.values()):g})")
    order = sorted(tiers)
    exact = np.array([tiers[rank] * num_clients for rank in order])
    counts = np.floor(exact).astype(int)
    by_remainder = sorted(range(len(order)), key=lambda i: (-(exact[i] - counts[i]), order[i]))
    for i in by_remainder[: num_clients - counts.sum()]:
        counts[i] += 1
    ranks = np.repeat(order, counts)
    return [int(rank) for rank in np.random.default_rng(seed).permutation(ranks)]


def lora_params_per_rank(model: nn.Module, target_modules: Sequence[str]) -> int:
    """P₁ = Σ (in + out) over linear layers whose last name part is in ``target_modules``."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in target_modules:
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            total += sum(module.weight.shape)
    if total == 0:
        raise ValueError(f"no linear layers named {list(target_modules)} in the model")
    return total


def base_memory_mb(model: nn.Module) -> float:
    """float32 size of all the model's parameters in MiB."""
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def training_memory_mb(
    rank: int, lora_param_count_per_rank: int, base_memory_mb: float, activation_mb: float = 0.0
) -> float:
    """``mem(r)`` of the module docstring."""
    return base_memory_mb + activation_mb + 4 * 4 * rank * lora_param_count_per_rank / 2**20


def ranks_from_memory(
    budgets_mb: Sequence[float],
    lora_param_count_per_rank: int,
    base_memory_mb: float,
    candidate_ranks: Sequence[int],
    activation_mb: float = 0.0,
) -> list[int]:
    """Per client, the largest candidate rank with ``mem(r) <= budget``; a budget fitting no
    candidate raises ``ValueError`` naming the client and what the smallest rank needs."""
    candidates = sorted({_check_rank(rank) for rank in candidate_ranks})
    if not candidates:
        raise ValueError("candidate_ranks: needs at least one rank")
    ranks = []
    for client, budget in enumerate(budgets_mb):
        fitting = [
            rank
            for rank in candidates
            if training_memory_mb(rank, lora_param_count_per_rank, base_memory_mb, activation_mb)
            <= budget
        ]
        if not fitting:
            need = training_memory_mb(
                candidates[0], lora_param_count_per_rank, base_memory_mb, activation_mb
            )
            smallest = math.ceil(need * 10) / 10  # rounded up: a budget this size fits
            raise ValueError(
                f"client {client}: memory budget {budget:g} MB fits no candidate rank; the "
                f"smallest budget that works is {smallest:.1f} MB (rank {candidates[0]})"
            )
        ranks.append(fitting[-1])
    return ranks
