"""Local training (AdamW on the trainable parameters) and evaluation of one client's model.

Data is an encoded dataset from `encode_examples` (shuffled per epoch with the seed and
batched with its ``collate``) or a plain sequence of ready batches (used in order).
Losses: the model's own ``loss`` for classification and images; for multiple-choice batches
(those with ``cont_len``) the mean negative log-likelihood of the gold continuation tokens; for
batches with logit ``targets`` (B, C) (distillation from a teacher) the mean squared error
``mean_{b,c} (logits_bc − targets_bc)²``.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from raflora.training.data.encode import ChoiceDataset
from raflora.training.device import autocast, grad_scaler

Batch = dict[str, Tensor]
Regularizer = Callable[[nn.Module], Tensor]


def configure_threads(num_threads: int) -> None:
    """``torch.set_num_threads(num_threads)`` when positive; 0 keeps torch's default. Call it
    once per process (e.g. per simulated client) before training."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with ``num_threads`` torch threads (0: every CPU this process may use),
    then restore the caller's setting. BLAS/LAPACK results can change in the last bits with the
    thread count, so work that must give the same numbers in every process fixes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads or _usable_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """``torch.manual_seed(seed)`` (dropout etc.) without disturbing the caller's RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _keeps_logits(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _tail_logits(model: nn.Module, batch: Batch, keep: int) -> Tensor:
    """Logits (B, keep, V) at the last ``keep`` positions of a left-padded batch.

    Only those rows go through the LM head when the model supports ``logits_to_keep``.
    Position ids count real tokens only, so left padding does not shift positions.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    if _keeps_logits(model):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:].float()


def continuation_logprobs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per row of a left-padded choice batch: Σ log p(continuation token | prefix), and the
    number of continuation tokens ``cont_len``.

    The last K = max(cont_len) tokens are predicted by the logits at positions T-K-1 … T-2.
    """
    ids, cont_len = batch["input_ids"], batch["cont_len"]
    K = int(cont_len.max())
    logits = _tail_logits(model, batch, K + 1)[:, :-1]  # (B, K, V)
    targets = ids[:, -K:]  # (B, K)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]  # (B, K)
    scored = torch.arange(K, device=ids.device) >= (K - cont_len)[:, None]  # (B, K)
    return torch.where(scored, logp, torch.zeros_like(logp)).sum(-1), cont_len


@torch.no_grad()
def choice_scores(
    model: nn.Module, data: ChoiceDataset, batch_size: int
) -> list[list[tuple[float, int]]]:
    """Per question and choice: (Σ log p(continuation | prompt), continuation tokens).

    Questions whose choices are all single tokens (answer letters) cost one forward of the
    prompt, read at its last position; the others one sequence per choice.
    """
    device = _device(model)
    scores: list[list[tuple[float, int]]] = [[] for _ in range(len(data))]
    single = [q for q in range(len(data)) if data.single_token(q)]
    multi = [q for q in range(len(data)) if not data.single_token(q)]
    for batch, questions in data.prompt_batches(single, batch_size):
        logits = _tail_logits(model, _to(batch, device), 1)[:, -1]  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        for row, q in enumerate(questions):
            scores[q] = [(float(logp[row, choice[0]]), 1) for choice in data.items[q]["choices"]]
    for q in multi:
        scores[q] = [(0.0, 0)] * len(data.items[q]["choices"])
    for batch, pairs in data.choice_batches(multi, batch_size):
        logp, count = continuation_logprobs(model, _to(batch, device))
        for (q, c), value, n in zip(pairs, logp.tolist(), count.tolist(), strict=True):
            scores[q][c] = (value, n)
    return scores


def batch_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean training loss of one batch (see the module docstring)."""
    if "cont_len" in batch:
        logp, count = continuation_logprobs(model, batch)
        return -logp.sum() / count.sum()
    if "targets" in batch:
        logits = model(**_inputs(batch)).logits.float()
        return nn.functional.mse_loss(logits, batch["targets"].float())
    return model(**batch).loss


def _inputs(batch: Batch) -> Batch:
    """The model's inputs: the batch without its labels and logit targets."""
    return {k: v for k, v in batch.items() if k not in ("labels", "targets")}


