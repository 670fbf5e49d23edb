"""A client's work in one round, without Flower: build the rank-r_k model, train, report.

The client receives its allocated factors (``B (m, r)``, ``A (r, n)``, scaling folded in),
unfolds them into a PEFT LoRA model of its rank, trains locally, and returns the folded
factors of the trained model. In merge mode it first adds the server's merged update to the
base weights, ``W ← W + B_g A_g``, and starts from a fresh LoRA.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from raflora.config import Config
from raflora.federation import task
from raflora.training import (
    configure_threads,
    evaluate,
    get_dense_trainables,
    get_factors,
    in_features,
    lora_shapes,
    set_dense_trainables,
    set_factors,
    set_lora_A_trainable,
    train_local,
)
from raflora.training.device import keep_trainables_float32

Factors = tuple[np.ndarray, np.ndarray]
Merged = tuple[np.ndarray, np.ndarray | None]  # factors (B, A), or (D (m, n), None) dense


@dataclass(frozen=True)
class ClientContext:
    """What one client keeps between rounds in a process (rebuilt from the config alone)."""

    config: Config
    partition_id: int
    base: nn.Module
    tokenizer: Any
    data: task.ClientData
    rank: int  # the rank this client trains (config, or its node's own `rank` setting)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # train.device
    precision: torch.dtype = torch.float32  # the base's dtype = autocast dtype (model.dtype)


@lru_cache(maxsize=8)
def client_context(config_json: str, partition_id: int, node_rank: int = 0) -> ClientContext:
    """Load (once per process) the base model (kept on the CPU; round models move to the
    client's device) and this client's encoded data; resolve its device and rank (memory
    budgets: measured on that device, `task.measured_memory_mb`)."""
    config = Config.model_validate_json(config_json)
    if not 0 <= partition_id < config.clients.num_clients:
        raise ValueError(
            f"partition-id {partition_id} out of range for clients.num_clients="
            f"{config.clients.num_clients}"
        )
    device, precision = task.train_device(config)
    data = task.load_data(config_json)
    placement = task.base_placement(config, device)
    base, tokenizer = task.load_base(config_json, task.model_num_labels(config, data), placement)
    local = task.client_data(config, data, partition_id, tokenizer, base)
    rank = node_rank
    if not rank:
        need = None
        if config.clients.memory_budgets_mb is not None:
            batch = task.probe_batch(config, data, tokenizer, base)
            need = task.measured_memory_mb(config, base, batch, device, precision)
        rank = task.client_ranks(config, base, need)[partition_id]
    return ClientContext(config, partition_id, base, tokenizer, local, rank, device, precision)


def merge_into_base(base: nn.Module, merged: dict[str, Merged]) -> None:
    """``W ← W + B A`` for each merged module, or ``W ← W + D`` for a dense ``(D, None)``
    (GPT-2 Conv1D weights are stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for name, (B, A) in merged.items():
            layer = base.get_submodule(name)
            product = np.asarray(B, np.float32)
            if A is not None:
                product = product @ np.asarray(A, np.float32)
            delta = torch.from_numpy(np.ascontiguousarray(product))
            weight = layer.weight
            weight += (delta.T if isinstance(layer, Conv1D) else delta).to(weight)


class MissingMergedRounds(ValueError):
    """The server expects the base to contain merged rounds this client never received."""


def merged_factors(
    required: list[int],
    held: dict[int, dict[str, Merged]],
    sent: dict[int, dict[str, Merged]],
    *,
    refusal: str,
) -> dict[str, Merged]:
    """Everything merged into the base so far, per module, as one pair of stacked factors
    ``[B_t1 … B_tj] [A_t1; …; A_tj]`` over the ``required`` rounds in order (Σ_t B_t A_t);
    if any round came dense ``(D_t, None)``, the dense sum ``(Σ_t B_t A_t + Σ_t D_t, None)``.

    A round comes from ``held`` (merged before) or else ``sent`` (new in this message);
    raises `MissingMergedRounds` (its message starts with ``refusal``, which the server
    recognises) if a required round is in neither."""
    missing = [t for t in required if t not in held and t not in sent]
    if missing:
        raise MissingMergedRounds(
            f"{refusal} {missing}: this client's state lacks them (a restarted node "
            "or a run resumed elsewhere); the server resends every round next time"
        )
    rounds = [held[t] if t in held else sent[t] for t in sorted(required)]
    names = sorted({name for factors in rounds for name in factors})
    out: dict[str, Merged] = {}
    for name in names:
        parts = [factors[name] for factors in rounds if name in factors]
        stacked = [(B, A) for B, A in parts if A is not None]
        dense = [D for D, A in parts if A is None]
        if stacked:
            out[name] = (
                np.concatenate([B for B, _ in stacked], axis=1),
                np.concatenate([A for _, A in stacked], axis=0),
            )
        if dense:  # (m, n): the dense rounds summed, plus the factored ones' product
            total = np.array(dense[0], np.float32)
            for D in dense[1:]:
                total += D
            if stacked:
                total += out[name][0].astype(np.float32) @ out[name][1].astype(np.float32)
            out[name] = (total, None)
    return out


def build_round_model(
    ctx: ClientContext,
    rank: int,
    lora: dict[str, Factors],
    merged: dict[str, Merged],
    dense: dict[str, np.ndarray],
    seed: int,
) -> nn.Module:
    """The model a client starts the round from."""
    base = ctx.base
    if merged:  # merge mode: a private copy of the base with the global update merged in
        base = copy.deepcopy(base)
        merge_into_base(base, merged)
    model = task.placed(ctx.config, task.lora_model(ctx.config, base, rank, seed), ctx.device)
    set_factors(model, lora, seed=seed)
    if dense:
        set_dense_trainables(model, {k: torch.from_numpy(v) for k, v in dense.items()})
    return model


@dataclass
class RoundModels:
    """A process's reusable adapter-mode model for one base: ONE PEFT copy of the base with one
    LoRA adapter per rank seen (``"default"`` for the first), and each adapter's initial head."""

    model: nn.Module
    adapters: dict[int, str] = field(default_factory=dict)  # rank → adapter name
    heads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # rank → init head


# base model → its RoundModels; weak, so it goes with the base when the context caches clear
_ROUND_MODELS: weakref.WeakKeyDictionary[nn.Module, RoundModels] = weakref.WeakKeyDictionary()


def reused_round_model(
    ctx: ClientContext,
    rank: int,
    lora: dict[str, Factors],
    dense: dict[str, np.ndarray],
    seed: int,
) -> nn.Module:
    """`build_round_model` in adapter mode without rebuilding the model every round.

    Copying the base and injecting LoRA (`get_peft_model`) costs more than a few training
    steps, so the copy is made once per process and base; each rank gets its own adapter on it
    (activated with ``set_adapter``, so only its parameters train). Every round then overwrites
    all trainable state: the LoRA factors (`set_factors`: given directions, seeded fresh init
    for the rest) and the head (the received one, or the adapter's initial copy), which makes
    the model equal, parameter for parameter, to a freshly built one.
    """
    slot = _ROUND_MODELS.get(ctx.base)
    if slot is None:
        model = task.lora_model(ctx.config, ctx.base, rank, seed)
        model = task.placed(ctx.config, model, ctx.device)
        slot = _ROUND_MODELS[ctx.base] = RoundModels(model, {rank: "default"})
        slot.heads[rank] = get_dense_trainables(model)
    model = slot.model
    if rank not in slot.adapters:
        name = slot.adapters[rank] = f"rank{rank}"
        config = dataclasses.replace(model.peft_config["default"], r=rank)
        with torch.random.fork_rng(devices=[]):  # its init is overwritten; keep the caller's RNG
            model.add_adapter(name, config)
        task.activate_adapter(ctx.config, model, name)
        keep_trainables_float32(model)  # PEFT builds a new adapter in the base's dtype
        slot.heads[rank] = get_dense_trainables(model)
    task.activate_adapter(ctx.config, model, slot.adapters[rank])
    set_factors(model, lora, seed=seed)
    head = {k: torch.from_numpy(v) for k, v in dense.items()} if dense else slot.heads[rank]
    if head:
        set_dense_trainables(model, head)
    return model


def round_model(
    ctx: ClientContext,
    rank: int,
    lora: dict[str, Factors],
    merged: dict[str, Merged],
    dense: dict[str, np.ndarray],
    seed: int,
) -> nn.Module:
    """The round's model: reused in adapter mode, built afresh on the merged base otherwise."""
    if merged:
        return build_round_model(ctx, rank, lora, merged, dense, seed)
    return reused_round_model(ctx, rank, lora, dense, seed)


def method_start(config: Config, model: nn.Module, lora: dict[str, Factors]) -> None:
    """The method's own start on the built round model: a frozen-A method (FFA-LoRA) sets
    every module to the received B (zero beyond it) with the shared A_0[:r] and freezes A;
    every other method trains A."""
    method, _ = task.method_options(config)
    if method.frozen_a:
        set_factors(model, task.frozen_a_start(config, lora_shapes(model), lora), seed=0)
    set_lora_A_trainable(model, not method.frozen_a)


def shared_rows(ctx: ClientContext) -> Any:
    """For `messages.unpack`: the shared frozen A of this client's modules (frozen-A methods;
    None otherwise), up to the client's rank."""
    method, _ = task.method_options(ctx.config)
    if not method.frozen_a:
        return None
    return task.shared_a_rows(ctx.config, lambda name: in_features(ctx.base, name), ctx.rank)


def _numpy(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Factors]:
    return {name: (B.numpy(), A.numpy()) for name, (B, A) in factors.items()}


def method_prune(config: Config, factors: dict[str, Factors]) -> dict[str, Factors]:
    """What the client sends after training: the method's own choice (HetLoRA self-prunes)."""
    method, options = task.method_options(config)
    return method.prune(options, factors)


def train_round(
    ctx: ClientContext,
    server_round: int,
    rank: int,
    lora: dict[str, Factors],
    merged: dict[str, Merged],
    dense: dict[str, np.ndarray],
) -> tuple[dict[str, Factors], dict[str, np.ndarray], dict[str, float]]:
    """Train for one round; returns the folded factors, dense trainables and metrics."""
    config, start = ctx.config, time.perf_counter()
    configure_threads(config.train.threads)
    seed = task.derived_seed(config.run.seed, "client", server_round, ctx.partition_id)
    model = round_model(ctx, rank, lora, merged, dense, seed)
    method_start(config, model, lora)
    train = config.train
    result = train_local(
        model,
        ctx.data.train,
        steps=train.local_steps or None,
        epochs=train.local_epochs or None,
        batch_size=train.batch_size,
        lr=train.lr,
        weight_decay=train.weight_decay,
        grad_clip=train.grad_clip,
        seed=seed,
        regularizer=task.method_regularizer(config),
        precision=ctx.precision,
    )
    factors = method_prune(config, _numpy(get_factors(model)))
    new_dense = {name: t.numpy() for name, t in get_dense_trainables(model).items()}
    metrics = {
        "num-examples": ctx.data.num_examples,
        "train-loss": float(result["train_loss"]),
        "rank": next(iter(factors.values()))[1].shape[0] if factors else rank,
        "partition-id": ctx.partition_id,
        "seconds": time.perf_counter() - start,
        "train-seconds": float(result["seconds"]),
    }
    return factors, new_dense, metrics


def evaluate_round(
    ctx: ClientContext,
    rank: int,
    lora: dict[str, Factors],
    merged: dict[str, Merged],
    dense: dict[str, np.ndarray],
) -> dict[str, float]:
    """Local validation metrics of the global model at this client's rank."""
    if ctx.data.val is None:
        return {"num-examples": 0}
    configure_threads(ctx.config.train.threads)
    model = round_model(ctx, rank, lora, merged, dense, seed=ctx.config.run.seed)
    method_start(ctx.config, model, lora)
    result = evaluate(
        model, ctx.data.val, batch_size=ctx.config.eval.batch_size, precision=ctx.precision
    )
    metrics = {f"val-{key.replace('/', '-')}": float(v) for key, v in result.items()}
    metrics["num-examples"] = int(result.get("num_examples", len(ctx.data.val)))
    metrics.pop("val-num_examples", None)
    return metrics
