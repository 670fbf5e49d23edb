"""`raflora run --dry-run`: check a run end to end without training, and say what it will cost.

In the order a run meets them: the config (already validated), the devices (`preflight`), the
data files and every client's share (`preflight.check_data`), the model folder and its weight
files, the architecture (built on PyTorch's ``meta`` device from its config: no weights are
read, so an 8B model costs nothing), the LoRA target modules, every client's rank against the
widths of those layers, and then:

- bytes per round (from round 2 on; round 1 sends no LoRA factors): client k receives and
  returns its rank-r_k factors and the dense trainables (task heads), ``s · (r_k · P₁ + D)``
  bytes each way (s = 4 for ``federation.wire_dtype = "float32"``, 2 for float16 and
  bfloat16), P₁ = Σ_layers (m + n), plus Flower's per-array framing: the
  number is `messages.pack`'s own count for arrays of those shapes, as the run counts it; a
  round moves that for every sampled client;
- memory per client (an estimate; a run with ``clients.memory_budgets_mb`` measures instead):
  the base's weights in ``model.dtype`` plus 16 bytes per trainable parameter (float32 weight,
  gradient, AdamW's two moments), activations not included.

Any failure is one line (`DryRunError`), as for a real run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raflora.config import Config, ConfigError
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.federation.preflight import (
    RunSetupError,
    check_data,
    check_devices,
    check_tracker_packages,
)
from raflora.federation.server import check_ranks_fit
from raflora.federation.strategy import NodeInfo
from raflora.training.models import _auto_class, default_modules_to_save, resolve_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class DryRunError(ValueError):
    """The run would fail: one line naming the config field or file."""


def weight_files(folder: Path) -> list[Path]:
    """The weight files a model folder holds (safetensors, PyTorch .bin, GGUF)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def meta_model(config: Config, num_labels: int | None) -> nn.Module:
    """The architecture of ``model.path`` on the ``meta`` device: shapes without weights."""
    from transformers import AutoConfig

    folder = resolve_model(config.model.path)
    kwargs: dict[str, Any] = {}
    if config.model.task != "causal-lm":
        kwargs["num_labels"] = num_labels or 2
    try:
        model_config = AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as error:
        raise DryRunError(
            f"model.path {config.model.path!r}: no usable config.json ({error})"
        ) from None
    with torch.device("meta"):
        return _auto_class(config.model.task).from_config(model_config)


def target_layers(config: Config, model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (m, n)}`` of the LoRA targets (out × in), as PEFT will wrap them."""
    from transformers.pytorch_utils import Conv1D

    names = set(task.target_modules(config, model))
    layers = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names:
            continue
        if isinstance(module, nn.Linear):
            layers[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            n, m = module.weight.shape
            layers[name] = (int(m), int(n))
    if not layers:
        raise DryRunError(
            f"model.target_modules: no linear layer named {sorted(names)} in "
            f"{type(model).__name__}; set model.target_modules to layers it has"
        )
    return layers


def dense_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Stable names and shapes of the task heads trained and federated densely."""
    return {
        f"{name}.{param_name}": tuple(param.shape)
        for name in default_modules_to_save(model)
        for param_name, param in model.get_submodule(name).named_parameters()
    }


def payload_bytes(
    layers: dict[str, tuple[int, int]],
    rank: int,
    dense: dict[str, tuple[int, ...]],
    wire_dtype: str = "float32",
) -> int:
    """Bytes of one message carrying rank-``rank`` factors of ``layers`` and the dense
    tensors in ``wire_dtype``, as Flower counts them (`messages.pack`; zeros: nothing is
    computed)."""
    lora = {
        name: (np.zeros((m, rank), np.float32), np.zeros((rank, n), np.float32))
        for name, (m, n) in layers.items()
    }
    heads = {name: np.zeros(shape, np.float32) for name, shape in dense.items()}
    return int(msg.pack(lora=lora, dense=heads, wire_dtype=wire_dtype).count_bytes())


def _adapter_wire(config: Config) -> bool:
    """Whether a round's messages are exactly each client's rank-r_k factors both ways (no
    merged rounds, residual or B-only factors on the wire)."""
    method = task.method_options(config)[0]
    merges = config.federation.apply_mode == "merge" or method.residual is not None
    return not merges and not method.frozen_a


def dry_run(config: Config) -> dict[str, Any]:
    """Every check of the module docstring; returns what it found (JSON-ready)."""
    try:
        check_devices(config, clients_here=True)
        check_tracker_packages(config)
        check_data(config)
    except RunSetupError as error:
        raise DryRunError(str(error)) from None
    from raflora.federation.preflight import simulated_client_device

    data = task.load_data(config.to_json())
    shares = task.client_shares(config, data)
    folder = Path(resolve_model(config.model.path))
    files = weight_files(folder)
    if not files:
        raise DryRunError(
            f"model.path {config.model.path!r}: {folder} holds no weight files "
            f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
        )
    model = meta_model(config, task.model_num_labels(config, data))
    if config.train.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise DryRunError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
            "set it to false"
        )
    try:
        layers = target_layers(config, model)
    except ValueError as error:  # no default targets for the architecture
        raise DryRunError(str(error)) from None
    try:
        ranks = task.client_ranks(config, model)
        nodes = [NodeInfo(0, pid, rank, len(shares[pid])) for pid, rank in enumerate(ranks)]
        check_ranks_fit(nodes, layers)
    except (ConfigError, ValueError) as error:
        raise DryRunError(str(error)) from None
    per_rank = sum(m + n for m, n in layers.values())
    heads = dense_shapes(model)
    dense = sum(int(np.prod(shape)) for shape in heads.values())
    wire = config.federation.wire_dtype
    bytes_each = [2 * payload_bytes(layers, rank, heads, wire) for rank in ranks]
    sampled = max(1, round(config.federation.fraction_train * len(ranks)))
    per_round = (
        sum(bytes_each) if sampled == len(ranks) else round(sampled * sum(bytes_each) / len(ranks))
    )
    itemsize = torch.empty((), dtype=getattr(torch, config.model.dtype)).element_size()
    base_params = sum(p.numel() for p in model.parameters())
    memory = [(base_params * itemsize + 16 * (rank * per_rank + dense)) / 2**20 for rank in ranks]
    widths = sorted({(m, n) for m, n in layers.values()})
    return {
        "model": {
            "path": config.model.path,
            "folder": str(folder),
            "architecture": type(model).__name__,
            "parameters": base_params,
            "weight_files": len(files),
            "weight_mb": sum(p.stat().st_size for p in files) / 2**20,
            "dtype": config.model.dtype,
        },
        "devices": {
            "clients": str(simulated_client_device(config)),
            "server": str(task.server_device(config)),
        },
        "data": {
            "train": len(data.train),
            "test": len(data.test),
            "client_sizes": [len(share) for share in shares],
        },
        "target_modules": {
            "names": task.target_modules(config, model),
            "layers": len(layers),
            "shapes": [f"{m}x{n}" for m, n in widths],
            "lora_params_per_rank": per_rank,
        },
        "ranks": ranks,
        "dense_params": dense,
        "sampled_per_round": sampled,
        "bytes_per_round": per_round,
        # the count above is the adapter wire's (each client's rank-r_k factors both ways);
        # exact for methods that send nothing else, an estimate for the others
        "bytes_exact": _adapter_wire(config),
        "wire": task.method_options(config)[0].wire,
        "memory_mb": memory,
    }
