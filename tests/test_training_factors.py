"""PEFT parameters ⇄ scaled factors, checked against PEFT's own scaling and delta weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raflora.training.factors import (
    get_dense_trainables,
    get_factors,
    live_factors,
    lora_layers,
    lora_scaling,
    lora_shapes,
    set_dense_trainables,
    set_factors,
)
from raflora.training.models import build_lora_model, load_base_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

QUERY0 = "bert.encoder.layer.0.attention.self.query"


def lora_bert(folder: Path, rank: int, rslora: bool = False, alpha: float = 8.0, seed: int = 0):
    base, _ = load_base_model(str(folder), "classification", num_labels=2)
    return build_lora_model(base, rank, alpha, ["query", "value"], rslora=rslora, seed=seed)


def random_factors(model, rank: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(m, rank, generator=generator), torch.randn(rank, n, generator=generator))
        for name, (m, n, _) in lora_shapes(model).items()
    }


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_scaling_matches_peft(tiny_bert_dir: Path, rank: int, rslora: bool) -> None:
    model = lora_bert(tiny_bert_dir, rank, rslora=rslora, alpha=12.0)
    for _, layer in lora_layers(model):
        assert layer.scaling["default"] == lora_scaling(rank, 12.0, rslora)
    assert lora_scaling(4, 8.0, True) == 4.0 and lora_scaling(4, 8.0, False) == 2.0


def test_names_are_stable_across_ranks(tiny_bert_dir: Path) -> None:
    names2 = list(get_factors(lora_bert(tiny_bert_dir, 2)))
    names8 = list(get_factors(lora_bert(tiny_bert_dir, 8, rslora=True)))
    assert names2 == names8 and names2[0] == QUERY0 and len(names2) == 4
    assert all(not name.startswith("base_model") and "default" not in name for name in names2)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_round_trip_is_exact(tiny_bert_dir: Path, rank: int, rslora: bool) -> None:
    model = lora_bert(tiny_bert_dir, rank, rslora=rslora)
    given = random_factors(model, rank)
    set_factors(model, given, seed=0)
    got = get_factors(model)
    set_factors(model, got, seed=1)
    again = get_factors(model)
    for name, (B, A) in given.items():
        m, n, r = lora_shapes(model)[name]
        assert got[name][0].shape == (m, r) and got[name][1].shape == (r, n)
        assert got[name][0].dtype == torch.float32 and not got[name][0].requires_grad
        torch.testing.assert_close(got[name][1], A, rtol=0, atol=0)
        torch.testing.assert_close(got[name][0], B, rtol=1e-6, atol=1e-6)  # /s then ·s
        torch.testing.assert_close(again[name][0], got[name][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again[name][1], got[name][1], rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_folded_factors_are_peft_delta_weight(tiny_bert_dir: Path, rslora: bool) -> None:
    model = lora_bert(tiny_bert_dir, 4, rslora=rslora)
    set_factors(model, random_factors(model, 4), seed=0)
    factors = get_factors(model)
    for name, layer in lora_layers(model):
        B, A = factors[name]
        torch.testing.assert_close(layer.get_delta_weight("default"), B @ A)


def test_forward_is_base_plus_folded_update(tiny_bert_dir: Path) -> None:
    model = lora_bert(tiny_bert_dir, 4, rslora=True)
    set_factors(model, random_factors(model, 4), seed=0)
    layer = dict(lora_layers(model))[QUERY0]
    B, A = get_factors(model)[QUERY0]
    x = torch.randn(3, 5, layer.base_layer.in_features)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (B @ A).T  # W x + b + ΔW x
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_heterogeneous_ranks_carry_the_same_update(tiny_bert_dir: Path) -> None:
    """A rank-4 factor pair loaded into rank-4 (alpha/r) and rank-8 (rsLoRA) models gives
    identical PEFT delta weights and identical model outputs."""
    small, big = lora_bert(tiny_bert_dir, 4), lora_bert(tiny_bert_dir, 8, rslora=True)
    given = random_factors(small, 4)
    set_factors(small, given, seed=0)
    set_factors(big, given, seed=0)
    big_layers = dict(lora_layers(big))
    for name, layer in lora_layers(small):
        torch.testing.assert_close(
            big_layers[name].get_delta_weight("default"),
            layer.get_delta_weight("default"),
            rtol=1e-5,
            atol=1e-6,
        )
    set_dense_trainables(big, get_dense_trainables(small))
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(big(input_ids=ids).logits, small(input_ids=ids).logits)


def test_lower_rank_pads_with_fresh_init(tiny_bert_dir: Path) -> None:
    model = lora_bert(tiny_bert_dir, 8)
    given = random_factors(model, 3)
    del given[QUERY0]  # a missing module gets a whole fresh init
    name = "bert.encoder.layer.1.attention.self.value"
    given[name] = (torch.zeros(32, 0), torch.zeros(0, 32))  # rank 0: likewise
    set_factors(model, given, seed=7)
    got = get_factors(model)
    for module, (B, A) in given.items():
        k = A.shape[0]
        torch.testing.assert_close(got[module][1][:k], A, rtol=0, atol=0)
        torch.testing.assert_close(got[module][0] @ got[module][1], B @ A, rtol=1e-5, atol=1e-5)
    for module in (QUERY0, name):
        B_fold, A = got[module]
        assert torch.count_nonzero(B_fold) == 0
        bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=√5) over fan-in n
        assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    fresh_peft = next(
        p for n, p in lora_bert(tiny_bert_dir, 8).named_parameters() if ".lora_A." in n
    )
    assert fresh_peft.abs().max() <= 1 / math.sqrt(fresh_peft.shape[1])  # PEFT's own bound
    again = lora_bert(tiny_bert_dir, 8, seed=99)
    set_factors(again, given, seed=7)
    assert all(
        torch.equal(again_f[1], got_f[1])
        for again_f, got_f in zip(get_factors(again).values(), got.values(), strict=True)
    )
    other = lora_bert(tiny_bert_dir, 8)
    set_factors(other, given, seed=8)
    assert not torch.equal(get_factors(other)[QUERY0][1], got[QUERY0][1])


def test_set_factors_rejects_bad_input(tiny_bert_dir: Path) -> None:
    model = lora_bert(tiny_bert_dir, 4)
    with pytest.raises(ValueError, match="rank 8 > model rank 4"):
        set_factors(model, random_factors(model, 8), seed=0)
    with pytest.raises(ValueError, match=r"unknown LoRA modules \['bert.pooler.dense'\]"):
        set_factors(model, {"bert.pooler.dense": (torch.zeros(32, 2), torch.zeros(2, 32))}, 0)
    with pytest.raises(ValueError, match="model needs B"):
        set_factors(model, {QUERY0: (torch.zeros(31, 2), torch.zeros(2, 32))}, seed=0)
    with pytest.raises(ValueError, match="need B"):
        set_factors(model, {QUERY0: (torch.zeros(32, 2), torch.zeros(3, 32))}, seed=0)


def test_dense_trainables_round_trip_and_errors(tiny_bert_dir: Path) -> None:
    model = lora_bert(tiny_bert_dir, 2)
    dense = get_dense_trainables(model)
    assert set(dense) == {"classifier.weight", "classifier.bias"}
    new = {name: torch.randn_like(value) for name, value in dense.items()}
    set_dense_trainables(model, new)
    for name, value in get_dense_trainables(model).items():
        assert torch.equal(value, new[name])
    with pytest.raises(ValueError, match="unknown"):
        set_dense_trainables(model, {**new, "pooler.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        set_dense_trainables(model, {"classifier.weight": new["classifier.weight"]})
    set_dense_trainables(model, {"classifier.bias": torch.zeros(2)}, strict=False)
    with pytest.raises(ValueError, match="expected shape"):
        set_dense_trainables(model, {**new, "classifier.bias": torch.zeros(3)})


def test_live_factors_carry_gradients(tiny_bert_dir: Path) -> None:
    model = lora_bert(tiny_bert_dir, 4)
    penalty = sum(B.square().sum() + A.square().sum() for B, A in live_factors(model).values())
    penalty.backward()
    a_grads = [p.grad for n, p in model.named_parameters() if ".lora_A." in n]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in a_grads)
