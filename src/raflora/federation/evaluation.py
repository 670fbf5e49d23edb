"""Server-side evaluation of the global model on the held-out test set.

The global model is the base plus the whole global update per module, from factors whose product
is ``ΔW`` (adapter mode: the round's stacked factors ``B (m, R)``, ``A (R, n)``, R ≤ Σ r_k plus
any carried tail; merge mode: ``U S``, ``Vᵀ``), loaded as a LoRA of rank ``max_modules R``
(modules of lower rank are padded with zero-product directions, so the adapter reproduces
``ΔW`` exactly) plus the dense heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raflora.config import Config
from raflora.federation import task
from raflora.math.round import GlobalState
from raflora.training import (
    evaluate,
    get_dense_trainables,
    lora_shapes,
    set_dense_trainables,
    set_factors,
    take,
)


def global_rank(state: GlobalState) -> int:
    """The largest number of significant directions of any module's global update."""
    return max((u.rank for u in state.total_update().values()), default=0)


def global_factors(state: GlobalState, rank: int | None = None) -> tuple[dict[str, Any], int]:
    """Per module the factors of the whole global update (``rank`` None) or of its best
    rank-`rank` approximation, and the LoRA rank that holds them all."""
    updates = state.total_update()
    if rank is not None:
        return {name: update.factors(rank) for name, update in updates.items()}, rank
    factors = {name: update.whole() for name, update in updates.items()}
    return factors, max((A.shape[0] for _, A in factors.values()), default=0)


def global_model(config: Config, base: nn.Module, state: GlobalState, rank: int | None = None):
    """PEFT model holding the global update (truncated to `rank` if given) and dense heads."""
    factors, top = global_factors(state, rank)
    model = task.lora_model(config, base, max(top, 1), seed=config.run.seed)
    set_factors(model, factors, seed=config.run.seed)
    if state.dense:
        set_dense_trainables(model, {k: torch.from_numpy(v) for k, v in state.dense.items()})
    return model


@dataclass
class ServerEvaluator:
    """Holds the base model and the encoded test set; evaluates global states."""

    config: Config
    base: nn.Module
    tokenizer: Any
    test: Any

    @classmethod
    def load(cls, config: Config) -> ServerEvaluator:
        config_json = config.to_json()
        data = task.load_data(config_json)
        placement = task.base_placement(config, task.server_device(config))
        labels = task.model_num_labels(config, data)
        base, tokenizer = task.load_base(config_json, labels, placement)
        test = task.encode(config, take(data.test, range(len(data.test))), tokenizer, base)
        return cls(config, base, tokenizer, test)

    def initial_state(self) -> GlobalState:
        """Round 0: no LoRA update yet, the seeded initial dense heads."""
        model = task.lora_model(self.config, self.base, 1, seed=self.config.run.seed)
        dense = {k: v.numpy() for k, v in get_dense_trainables(model).items()}
        return GlobalState(round=0, adapter={}, merged={}, dense=dense, ranks={})

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        model = task.lora_model(self.config, self.base, 1, seed=0)
        return {name: (m, n) for name, (m, n, _) in lora_shapes(model).items()}

    def dense_shapes(self, state: GlobalState) -> dict[str, tuple[int, ...]]:
        return {name: tuple(np.shape(v)) for name, v in state.dense.items()}

    def model_info(self) -> dict[str, Any]:
        """What an exported adapter needs besides the factors (JSON-ready)."""
        head = self.base.config
        return {
            "path": self.config.model.path,
            "task": self.config.model.task,
            "num_labels": getattr(head, "num_labels", None)
            if self.config.model.task != "causal-lm"
            else None,
            "target_modules": task.target_modules(self.config, self.base),
            "lora_alpha": self.config.model.lora_alpha,
            "rslora": self.config.model.rslora,
        }

    def evaluate(self, state: GlobalState) -> dict[str, float]:
        """Test metrics of the global model, on ``federation.server_device`` and autocast to
        ``model.dtype`` (the base's dtype) as the clients train."""
        model = global_model(self.config, self.base, state)
        model = task.placed(self.config, model, task.server_device(self.config))
        precision = getattr(torch, self.config.model.dtype)
        return evaluate(
            model, self.test, batch_size=self.config.eval.batch_size, precision=precision
        )
