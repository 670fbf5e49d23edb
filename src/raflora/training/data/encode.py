"""Tokenise / normalise examples once into torch datasets whose ``collate`` builds batches.

- Text classification → ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``;
  right-padded to the longest sequence in the batch, truncated to ``max_length``.
- Multiple-choice for causal LMs → ``prompt ⧺ continuation`` token ids, **left**-padded so every
  continuation ends at the last position; ``cont_len`` says how many trailing tokens are
  scored. Training uses the gold continuation; scoring uses `ChoiceDataset.prompt_batches`
  (all choices one token: one forward per question) or `ChoiceDataset.choice_batches` (one
  sequence per question and choice).
- Images → ``pixel_values`` (C, S, S) scaled to [-1, 1] (ViT's mean = std = 0.5) and resized to
  the model's ``image_size``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from raflora.training.data.types import ChoiceExample, Example, ImageExample, TextExample


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """(len(rows), longest) long tensor, padded with ``value`` on the right (or left)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            out[i, span] = torch.tensor(row, dtype=torch.long)
    return out


class TextClassificationDataset(Dataset):
    """Pre-tokenised texts; items are dicts of token-id lists and an int label."""

    kind = "classification"

    def __init__(self, items: list[dict[str, Any]], pad_id: int) -> None:
        self.items, self.pad_id = items, pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        ids = [item["input_ids"] for item in items]
        batch = {
            "input_ids": _pad(ids, self.pad_id),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0),
            "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
        }
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = _pad([item["token_type_ids"] for item in items], 0)
        if "targets" in items[0]:
            batch["targets"] = torch.tensor([item["targets"] for item in items])
        return batch


class ChoiceDataset(Dataset):
    """Questions with tokenised prompt and per-choice continuations (lists of token ids)."""

    kind = "multiple-choice"

    def __init__(self, items: list[dict[str, Any]], pad_id: int) -> None:
        self.items, self.pad_id = items, pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def _batch(self, pairs: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        ids = [prompt + cont for prompt, cont in pairs]
        return {
            "input_ids": _pad(ids, self.pad_id, left=True),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0, left=True),
            "cont_len": torch.tensor([len(cont) for _, cont in pairs], dtype=torch.long),
        }

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        """Training batch: each prompt followed by its gold continuation."""
        return self._batch([(it["prompt"], it["choices"][it["answer"]]) for it in items])

    def single_token(self, question: int) -> bool:
        """Whether every continuation of a question is one token (e.g. answer letters)."""
        return all(len(choice) == 1 for choice in self.items[question]["choices"])

    def prompt_batches(
        self, questions: Sequence[int], batch_size: int
    ) -> Iterator[tuple[dict[str, Tensor], list[int]]]:
        """Left-padded prompts alone (``cont_len`` 0), shortest first, with their question
        indices: one forward scores all single-token choices from the last position."""
        order = sorted(questions, key=lambda q: len(self.items[q]["prompt"]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield self._batch([(self.items[q]["prompt"], []) for q in chunk]), chunk

    def choice_batches(
        self, questions: Sequence[int], batch_size: int
    ) -> Iterator[tuple[dict[str, Tensor], list[tuple[int, int]]]]:
        """Batches of prompt ⧺ choice for every (question, choice) pair, shortest first, with
        the pairs each row scores."""
        pairs = [(q, c) for q in questions for c in range(len(self.items[q]["choices"]))]
        pairs.sort(
            key=lambda p: len(self.items[p[0]]["prompt"]) + len(self.items[p[0]]["choices"][p[1]])
        )
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = self._batch(
                [(self.items[q]["prompt"], self.items[q]["choices"][c]) for q, c in chunk]
            )
            yield batch, chunk


class ImageDataset(Dataset):
    """Normalised pixel tensors (N, C, S, S) and labels (N,)."""

    kind = "image-classification"

    def __init__(self, pixel_values: Tensor, labels: Tensor) -> None:
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {
            key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "labels")
        }


def _encode_text(examples: Sequence[TextExample], tokenizer: Any, max_length: int) -> Dataset:
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples]
    encoded = tokenizer(
        texts,
        pairs if any(p is not None for p in pairs) else None,
        truncation=True,
        max_length=max_length,
    )
    with_targets = [ex.target is not None for ex in examples]
    if any(with_targets) and not all(with_targets):
        raise ValueError("examples mix logit targets and plain labels: give every one a target")
    items = []
    for i, ex in enumerate(examples):
        item = {"input_ids": encoded["input_ids"][i], "labels": ex.label}
        if "token_type_ids" in encoded:
            item["token_type_ids"] = encoded["token_type_ids"][i]
        if ex.target is not None:
            item["targets"] = list(ex.target)
        items.append(item)
    return TextClassificationDataset(items, tokenizer.pad_token_id)


