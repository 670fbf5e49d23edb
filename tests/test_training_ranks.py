"""Client ranks from lists, tiers and memory budgets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from raflora.training.models import build_lora_model, load_base_model
from raflora.training.ranks import (
    base_memory_mb,
    lora_params_per_rank,
    ranks_from_list,
    ranks_from_memory,
    ranks_from_tiers,
    training_memory_mb,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_list_is_used_as_is_or_cycled() -> None:
    assert ranks_from_list([2, 4, 8], 3) == [2, 4, 8]
    assert ranks_from_list([2, 4], 5) == [2, 4, 2, 4, 2]
    with pytest.raises(ValueError, match="4 ranks for only 3 clients"):
        ranks_from_list([2, 4, 8, 16], 3)
    with pytest.raises(ValueError, match=">= 1"):
        ranks_from_list([2, 0], 2)
    with pytest.raises(ValueError, match="at least one"):
        ranks_from_list([], 2)


@pytest.mark.parametrize(
    ("clients", "expected"),
    [(10, {4: 5, 8: 3, 16: 2}), (7, {4: 4, 8: 2, 16: 1}), (3, {4: 1, 8: 1, 16: 1}), (1, {4: 1})],
)
def test_tiers_use_largest_remainders(clients: int, expected: dict[int, int]) -> None:
    ranks = ranks_from_tiers(clients, {4: 0.5, 8: 0.3, 16: 0.2}, seed=0)
    assert Counter(ranks) == expected and len(ranks) == clients


def test_tiers_are_shuffled_by_seed_and_validated() -> None:
    tiers = {2: 0.25, 4: 0.25, 8: 0.25, 16: 0.25}
    shuffles = {tuple(ranks_from_tiers(8, tiers, seed)) for seed in range(5)}
    assert len(shuffles) > 1 and ranks_from_tiers(8, tiers, 3) == ranks_from_tiers(8, tiers, 3)
    with pytest.raises(ValueError, match="sum to 1"):
        ranks_from_tiers(4, {4: 0.5, 8: 0.4}, 0)
    with pytest.raises(ValueError, match=">= 1"):
        ranks_from_tiers(4, {0: 1.0}, 0)


def test_memory_formula_and_choice() -> None:
    # P1 = 2**16 params per unit rank → rank r costs 16 bytes · r · 2**16 = r MiB
    assert training_memory_mb(8, 2**16, 100.0, activation_mb=10.0) == 118.0
    ranks = ranks_from_memory([104.0, 109.0, 1e6], 2**16, 100.0, [2, 4, 8, 16])
    assert ranks == [4, 8, 16]
    says = r"client 1: memory budget 101 MB fits no .* budget that works is 102\.0 MB \(rank 2\)"
    with pytest.raises(ValueError, match=says):
        ranks_from_memory([200.0, 101.0], 2**16, 100.0, [2, 4])


def test_lora_params_per_rank_matches_peft(tiny_bert_dir: Path) -> None:
    base, _ = load_base_model(str(tiny_bert_dir), "classification")
    per_rank = lora_params_per_rank(base, ["query", "value"])
    assert per_rank == 2 * 2 * (32 + 32)  # 2 layers × 2 modules × (m + n)
    assert base_memory_mb(base) == pytest.approx(
        sum(p.numel() for p in base.parameters()) * 4 / 2**20
    )
    model = build_lora_model(base, 4, 8.0, ["query", "value"])
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == 4 * per_rank
    with pytest.raises(ValueError, match="no linear layers"):
        lora_params_per_rank(base, ["c_attn"])
