"""The client's round without Flower or Ray, on a tiny randomly initialised BERT."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from raflora.config import Config, load_config
from raflora.federation import client as work
from raflora.federation import task
from raflora.training import evaluate, get_dense_trainables, get_factors, lora_shapes

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.toml"


def tiny_config(model_dir: Path, *overrides: str) -> Config:
    return load_config(
        TINY,
        [
            f"model.path={model_dir}",
            "data.train_size=90",
            "data.test_size=20",
            "model.max_length=24",
            "train.local_steps=2",
            "train.batch_size=8",
            "train.threads=0",
            "data.local_val_fraction=0.2",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def config(tiny_bert_dir: Path) -> Config:
    return tiny_config(tiny_bert_dir)


@pytest.fixture(scope="module")
def ctx(config: Config) -> work.ClientContext:
    return work.client_context(config.to_json(), 2)


def global_factors(ctx: work.ClientContext, rank: int, seed: int = 0) -> dict:
    model = task.lora_model(ctx.config, ctx.base, 1, seed=0)
    rng = np.random.default_rng(seed)
    return {
        name: (
            (0.05 * rng.standard_normal((m, rank))).astype(np.float32),
            rng.standard_normal((rank, n)).astype(np.float32),
        )
        for name, (m, n, _) in lora_shapes(model).items()
    }


def test_context_reads_rank_and_data_from_the_config(config: Config, ctx) -> None:
    assert (ctx.partition_id, ctx.rank) == (2, 8)  # tiny.toml: ranks 2, 4, 8
    assert ctx.data.num_examples == len(ctx.data.train) > 0
    assert ctx.data.val is not None and len(ctx.data.val) > 0
    other = work.client_context(config.to_json(), 0)
    shares = task.client_shares(config, task.load_data(config.to_json()))
    assert other.data.num_examples + len(other.data.val) == len(shares[0])
    assert work.client_context(config.to_json(), 0, node_rank=16).rank == 16  # node's own rank
    with pytest.raises(ValueError, match="partition-id 3 out of range"):
        work.client_context(config.to_json(), 3)


def test_the_round_model_starts_from_the_allocated_factors(ctx) -> None:
    lora = global_factors(ctx, 3)
    model = work.build_round_model(ctx, 8, lora, {}, {}, seed=5)
    got = get_factors(model)
    assert set(got) == set(lora)
    for name, (B, A) in lora.items():
        Bm, Am = (x.numpy() for x in got[name])
        assert Bm.shape[1] == Am.shape[0] == 8  # the client's own rank
        np.testing.assert_allclose(Bm @ Am, B @ A, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(Am[:3], A)  # given directions first, fresh ones after
        assert not Bm[:, 3:].any()


def test_train_round_returns_folded_factors_of_the_clients_rank(ctx) -> None:
    lora = global_factors(ctx, 8)
    heads = get_dense_trainables(task.lora_model(ctx.config, ctx.base, 1, seed=0))
    factors, dense, metrics = work.train_round(ctx, 1, 8, lora, {}, {})
    assert set(factors) == set(lora)
    for name, (B, A) in factors.items():
        assert B.dtype == A.dtype == np.float32
        assert B.shape == lora[name][0].shape and A.shape == lora[name][1].shape
        assert not np.allclose(B @ A, lora[name][0] @ lora[name][1])  # it trained
    assert set(dense) == set(heads) == {"classifier.weight", "classifier.bias"}
    assert all(dense[k].shape == tuple(heads[k].shape) for k in heads)
    assert metrics["num-examples"] == ctx.data.num_examples
    assert (metrics["rank"], metrics["partition-id"]) == (8, 2)
    assert np.isfinite(metrics["train-loss"]) and metrics["seconds"] >= 0


def test_train_round_is_reproducible(ctx) -> None:
    lora = global_factors(ctx, 8)
    first = work.train_round(ctx, 2, 8, lora, {}, {})
    second = work.train_round(ctx, 2, 8, lora, {}, {})
    for name in first[0]:
        assert all(
            np.array_equal(a, b) for a, b in zip(first[0][name], second[0][name], strict=True)
        )
    assert first[2]["train-loss"] == second[2]["train-loss"]
    third = work.train_round(ctx, 3, 8, lora, {}, {})  # another round: another seed
    assert third[2]["train-loss"] != first[2]["train-loss"]


def test_merge_into_base_adds_the_product(ctx) -> None:
    merged = global_factors(ctx, 4, seed=1)
    base = copy.deepcopy(ctx.base)
    before = {name: base.get_submodule(name).weight.detach().clone() for name in merged}
    work.merge_into_base(base, merged)
    for name, (B, A) in merged.items():
        expected = before[name].numpy().astype(np.float64) + B.astype(np.float64) @ A
        np.testing.assert_allclose(
            base.get_submodule(name).weight.detach().numpy(), expected, atol=1e-6
        )


def test_merge_into_base_transposes_conv1d() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    layer = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in=16, out=48)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
    rng = np.random.default_rng(0)
    B, A = (
        rng.standard_normal((48, 2)).astype(np.float32),
        rng.standard_normal((2, 16)).astype(np.float32),
    )
    work.merge_into_base(model, {"transformer.h.0.attn.c_attn": (B, A)})
    with torch.no_grad():
        after = layer(x)
    np.testing.assert_allclose((after - before).numpy(), x.numpy() @ (B @ A).T, atol=1e-5)


def test_merge_mode_round_model_is_base_plus_merged_update(ctx) -> None:
    merged = global_factors(ctx, 5, seed=2)
    before = {k: v.clone() for k, v in ctx.base.state_dict().items()}
    model = work.build_round_model(ctx, 4, {}, merged, {}, seed=1)
    assert all(torch.equal(before[k], v) for k, v in ctx.base.state_dict().items())  # untouched
    inner = model.get_base_model()
    for name, (B, A) in merged.items():
        layer = inner.get_submodule(name)
        expected = before[f"{name}.weight"].numpy().astype(np.float64) + B.astype(np.float64) @ A
        np.testing.assert_allclose(layer.base_layer.weight.detach().numpy(), expected, atol=1e-6)
    for B, _ in get_factors(model).values():  # a fresh LoRA: zero product
        assert B.shape[1] == 4 and not B.any()


def test_merged_factors_stack_the_required_rounds_in_order_and_refuse_a_gap() -> None:
    rng = np.random.default_rng(0)

    def round_factors(rank: int) -> dict:
        return {"q": (rng.standard_normal((6, rank)), rng.standard_normal((rank, 5)))}

    r1, r2, r4 = round_factors(2), round_factors(3), round_factors(1)
    stale = round_factors(3)  # what the client holds wins over a resent copy
    merged = work.merged_factors([1, 2, 4], {1: r1, 2: r2}, {2: stale, 4: r4}, refusal="no")
    B, A = merged["q"]
    assert B.shape == (6, 6) and A.shape == (6, 5)
    np.testing.assert_array_equal(B, np.concatenate([r1["q"][0], r2["q"][0], r4["q"][0]], 1))
    expected = sum(f["q"][0] @ f["q"][1] for f in (r1, r2, r4))
    np.testing.assert_allclose(B @ A, expected, atol=1e-12)
    assert work.merged_factors([], {}, {3: r4}, refusal="no") == {}  # nothing required
    with pytest.raises(work.MissingMergedRounds, match=r"^missing rounds \[1, 3\]: "):
        work.merged_factors([1, 2, 3], {2: r2}, {}, refusal="missing rounds")


def test_evaluate_round_matches_the_training_layers_evaluate(ctx) -> None:
    lora = global_factors(ctx, 8, seed=3)
    metrics = work.evaluate_round(ctx, 8, lora, {}, {})
    model = work.build_round_model(ctx, 8, lora, {}, {}, seed=ctx.config.run.seed)
    expected = evaluate(model, ctx.data.val, batch_size=ctx.config.eval.batch_size)
    assert metrics["num-examples"] == len(ctx.data.val)
    assert metrics["val-accuracy"] == pytest.approx(expected["accuracy"], abs=0)
    assert metrics["val-loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_hetlora_pruning_lowers_every_module_to_one_rank(tiny_bert_dir: Path) -> None:
    config = tiny_config(
        tiny_bert_dir,
        "federation.method=hetlora",
        "federation.options.prune_threshold=1e9",
        "federation.options.gamma=0.5",
    )
    rng = np.random.default_rng(0)
    factors = {
        f"m{i}": (
            rng.standard_normal((6, 8)).astype(np.float32),
            rng.standard_normal((8, 5)).astype(np.float32),
        )
        for i in range(2)
    }
    pruned = work.method_prune(config, factors)
    ranks = {A.shape[0] for _, A in pruned.values()} | {B.shape[1] for B, _ in pruned.values()}
    assert len(ranks) == 1 and ranks.pop() < 8
    for name, (B, A) in pruned.items():
        r = A.shape[0]
        assert np.array_equal(B, factors[name][0][:, :r]) and np.array_equal(
            A, factors[name][1][:r]
        )
    assert work.method_prune(tiny_config(tiny_bert_dir), factors) is factors  # raflora
    off = tiny_config(
        tiny_bert_dir, "federation.method=hetlora", "federation.options.prune_threshold=0"
    )
    assert work.method_prune(off, factors) is factors
