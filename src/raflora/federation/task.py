"""What a run trains on, derived from the `Config` alone (Flower's ``task.py``).

Server and clients call the same functions with the same config and seed, so they agree on
the data split, every client's share and rank, and the initial head without exchanging them.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from raflora.config import DEFAULT_RANKS, Config
from raflora.math import get_method
from raflora.training import (
    TaskData,
    build_lora_model,
    default_target_modules,
    encode_examples,
    live_factors,
    load_base_model,
    load_task_data,
    lora_params_per_rank,
    partition_dirichlet,
    partition_iid,
    ranks_from_list,
    ranks_from_memory,
    ranks_from_tiers,
    shared_lora_A,
    take,
)
from raflora.training.device import check_quantization, resolve_device, resolve_dtype
from raflora.training.local import batch_loss
from raflora.training.models import enable_gradient_checkpointing, freeze_heads
from raflora.training.ranks import base_memory_mb, measure_rank_memory, ranks_within_budgets


def derived_seed(seed: int, *parts: int | str) -> int:
    """A 31-bit seed for one purpose, e.g. ``derived_seed(seed, "train", round, client)``."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@lru_cache(maxsize=2)
def load_data(config_json: str) -> TaskData:
    """The task's train/test examples (cached per process: clients reuse it across rounds)."""
    config = Config.model_validate_json(config_json)
    data = config.data
    return load_task_data(
        data.name,
        task=config.model.task,
        seed=config.run.seed,
        train_size=data.train_size or None,
        test_size=data.test_size or None,
        text_field=data.text_field,
        label_field=data.label_field,
        labels=data.labels,
    )


def partition_labels(data: TaskData) -> np.ndarray:
    """What non-IID skew is over: the class, or the source task in a multiple-choice mixture."""
    if data.kind == "multiple-choice" and len(data.tasks) > 1:
        names = sorted(data.tasks)
        return np.array([names.index(example.task) for example in data.train], dtype=np.int64)
    return data.labels("train")


def client_shares(config: Config, data: TaskData) -> list[np.ndarray]:
    """Indices into ``data.train`` per client, reproducible from the seed."""
    num, seed = config.clients.num_clients, derived_seed(config.run.seed, "partition")
    if config.data.partition == "iid":
        return partition_iid(len(data.train), num, seed, min_size=config.data.min_client_size)
    return partition_dirichlet(
        partition_labels(data),
        num,
        config.data.dirichlet_alpha,
        seed,
        min_size=config.data.min_client_size,
    )


