"""Client LoRA ranks: from an explicit list, from tiers, or from memory budgets.

Memory budgets are matched against the memory of one training step measured at each candidate
rank (`measure_rank_memory`: the client's model on its own device and in its own precision);
the closed-form estimate below is what `raflora run --dry-run` prints without training.

Estimate (`training_memory_mb`, float32 everywhere, MiB = 2**20 bytes)::

    mem(r) = base_memory_mb + activation_mb + 4 · (4 bytes · r · P₁) / 2**20

where P₁ = Σ over target layers (m + n) is the LoRA parameter count per unit rank (a rank-r
adapter on an m×n layer has r·(m + n) parameters), and the factor 4 counts the LoRA weights,
their gradients and AdamW's two moments. ``base_memory_mb`` covers the frozen base weights
(see `base_memory_mb`); ``activation_mb`` is a rank-independent estimate of activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from raflora.training.device import autocast, grad_scaler


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1 (got {rank!r})")
    return int(rank)


def ranks_from_list(ranks: Sequence[int], num_clients: int) -> list[int]:
    """One rank per client; a list shorter than ``num_clients`` is a pattern repeated in order
    (``[2, 4]`` for 5 clients → ``[2, 4, 2, 4, 2]``); a longer list is an error."""
    if not ranks:
        raise ValueError("ranks: needs at least one rank")
    if len(ranks) > num_clients:
        raise ValueError(f"ranks: {len(ranks)} ranks for only {num_clients} clients")
    checked = [_check_rank(rank) for rank in ranks]
    return [checked[i % len(checked)] for i in range(num_clients)]


def ranks_from_tiers(num_clients: int, tiers: dict[int, float], seed: int) -> list[int]:
    """Ranks in the given proportions, e.g. ``{4: .5, 8: .3, 16: .2}``.

    Counts are ``⌊f·K⌋`` per tier plus one more for the tiers with the largest remainders
    (ties: smaller rank first) until they sum to K; the list is then shuffled with ``seed``.
    """
    if not tiers:
        raise ValueError("rank_tiers: needs at least one tier")
    for rank, share in tiers.items():
        _check_rank(rank)
        if share < 0:
            raise ValueError(f"rank_tiers: fraction for rank {rank} is negative ({share})")
    if abs(sum(tiers.values()) - 1.0) > 1e-6:
        raise ValueError(f"rank_tiers: fractions must sum to 1 (got {sum(tiers.values()):g})")
    order = sorted(tiers)
    exact = np.array([tiers[rank] * num_clients for rank in order])
    counts = np.floor(exact).astype(int)
    by_remainder = sorted(range(len(order)), key=lambda i: (-(exact[i] - counts[i]), order[i]))
    for i in by_remainder[: num_clients - counts.sum()]:
        counts[i] += 1
    ranks = np.repeat(order, counts)
    return [int(rank) for rank in np.random.default_rng(seed).permutation(ranks)]


def lora_params_per_rank(model: nn.Module, target_modules: Sequence[str]) -> int:
    """P₁ = Σ (in + out) over linear layers whose last name part is in ``target_modules``."""
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in target_modules:
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            total += sum(module.weight.shape)
    if total == 0:
        raise ValueError(f"no linear layers named {list(target_modules)} in the model")
    return total


def base_memory_mb(model: nn.Module) -> float:
    """float32 size of all the model's parameters in MiB."""
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def training_memory_mb(
    rank: int, lora_param_count_per_rank: int, base_memory_mb: float, activation_mb: float = 0.0
) -> float:
    """``mem(r)`` of the module docstring."""
    return base_memory_mb + activation_mb + 4 * 4 * rank * lora_param_count_per_rank / 2**20


def ranks_from_memory(
    budgets_mb: Sequence[float],
    lora_param_count_per_rank: int,
    base_memory_mb: float,
    candidate_ranks: Sequence[int],
    activation_mb: float = 0.0,
) -> list[int]:
    """Per client, the largest candidate rank with the estimate ``mem(r) <= budget``; a budget
    fitting no candidate raises ``ValueError`` naming the client and what the smallest rank
    needs."""
    candidates = sorted({_check_rank(rank) for rank in candidate_ranks})
    if not candidates:
        raise ValueError("candidate_ranks: needs at least one rank")
    need = {
        rank: training_memory_mb(rank, lora_param_count_per_rank, base_memory_mb, activation_mb)
        for rank in candidates
    }
    return ranks_within_budgets(budgets_mb, need)


def ranks_within_budgets(budgets_mb: Sequence[float], need_mb: Mapping[int, float]) -> list[int]:
    """Per client, the largest rank r with ``need_mb[r] <= budget`` (``need_mb``: MiB per
    candidate rank, estimated or measured); a budget fitting none raises ``ValueError``."""
    candidates = sorted(_check_rank(rank) for rank in need_mb)
    if not candidates:
        raise ValueError("candidate_ranks: needs at least one rank")
    ranks = []
    for client, budget in enumerate(budgets_mb):
        fitting = [rank for rank in candidates if need_mb[rank] <= budget]
        if not fitting:
            raise ValueError(
                f"client {client}: memory budget {budget:g} MB fits no candidate "
                f"rank (rank {candidates[0]} needs {need_mb[candidates[0]]:.1f} MB)"
            )
        ranks.append(fitting[-1])
    return ranks


def _resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in their own dtypes."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_step_bytes(step: Callable[[], None]) -> int:
    """Bytes torch allocates on the CPU while ``step`` runs, from the profiler's memory records
    (leaf operators' own allocations minus the frees it attributes, in time order; the running
    maximum). The profiler does not see every free, so this is an upper bound on the step's
    peak, deterministic for a given model and batch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.events() if e.name == "[memory]" or not e.cpu_children]
    events.sort(key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        memory = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        current += memory
        peak = max(peak, current)
    return peak


def step_memory_mb(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    precision: torch.dtype = torch.float32,
) -> float:
    """MiB one AdamW training step of ``model`` on ``batch`` needs on the model's device.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step (model, activations, gradients,
    optimiser state, workspace). CPU/MPS: the model's parameters and buffers plus what the step
    allocates (`_cpu_step_bytes`, an upper bound). The step runs as in `train_local` (autocast,
    loss scaling) and changes the model's trainable parameters.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-8)
    scaler = grad_scaler(device, precision)
    batch = {key: value.to(device) for key, value in batch.items()}
    was_training = model.training
    model.train()

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn(model, batch).float()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            used = torch.cuda.max_memory_allocated(device)
        else:
            used = _resident_bytes(model) + _cpu_step_bytes(step)
    finally:
        model.train(was_training)
    return used / 2**20


def measure_rank_memory(
    build: Callable[[int], nn.Module],
    batch: Mapping[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    candidate_ranks: Sequence[int],
    precision: torch.dtype = torch.float32,
) -> dict[int, float]:
    """``{rank: step_memory_mb(build(rank), ...)}`` for every candidate rank; each model is
    released before the next is built (on CUDA its cached blocks too)."""
    need = {}
    for rank in sorted({_check_rank(r) for r in candidate_ranks}):
        model = build(rank)
        need[rank] = step_memory_mb(model, batch, loss_fn, precision)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return need