def _batches(data: Dataset | Sequence[Batch], batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless stream: seeded reshuffle each epoch for datasets; ready batches in order."""
    if not isinstance(data, Dataset):
        while True:
            yield from data
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield data.collate([data[i] for i in order[start : start + batch_size]])


def _size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _num_steps(
    data: Dataset | Sequence[Batch], batch_size: int, steps: int | None, epochs: int | None
) -> int:
    if bool(steps) == bool(epochs):
        raise ValueError(
            f"give exactly one of steps and epochs as a positive number "
            f"(got steps={steps}, epochs={epochs})"
        )
    if steps:
        return int(steps)
    per_epoch = math.ceil(len(data) / batch_size) if isinstance(data, Dataset) else len(data)
    return int(epochs) * per_epoch  # type: ignore[arg-type]


def train_local(
    model: nn.Module,
    batches_or_dataset: Dataset | Sequence[Batch],
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int,
    regularizer: Regularizer | None = None,
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Train the model's trainable parameters with a fresh AdamW for ``steps`` optimiser steps
    or ``epochs`` passes (exactly one), clipping the gradient norm at ``grad_clip`` (0 = off).

    ``precision`` below float32 runs forward and loss under ``torch.autocast`` in that dtype on
    the model's device (float16 on CUDA with a fresh ``GradScaler``: the loss is scaled before
    ``backward`` and the gradients unscaled before clipping; steps with inf/nan gradients are
    skipped by the scaler). The parameters keep their own dtype (float32 LoRA factors).

    Loss per step: ``batch_loss + regularizer(model)`` (e.g. HetLoRA's λ·tail norm). Returns
    ``train_loss`` (mean batch loss, without the regulariser), ``regularizer`` (its mean),
    ``num_examples`` (examples seen, counting repeats), ``num_distinct_examples`` (local data
    size), ``steps`` and ``seconds``. Deterministic for a given seed.
    """
    data = batches_or_dataset
    if len(data) == 0:
        raise ValueError("no training data")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    total_steps = _num_steps(data, batch_size, steps, epochs)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device, start = _device(model), time.perf_counter()
    scaler = grad_scaler(device, precision)
    losses, penalties, seen = [], [], 0
    was_training = model.training
    model.train()
    with _seeded(seed, device):
        stream = _batches(data, batch_size, seed)
        for step in range(total_steps):
            batch = _to(next(stream), device)
            with autocast(device, precision):
                loss = batch_loss(model, batch).float()
                penalty = regularizer(model) if regularizer is not None else torch.zeros(())
            if not torch.isfinite(loss + penalty):
                raise FloatingPointError(f"non-finite training loss at local step {step}")
            optimizer.zero_grad(set_to_none=True)
            total = loss + penalty.to(loss.device)
            (scaler.scale(total) if scaler is not None else total).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(loss.item())
            penalties.append(penalty.item())
            seen += _size(batch)
    model.train(was_training)
    distinct = len(data) if isinstance(data, Dataset) else sum(_size(b) for b in data)
    return {
        "train_loss": float(np.mean(losses)),
        "regularizer": float(np.mean(penalties)),
        "num_examples": seen,
        "num_distinct_examples": distinct,
        "steps": total_steps,
        "seconds": time.perf_counter() - start,
    }


def _evaluate_logits(model: nn.Module, data: Dataset, batch_size: int) -> dict[str, float]:
    device, loss_sum, correct = _device(model), 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        batch = _to(batch, device)
        labels = batch["labels"]
        logits = model(**_inputs(batch)).logits.float()  # (B, num_labels)
        if "targets" in batch:  # distillation: the training loss, mean over the C logits
            squared = (logits - batch["targets"].float()) ** 2
            loss_sum += float(squared.mean(-1).sum())
        else:
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return {
        "loss": loss_sum / len(data),
        "accuracy": correct / len(data),
        "num_examples": len(data),
    }


def _evaluate_choices(model: nn.Module, data: ChoiceDataset, batch_size: int) -> dict[str, float]:
    scores = choice_scores(model, data, batch_size)
    gold = np.array([item["answer"] for item in data.items])
    total = [np.array([value for value, _ in s]) for s in scores]
    per_token = [np.array([value / n for value, n in s]) for s in scores]
    right_norm = np.array([int(np.argmax(s)) for s in per_token]) == gold
    right_sum = np.array([int(np.argmax(s)) for s in total]) == gold
    metrics = {
        "loss": float(np.mean([-per_token[q][g] for q, g in enumerate(gold)])),
        "accuracy": float(right_norm.mean()),
        "accuracy_sum": float(right_sum.mean()),
        "num_examples": len(data),
    }
    tasks = np.array([item["task"] for item in data.items])
    if len(set(tasks)) > 1:
        for task in sorted(set(tasks)):
            metrics[f"accuracy/{task}"] = float(right_norm[tasks == task].mean())
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, *, batch_size: int, precision: torch.dtype = torch.float32
) -> dict[str, float]:
    """Loss and accuracy on an encoded dataset (in order, no gradient, eval mode; under
    ``torch.autocast`` in ``precision`` when it is below float32, as in `train_local`).

    Classification / images: mean cross-entropy and argmax accuracy (with logit ``targets``: the
    mean squared error to them, as in training). Multiple-choice: each
    choice is scored by its continuation log-likelihood; ``accuracy`` picks the best mean
    log-prob per token (length-normalised), ``accuracy_sum`` the best sum; ``loss`` is the gold
    continuation's mean NLL per token; ``accuracy/<task>`` per task when tasks are mixed.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    try:
        with autocast(_device(model), precision):
            if isinstance(data, ChoiceDataset):
                return _evaluate_choices(model, data, batch_size)
            return _evaluate_logits(model, data, batch_size)
    finally:
        model.train(was_training)