def local_split(config: Config, share: np.ndarray, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's share into local train / local validation indices (seeded)."""
    fraction = config.data.local_val_fraction
    n_val = round(fraction * len(share)) if fraction > 0 and len(share) > 1 else 0
    n_val = min(n_val, len(share) - 1)  # a client always keeps a training example
    order = np.random.default_rng(derived_seed(config.run.seed, "val", client)).permutation(share)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def target_modules(config: Config, base: nn.Module) -> list[str]:
    return list(config.model.target_modules) or default_target_modules(base)


def memory_budgets(config: Config) -> list[float]:
    """One memory budget (MiB) per client (a single value applies to all)."""
    budgets = list(config.clients.memory_budgets_mb or [])
    return budgets * config.clients.num_clients if len(budgets) == 1 else budgets


def client_ranks(
    config: Config,
    base: nn.Module | None = None,
    memory_need_mb: dict[int, float] | None = None,
) -> list[int]:
    """Every client's LoRA rank from the configured source (list, tiers or memory budgets:
    against ``memory_need_mb`` per candidate rank when given (`measured_memory_mb`), else
    against the closed-form estimate for ``base``)."""
    clients = config.clients
    if clients.rank_tiers is not None:
        return ranks_from_tiers(clients.num_clients, clients.rank_tiers, config.run.seed)
    if clients.memory_budgets_mb is not None:
        if memory_need_mb is not None:
            return ranks_within_budgets(memory_budgets(config), memory_need_mb)
        if base is None:
            raise ValueError("memory-budget ranks need the base model")
        per_rank = lora_params_per_rank(base, target_modules(config, base))
        return ranks_from_memory(
            memory_budgets(config), per_rank, base_memory_mb(base), clients.candidate_ranks
        )
    return ranks_from_list(list(clients.ranks or DEFAULT_RANKS), clients.num_clients)


def train_device(config: Config) -> tuple[torch.device, torch.dtype]:
    """Where this process's clients train (``train.device``) and the base's dtype
    (``model.dtype``), checked against the machine (raises ``DeviceError``)."""
    device = resolve_device(config.train.device, "train.device")
    return device, resolve_dtype(config.model.dtype, device)


def server_device(config: Config) -> torch.device:
    """Where the server aggregates, decomposes and evaluates (``federation.server_device``;
    ``auto``: the first CUDA device, else the CPU, never MPS, which lacks float64)."""
    device = resolve_device(config.federation.server_device, "federation.server_device")
    return torch.device("cpu") if device.type == "mps" else device


def probe_batch(config: Config, data: TaskData, tokenizer: Any, base: nn.Module) -> Any:
    """The ``train.batch_size`` longest training examples (by characters), collated: the batch
    every client measures its memory on (the same for all, whatever their share)."""

    def size(example: Any) -> int:
        texts = [getattr(example, key, None) for key in ("text", "text_pair", "prompt")]
        choices = getattr(example, "choices", None) or [""]
        return sum(len(t) for t in texts if t) + max(len(c) for c in choices)

    order = sorted(range(len(data.train)), key=lambda i: -size(data.train[i]))
    encoded = encode(config, take(data.train, order[: config.train.batch_size]), tokenizer, base)
    return encoded.collate([encoded[i] for i in range(len(encoded))])


def measured_memory_mb(
    config: Config,
    base: nn.Module,
    batch: Any,
    device: torch.device,
    precision: torch.dtype,
) -> dict[int, float]:
    """MiB of one training step at every ``clients.candidate_ranks`` rank, measured with this
    run's model on ``device`` in ``precision`` (`measure_rank_memory`)."""

    def build(rank: int) -> nn.Module:
        return placed(config, lora_model(config, base, rank, seed=config.run.seed), device)

    return measure_rank_memory(build, batch, batch_loss, config.clients.candidate_ranks, precision)


@lru_cache(maxsize=2)
def load_base(
    config_json: str, num_labels: int, quantized_on: str = "cpu"
) -> tuple[nn.Module, Any]:
    """Base model (on the CPU, weights in ``model.dtype``) and tokenizer (cached per process;
    callers deep-copy before wrapping and move the copy to their device). A quantised base
    (``model.quantization``) is loaded straight onto ``quantized_on``, a CUDA device."""
    config = Config.model_validate_json(config_json)
    return load_base_model(
        config.model.path,
        config.model.task,
        num_labels=num_labels,
        seed=config.run.seed,
        dtype=getattr(torch, config.model.dtype),
        quantization=config.model.quantization,
        device=torch.device(quantized_on),
    )


def placed(config: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``; a quantised model is already on its device (bitsandbytes models
    refuse ``.to``)."""
    return model if config.model.quantization != "none" else model.to(device)


def base_placement(config: Config, device: torch.device) -> str:
    """`load_base`'s ``quantized_on``: the caller's device for a quantised base (after
    `check_quantization`), else ``"cpu"`` (unquantised bases load on the CPU)."""
    if config.model.quantization == "none":
        return "cpu"
    check_quantization(config.model.quantization, device)
    return str(device)


def model_num_labels(config: Config, data: TaskData) -> int | None:
    return None if config.model.task == "causal-lm" else data.num_labels


def lora_model(config: Config, base: nn.Module, rank: int, seed: int) -> nn.Module:
    """A PEFT LoRA model of rank `rank` on a private copy of `base`."""
    model = config.model
    peft_model = build_lora_model(
        copy.deepcopy(base),
        rank,
        model.lora_alpha,
        target_modules(config, base),
        rslora=model.rslora,
        dropout=model.lora_dropout,
        seed=seed,
    )
    apply_head_policy(config, peft_model)
    if config.train.gradient_checkpointing:  # acts in train mode only; evaluation is unchanged
        enable_gradient_checkpointing(peft_model)
    return peft_model


def apply_head_policy(config: Config, peft_model: nn.Module) -> None:
    """``model.train_head = false``: the task head stays frozen (not trained, not federated).
    PEFT's ``set_adapter`` makes the active head copy trainable again: switch adapters with
    `activate_adapter`, which applies the policy after it."""
    if not config.model.train_head:
        freeze_heads(peft_model)


def activate_adapter(config: Config, peft_model: Any, name: str) -> None:
    """Make adapter ``name`` the one that trains (PEFT ``set_adapter``), head policy kept."""
    peft_model.set_adapter(name)
    apply_head_policy(config, peft_model)


def encode(config: Config, examples: list, tokenizer: Any, base: nn.Module) -> Any:
    """Tensors for a list of examples (tokenised text, or images sized for the model)."""
    model_config = getattr(base, "config", None)
    return encode_examples(
        examples,
        tokenizer=tokenizer,
        max_length=config.model.max_length,
        image_size=getattr(model_config, "image_size", None),
        num_channels=getattr(model_config, "num_channels", 1),
    )


def method_options(config: Config) -> Any:
    """The run's method and its validated options."""
    method = get_method(config.federation.method)
    return method, method.build_options(**config.federation.options)


def method_regularizer(config: Config) -> Any:
    """The method's client-side penalty summed over modules, ``Σ_modules term(B, A)`` (e.g.
    HetLoRA's ``λ ‖B[:, γr:]‖·‖A[γr:, :]‖``), or None when the method adds none."""
    method, options = method_options(config)
    term = method.penalty(options)
    if term is None:
        return None

    def penalty(model: nn.Module) -> Any:
        return sum(term(B, A) for B, A in live_factors(model).values())

    return penalty


def shared_a(config: Config, name: str, rank: int, n: int) -> np.ndarray:
    """A frozen-A method's shared A_0[:rank] (rank, n) for module ``name``, float32: the same
    on the server and every client, in every round (seeded by the run seed and the module)."""
    seed = derived_seed(config.run.seed, "frozen-a")
    return shared_lora_A(seed, name, rank, n).numpy()


def shared_a_rows(
    config: Config, in_features: Callable[[str], int], max_rank: int
) -> Callable[[str, int], np.ndarray]:
    """``(module, r) → A_0[:r]`` for `messages.unpack` of a frozen-A method's B-only arrays;
    refuses (ValueError, KeyError) ranks outside 1..max_rank and modules ``in_features`` does
    not know. One draw of A_0[:max_rank] per module, then slices."""
    drawn: dict[str, np.ndarray] = {}

    def rows(name: str, rank: int) -> np.ndarray:
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank {rank} is outside 1..{max_rank}")
        if name not in drawn:
            drawn[name] = shared_a(config, name, max_rank, in_features(name))
        return drawn[name][:rank]

    return rows


def frozen_a_start(
    config: Config,
    shapes: Mapping[str, tuple[int, int, int]],
    lora: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A frozen-A client's start for every module (m, n, r) of its model: the received B
    (m, r') with zero columns up to r, and the shared A_0[:r] (FFA-LoRA)."""
    start = {}
    for name, (m, n, r) in shapes.items():
        B = np.zeros((m, r), np.float32)
        if name in lora:
            received = np.asarray(lora[name][0], np.float32)
            if received.ndim != 2 or received.shape[0] != m or received.shape[1] > r:
                raise ValueError(
                    f"factors for {name!r}: B of shape {received.shape} does not fit a rank-{r} "
                    f"model (needs ({m}, ≤ {r}))"
                )
            B[:, : received.shape[1]] = received
        start[name] = (B, shared_a(config, name, r, n))
    return start


@dataclass(frozen=True)
class ClientData:
    """One client's encoded local data."""

    train: Any
    val: Any | None
    num_examples: int  # distinct local training examples (the aggregation weight)


def client_data(config: Config, data: TaskData, client: int, tokenizer: Any, base: nn.Module):
    share = client_shares(config, data)[client]
    train_idx, val_idx = local_split(config, share, client)
    train = encode(config, take(data.train, train_idx), tokenizer, base)
    val = encode(config, take(data.train, val_idx), tokenizer, base) if len(val_idx) else None
    return ClientData(train, val, len(train_idx))
