"""Convert between PEFT LoRA parameters and the math layer's scaled factors.

PEFT computes, for a target layer with base weight W (m×n) and adapter rank r,

    y = W x + s · B (A x),   A = lora_A (r×n),  B = lora_B (m×r),  s = alpha/r or alpha/√r.

The math layer works on ``(B_fold, A)`` with ``B_fold = s · B`` (m×r), so that
``ΔW = B_fold @ A`` whatever the client's rank or scaling: clients of different ranks aggregate
like with like. `get_factors` folds s in, `set_factors` divides it out.

Module names are stable across ranks and PEFT wrappers: the transformers model's own dotted
name, e.g. ``"bert.encoder.layer.0.attention.self.query"``; dense trainables (task heads saved
with ``modules_to_save``) look like ``"classifier.weight"``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

Factors = tuple[Tensor, Tensor]


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / rank`` or, with rsLoRA, ``alpha / sqrt(rank)``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _adapter(peft_model: nn.Module) -> str:
    return getattr(peft_model, "active_adapter", "default")


def _inner(peft_model: nn.Module) -> nn.Module:
    """The transformers model with LoRA layers injected (names without PEFT prefixes)."""
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def lora_layers(peft_model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(stable name, PEFT LoraLayer)`` for every LoRA-wrapped module, in model order."""
    from peft.tuners.lora import LoraLayer

    adapter = _adapter(peft_model)
    for name, module in _inner(peft_model).named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def lora_shapes(peft_model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per module ``(m, n, r)``: output size, input size, adapter rank."""
    adapter = _adapter(peft_model)
    shapes = {}
    for name, layer in lora_layers(peft_model):
        r, n = layer.lora_A[adapter].weight.shape
        shapes[name] = (layer.lora_B[adapter].weight.shape[0], n, r)
    return shapes


def live_factors(peft_model: nn.Module) -> dict[str, Factors]:
    """``(s · lora_B, lora_A)`` per module, still attached to the graph (for regularisers)."""
    adapter = _adapter(peft_model)
    return {
        name: (layer.scaling[adapter] * layer.lora_B[adapter].weight, layer.lora_A[adapter].weight)
        for name, layer in lora_layers(peft_model)
    }


def get_factors(peft_model: nn.Module) -> dict[str, Factors]:
    """Detached float32 CPU copies ``(B_fold (m×r) = s·lora_B, A (r×n) = lora_A)`` per module."""
    with torch.no_grad():
        return {
            name: (B.detach().float().cpu().clone(), A.detach().float().cpu().clone())
            for name, (B, A) in live_factors(peft_model).items()
        }


def _module_generator(seed: int, name: str) -> torch.Generator:
    # One stream per (seed, module): a module's fresh init does not depend on the others.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def fresh_lora_A(rows: int, n: int, generator: torch.Generator) -> Tensor:
    """PEFT's default A init: ``kaiming_uniform_(a=√5)`` over fan-in n, i.e. U(-1/√n, 1/√n)."""
    A = torch.empty(rows, n)
    if rows > 0:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


def shared_lora_A(seed: int, name: str, rows: int, n: int) -> Tensor:
    """A frozen-A method's shared A_0[:rows] (rows, n) for module ``name`` (FFA-LoRA): PEFT's
    init drawn from the (seed, module) stream, so every client and round gets the same matrix
    and the A of rank r is the first r rows of the A of any larger rank."""
    return fresh_lora_A(rows, n, _module_generator(seed, name))


def set_lora_A_trainable(peft_model: nn.Module, trainable: bool) -> None:
    """Train (True) or freeze (False) every ``lora_A`` of the active adapter; the optimiser of
    `train_local` then leaves a frozen A untouched (no step, no weight decay)."""
    adapter = _adapter(peft_model)
    for _, layer in lora_layers(peft_model):
        layer.lora_A[adapter].weight.requires_grad_(trainable)


def in_features(base: nn.Module, name: str) -> int:
    """Input size n of the linear layer ``name`` of a model without LoRA (GPT-2's Conv1D
    stores its weight as (in, out)); KeyError naming the module if there is none."""
    from transformers.pytorch_utils import Conv1D

    try:
        layer = base.get_submodule(name)
    except AttributeError:
        raise KeyError(f"the model has no module {name!r}") from None
    weight = getattr(layer, "weight", None)
    if weight is None or weight.ndim != 2:
        raise KeyError(f"module {name!r} is not a linear layer")
    return int(weight.shape[0] if isinstance(layer, Conv1D) else weight.shape[1])


def _checked_pair(name: str, pair: Factors, m: int, n: int, r: int) -> tuple[Tensor, Tensor]:
    B, A = (torch.as_tensor(x, dtype=torch.float32) for x in pair)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"factors for {name!r}: need B (m, r), A (r, n); got {tuple(B.shape)}, {tuple(A.shape)}"
        )
    if B.shape[0] != m or A.shape[1] != n:
        raise ValueError(
            f"factors for {name!r}: model needs B ({m}, ·), A (·, {n}); got "
            f"{tuple(B.shape)}, {tuple(A.shape)}"
        )
    if A.shape[0] > r:
        raise ValueError(
            f"factors for {name!r} have rank {A.shape[0]} > model rank {r}; "
            "truncate them first (math layer's allocate)"
        )
    return B, A