def _encode_choices(examples: Sequence[ChoiceExample], tokenizer: Any, max_length: int) -> Dataset:
    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"]
    items = []
    for ex, prompt in zip(examples, prompts, strict=True):
        conts = tokenizer(list(ex.choices), add_special_tokens=False)["input_ids"]
        conts = [cont[: max_length - 1] for cont in conts]
        keep = max_length - max(len(cont) for cont in conts)  # left-truncate the prompt
        prompt = prompt[-keep:]
        if not prompt:
            raise ValueError(f"empty prompt after tokenisation: {ex.prompt[:60]!r}")
        items.append({"prompt": prompt, "choices": conts, "answer": ex.answer, "task": ex.task})
    return ChoiceDataset(items, tokenizer.pad_token_id)


def _image_tensor(pixels: np.ndarray, image_size: int | None, num_channels: int) -> torch.Tensor:
    """(N, H, W) grayscale or (N, H, W, C) uint8 → (N, num_channels, S, S) float in [0, 255]."""
    out = torch.as_tensor(pixels, dtype=torch.float32)
    out = out[:, None] if out.ndim == 3 else out.permute(0, 3, 1, 2)  # (N, C, H, W)
    if out.shape[1] != num_channels:
        if out.shape[1] != 1:
            raise ValueError(f"images have {out.shape[1]} channels, model wants {num_channels}")
        out = out.expand(-1, num_channels, -1, -1)
    if image_size is not None and tuple(out.shape[-2:]) != (image_size, image_size):
        size = (image_size, image_size)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def _encode_images(
    examples: Sequence[ImageExample], image_size: int | None, num_channels: int
) -> Dataset:
    """Pixel values (N, C, S, S) in [-1, 1]; images of different sizes (an image folder) are
    each resized to the model's ``image_size``."""
    if len({ex.pixels.shape for ex in examples}) == 1:
        pixels = _image_tensor(np.stack([ex.pixels for ex in examples]), image_size, num_channels)
    elif image_size is None:
        raise ValueError("images differ in size and the model declares no image_size")
    else:
        pixels = torch.cat(
            [_image_tensor(ex.pixels[None], image_size, num_channels) for ex in examples]
        )
    pixels = (pixels / 255.0 - 0.5) / 0.5  # (N, C, S, S) in [-1, 1]
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return ImageDataset(pixels.contiguous(), labels)


def encode_examples(
    examples: Sequence[Example],
    *,
    tokenizer: Any = None,
    max_length: int = 128,
    image_size: int | None = None,
    num_channels: int = 1,
) -> Dataset:
    """Encode one split (or one client's share) into a dataset with a ``collate`` method.

    The kind follows the examples' type; text kinds need ``tokenizer``. For images pass the
    model's ``config.image_size`` and ``config.num_channels``.
    """
    if not examples:
        raise ValueError("no examples to encode")
    first = examples[0]
    if isinstance(first, ImageExample):
        return _encode_images(examples, image_size, num_channels)  # type: ignore[arg-type]
    if tokenizer is None:
        raise ValueError("text examples need a tokenizer")
    if isinstance(first, ChoiceExample):
        return _encode_choices(examples, tokenizer, max_length)  # type: ignore[arg-type]
    return _encode_text(examples, tokenizer, max_length)  # type: ignore[arg-type]
