"""Model resolution, loading, default LoRA targets and per-rank PEFT models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from raflora.training.factors import get_dense_trainables
from raflora.training.models import (
    ALIASES,
    build_lora_model,
    convert_gguf,
    default_target_modules,
    load_base_model,
    resolve_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _ids(vocab: int = 100, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --- resolve_model -----------------------------------------------------------------------------


def test_resolve_minilm_alias_points_at_the_shipped_folder() -> None:
    folder = Path(resolve_model("minilm"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_resolve_existing_directory_is_returned_as_is(tiny_bert_dir: Path) -> None:
    assert resolve_model(str(tiny_bert_dir)) == str(tiny_bert_dir)


@pytest.mark.parametrize("name", ["no/such-model-xyz", "./missing-folder", "bert"])
def test_resolve_unknown_names_model_path_and_aliases(name: str) -> None:
    with pytest.raises(ValueError) as error:
        resolve_model(name)
    message = str(error.value)
    assert "model.path" in message and name in message
    assert all(alias in message for alias in ALIASES)
    assert "hub id" in message and "directory" in message


def test_hub_id_resolves_only_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert Path(resolve_model("acme/tiny")) == snapshot
    with pytest.raises(ValueError, match="acme/other"):
        resolve_model("acme/other")


def test_cached_aliases_are_not_built_without_materialize(raflora_cache: Path) -> None:
    for alias in ("vit-tiny", "smollm2-135m"):
        folder = Path(resolve_model(alias, materialize=False))
        assert folder.parent == raflora_cache and not folder.exists()


def test_vit_tiny_is_built_once_seeded_and_loads(raflora_cache: Path) -> None:
    folder = Path(resolve_model("vit-tiny"))
    assert folder.parent == raflora_cache and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("vit-tiny") == str(folder)  # cached: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in raflora_cache.iterdir() if p.name.startswith(".tmp")]
    model, tokenizer = load_base_model("vit-tiny", "image-classification", num_labels=10)
    assert tokenizer is None and model.config.image_size == 28
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
    assert logits.shape == (2, 10)


# --- load_base_model ---------------------------------------------------------------------------


def test_load_is_float32_eval_and_seeded_without_touching_global_rng(tiny_bert_dir: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, tokenizer = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, seed=1)
    assert torch.rand(1) == before  # global RNG stream unchanged by loading
    b, _ = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, seed=1)
    c, _ = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, seed=2)
    assert not a.training and a.classifier.weight.dtype == torch.float32
    assert a.classifier.out_features == 3 and tokenizer.pad_token_id == 0
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # pretrained (non-head) weights do not depend on the seed
    assert torch.equal(
        a.bert.encoder.layer[0].attention.self.query.weight,
        c.bert.encoder.layer[0].attention.self.query.weight,
    )


def test_load_rejects_unknown_task(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.task"):
        load_base_model(str(tiny_bert_dir), "regression")


def test_gguf_conversion_reproduces_the_source_model(tiny_llama_gguf, tmp_path: Path) -> None:
    path, source = tiny_llama_gguf
    convert_gguf(path.parent, path.name, tmp_path / "out")
    model, tokenizer = load_base_model(str(tmp_path / "out"), "causal-lm")
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text()
    batch = tokenizer(["Question: what is it?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, source(**batch).logits)
    assert tokenizer.pad_token is not None


def test_causal_lm_classification_head_gets_pad_token(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_base_model(str(tiny_llama_dir), "classification", num_labels=2)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert default_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = build_lora_model(model, 2, 4.0, default_target_modules(model))
    assert set(get_dense_trainables(lora)) == {"score.weight"}


# --- target modules and LoRA -------------------------------------------------------------------


def test_default_targets_for_bert_and_gpt2(tiny_bert_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    bert, _ = load_base_model(str(tiny_bert_dir), "classification")
    assert default_target_modules(bert) == ["query", "value"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    assert default_target_modules(gpt2) == ["c_attn"]
    with pytest.raises(ValueError, match="target_modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.ReLU()))


def test_lora_model_trains_only_lora_and_the_head(tiny_bert_dir: Path) -> None:
    base, _ = load_base_model(str(tiny_bert_dir), "classification", num_labels=2)
    batch = _ids(vocab=1000)
    with torch.no_grad():
        reference = base(**batch).logits.clone()
    model = build_lora_model(base, 4, 8.0, ["query", "value"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)
    assert sum(".lora_A." in n for n in trainable) == 4  # 2 layers × (query, value)
    assert any("classifier.modules_to_save" in n for n in trainable)
    saved = model.peft_config["default"].modules_to_save  # written to adapter_config.json
    assert "classifier" in saved and len(saved) == len(set(saved))
    with torch.no_grad():  # B = 0 at init: the LoRA model computes the base function
        torch.testing.assert_close(model(**batch).logits, reference)
    with pytest.raises(ValueError, match="rank"):
        build_lora_model(
            load_base_model(str(tiny_bert_dir), "classification")[0], 0, 8.0, ["query"]
        )


def test_lora_init_is_seeded(tiny_bert_dir: Path) -> None:
    def first_a(seed: int) -> torch.Tensor:
        base, _ = load_base_model(str(tiny_bert_dir), "classification")
        model = build_lora_model(base, 4, 8.0, ["query", "value"], seed=seed)
        return next(p for n, p in model.named_parameters() if ".lora_A." in n).detach().clone()

    assert torch.equal(first_a(0), first_a(0)) and not torch.equal(first_a(0), first_a(1))


def test_vit_lora_saves_classifier(tiny_vit_dir: Path) -> None:
    base, _ = load_base_model(str(tiny_vit_dir), "image-classification", num_labels=5)
    model = build_lora_model(base, 2, 4.0, default_target_modules(base))
    assert set(get_dense_trainables(model)) == {"classifier.weight", "classifier.bias"}
    assert model(pixel_values=torch.zeros(1, 1, 28, 28)).logits.shape == (1, 5)


# --- shipped models ----------------------------------------------------------------------------


def test_minilm_lora_forward_backward() -> None:
    base, tokenizer = load_base_model("minilm", "classification", num_labels=2)
    assert default_target_modules(base) == ["query", "value"]
    model = build_lora_model(base, 8, 16.0, ["query", "value"])
    texts = ["a gripping, beautifully acted film"] * 16
    batch = tokenizer(
        texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    batch["labels"] = torch.ones(16, dtype=torch.long)
    model.train()
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert torch.isfinite(loss) and len(grads) == 12 and all(g is not None for g in grads)
    print(f"MiniLM rank-8 forward+backward, batch 16 x 64 tokens: {seconds:.3f} s")


@pytest.mark.slow
def test_smollm2_converts_once_and_reloads_fast() -> None:
    folder = Path(resolve_model("smollm2-135m"))  # converts into the user cache the first time
    start = time.perf_counter()
    model, tokenizer = load_base_model("smollm2-135m", "causal-lm")
    seconds = time.perf_counter() - start
    assert str(folder).endswith("smollm2-135m-instruct-fp32")
    assert sum(p.numel() for p in model.parameters()) > 130e6
    assert default_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        next_token = model(**batch).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)
    print(f"SmolLM2-135M load from cache: {seconds:.2f} s")


def test_frozen_head_keeps_its_initial_weights_and_is_not_federated(tiny_bert_dir) -> None:
    """freeze_heads: after local training the head is bit-identical, the LoRA factors moved, and
    the head is no longer among the dense parameters a client sends."""
    import copy

    from raflora.training.data import TextExample, encode_examples
    from raflora.training.factors import get_dense_trainables, get_factors
    from raflora.training.local import train_local
    from raflora.training.models import build_lora_model, freeze_heads, load_base_model

    base, tokenizer = load_base_model(str(tiny_bert_dir), "classification", num_labels=2, seed=0)
    model = build_lora_model(copy.deepcopy(base), 2, 8.0, ["query", "value"], seed=0)
    assert set(get_dense_trainables(model)) == {"classifier.weight", "classifier.bias"}
    assert freeze_heads(model) == 2
    assert get_dense_trainables(model) == {}
    head = {k: v.clone() for k, v in model.state_dict().items() if "classifier" in k}
    before = {k: b.clone() for k, (b, _) in get_factors(model).items()}
    data = encode_examples(
        [TextExample("good", 1), TextExample("bad", 0)] * 4, tokenizer=tokenizer, max_length=8
    )
    train_local(model, data, steps=3, batch_size=4, lr=1e-2, seed=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in head.items())
    assert any(not torch.equal(before[k], b) for k, (b, _) in get_factors(model).items())