def set_factors(peft_model: nn.Module, factors: Mapping[str, Factors], seed: int) -> None:
    """Load ``(B_fold, A)`` into the LoRA layers: ``lora_B = B_fold / s``, ``lora_A = A``.

    A module given rank r' < r keeps the given directions 0..r'-1; directions r'..r-1 (and whole
    modules absent from ``factors`` or given rank 0) get PEFT's fresh init, A kaiming-uniform and
    B zero, from a generator seeded by ``(seed, module name)`` — so ``B_fold @ A`` is exactly
    the given product. Rank r' > r and unknown module names raise ``ValueError``.
    """
    adapter = _adapter(peft_model)
    layers = dict(lora_layers(peft_model))
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(f"unknown LoRA modules {unknown}; the model has e.g. {sorted(layers)[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            (r, n), m = lora_A.shape, lora_B.shape[0]
            B, A = (
                _checked_pair(name, factors[name], m, n, r)
                if name in factors
                else (torch.zeros(m, 0), torch.zeros(0, n))
            )
            k = A.shape[0]
            new_A = torch.cat([A, fresh_lora_A(r - k, n, _module_generator(seed, name))])
            new_B = torch.cat([B / layer.scaling[adapter], torch.zeros(m, r - k)], dim=1)
            lora_A.copy_(new_A.to(lora_A))
            lora_B.copy_(new_B.to(lora_B))


def _stable_dense_name(name: str, adapter: str) -> str:
    return name.replace(f".modules_to_save.{adapter}.", ".")


def _dense_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    adapter = _adapter(peft_model)
    return {
        _stable_dense_name(name, adapter): param
        for name, param in _inner(peft_model).named_parameters()
        if param.requires_grad and ".lora_" not in name
    }


def get_dense_trainables(peft_model: nn.Module) -> dict[str, Tensor]:
    """Detached float32 CPU copies of trainable non-LoRA parameters (e.g. ``classifier.weight``)."""
    return {
        name: param.detach().float().cpu().clone()
        for name, param in _dense_parameters(peft_model).items()
    }


def set_dense_trainables(
    peft_model: nn.Module, tensors: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Copy tensors into the trainable non-LoRA parameters by stable name.

    Unknown names and shape mismatches raise ``ValueError``; so do missing names when ``strict``.
    """
    params = _dense_parameters(peft_model)
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors)) if strict else []
    if unknown or missing:
        raise ValueError(
            f"dense trainables: unknown {unknown}, missing {missing}; "
            f"the model has {sorted(params)}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            value = torch.as_tensor(value)
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"dense trainable {name!r}: expected shape "
                    f"{tuple(params[name].shape)}, got {tuple(value.shape)}"
                )
            params[name].copy_(value.to(params[name]))
