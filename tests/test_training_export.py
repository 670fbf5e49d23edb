"""Exported adapters load with PEFT's own `PeftModel.from_pretrained` and reproduce outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from raflora.training.export import save_peft_adapter
from raflora.training.factors import get_dense_trainables, get_factors, lora_shapes, set_factors
from raflora.training.models import build_lora_model, load_base_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def trained_like(folder: Path, task: str, rank: int, rslora: bool, num_labels: int | None):
    """A LoRA model with random non-zero factors and head, standing in for a server's state."""
    base, tokenizer = load_base_model(str(folder), task, num_labels=num_labels, seed=0)
    targets = ["query", "value"] if task == "classification" else ["q_proj", "v_proj"]
    model = build_lora_model(base, rank, 16.0, targets, rslora=rslora)
    generator = torch.Generator().manual_seed(1)
    factors = {
        name: (torch.randn(m, r, generator=generator), torch.randn(r, n, generator=generator))
        for name, (m, n, r) in lora_shapes(model).items()
    }
    set_factors(model, factors, seed=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.ndim == 1:  # head bias
                param.normal_(generator=generator)
    return model, tokenizer, targets


@pytest.mark.parametrize("rslora", [False, True])
def test_classification_adapter_round_trips(tiny_bert_dir: Path, tmp_path: Path, rslora: bool):
    model, tokenizer, targets = trained_like(tiny_bert_dir, "classification", 4, rslora, 3)
    out = save_peft_adapter(str(tiny_bert_dir), "classification", get_factors(model),
                            get_dense_trainables(model), 4, 16.0, rslora, targets,
                            tmp_path / "adapter", num_labels=3)  # fmt: skip
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["use_rslora"], config["task_type"]) == (4, rslora, "SEQ_CLS")
    fresh, _ = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, seed=42)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    batch = tokenizer(["a fine film", "not good at all, sadly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_lower_rank_factors_export_exactly(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, targets = trained_like(tiny_llama_dir, "causal-lm", 2, False, None)
    out = save_peft_adapter(str(tiny_llama_dir), "causal-lm", get_factors(model), {}, 4, 16.0,
                            False, targets, tmp_path / "adapter")  # fmt: skip
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    fresh, _ = load_base_model(str(tiny_llama_dir), "causal-lm")
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    batch = tokenizer(["Question: why?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    again = save_peft_adapter(str(tiny_llama_dir), "causal-lm", get_factors(model), {}, 2, 16.0,
                              False, targets, out)  # fmt: skip
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 2  # replaced


def test_factors_above_the_export_rank_are_rejected(tiny_bert_dir: Path, tmp_path: Path):
    model, _, targets = trained_like(tiny_bert_dir, "classification", 8, False, 2)
    with pytest.raises(ValueError, match="rank 8 > model rank 4"):
        save_peft_adapter(str(tiny_bert_dir), "classification", get_factors(model),
                          get_dense_trainables(model), 4, 16.0, False, targets,
                          tmp_path / "adapter", num_labels=2)  # fmt: skip
    assert not (tmp_path / "adapter").exists()
