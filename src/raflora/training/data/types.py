"""Example records, the `TaskData` bundle, and seeded splitting helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("classification", "multiple-choice", "image-classification")


@dataclass(frozen=True)
class TextExample:
    """One text (or text pair) with an integer label in ``[0, num_labels)``.

    ``target`` (optional, ``num_labels`` floats): a teacher's logits to regress on (the
    planted task's ``targets = logits``); training then minimises the mean squared error to
    them instead of the cross-entropy, and ``label`` is their argmax.
    """

    text: str
    label: int
    text_pair: str | None = None
    target: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ChoiceExample:
    """A multiple-choice question for a causal LM, scored by continuation log-likelihood.

    ``prompt`` ends where the answer starts (e.g. ``"Question: …\\n A. …\\n B. …\\nAnswer:"``);
    ``choices`` are the exact continuations (e.g. ``(" A", " B")``); ``answer`` indexes the gold
    one; ``task`` names the source task (per-task accuracy when tasks are mixed).
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str = ""

    @property
    def label(self) -> int:
        return self.answer


@dataclass(frozen=True, eq=False)
class ImageExample:
    """One image, ``pixels`` (H, W) or (H, W, C) with values in [0, 255], and its label."""

    pixels: np.ndarray
    label: int


Example = TextExample | ChoiceExample | ImageExample


@dataclass(frozen=True)
class TaskData:
    """A task's train/test examples and what the labels mean.

    ``kind`` is one of ``classification``, ``multiple-choice``, ``image-classification``; for
    multiple-choice, ``num_labels`` is the largest number of choices and ``label_names`` are
    letters. ``description`` says where the data came from and how it was split.
    """

    train: list[Example]
    test: list[Example]
    num_labels: int
    label_names: tuple[str, ...]
    kind: str
    description: str
    tasks: tuple[str, ...] = field(default=())

    def labels(self, split: str = "train") -> np.ndarray:
        """Integer labels (gold choice for multiple-choice) of ``"train"`` or ``"test"``."""
        examples = self.train if split == "train" else self.test
        return np.array([example.label for example in examples], dtype=np.int64)


def stratified_split(
    labels: Sequence[int] | np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping label proportions: ``round(test_fraction · n_c)`` of each class c
    go to test. Returns sorted ``(train_indices, test_indices)``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1) (got {test_fraction})")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        test.append(members[: round(test_fraction * len(members))])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``size`` examples in original order (all when size is None/0
    or not smaller than the list)."""
    if not size or size >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size, replace=False))
    return [examples[i] for i in keep]


def take(examples: Sequence[Example], indices: Sequence[int] | np.ndarray) -> list[Example]:
    """``[examples[i] for i in indices]``: one client's share after partitioning."""
    return [examples[int(i)] for i in indices]
