"""Turn raw rows (dicts from the general loader) into examples, checking every field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from raflora.training.data.files import Fields, Row
from raflora.training.data.types import ChoiceExample, Example, TextExample

TEXT = ("text", "sentence", "review", "content", "document")
PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"))
LABEL = ("label", "labels", "target", "class")
QUESTION = ("question", "query", "prompt", "goal")
CHOICES = ("choices", "options", "endings")
ANSWER = ("answer", "gold", "answerKey", "label")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _pick(given: str | None, candidates: Sequence[str], row: Row, role: str) -> str:
    where, record = row
    if given is not None:
        return given
    for name in candidates:
        if name in record:
            return name
    raise ValueError(
        f"{where}: no {role} field (tried {', '.join(candidates)}; fields: "
        f"{', '.join(record)}); set it explicitly"
    )


def _get(row: Row, field: str) -> Any:
    where, record = row
    if field not in record:
        raise ValueError(f"{where}: missing field {field!r} (fields: {', '.join(record)})")
    value = record[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _int_like(value: Any) -> bool:
    if isinstance(value, bool | int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def label_vocabulary(raw: list[Any], names: list[str] | None) -> tuple[list[str] | None, bool]:
    """``(names, numeric)``: integer labels keep ``names`` (maybe None); otherwise the sorted set
    of string labels becomes the names."""
    if all(_int_like(value) for value in raw):
        return names, True
    return sorted({str(value) for value in raw}), False


def to_label(
    row: Row, field: str, value: Any, names: list[str] | None, numeric: bool, num_labels: int
) -> int:
    where = row[0]
    label = int(value) if numeric else names.index(str(value))  # type: ignore[union-attr]
    if not 0 <= label < num_labels:
        raise ValueError(f"{where}: field {field!r}: label {label} out of range [0, {num_labels})")
    return label


def classification_examples(
    rows: list[Row],
    fields: Fields,
    names: list[str] | None,
    num_labels: int | None,
    label_field: str,
) -> tuple[list[Example], list[str]]:
    """Text examples and the label names (``str(i)`` when the data gives none)."""
    first = rows[0]
    text_field, pair_field = fields.text, fields.text_pair
    if text_field is None:
        pair = next((p for p in PAIRS if p[0] in first[1] and p[1] in first[1]), None)
        text_field, pair_field = pair if pair else (_pick(None, TEXT, first, "text"), None)
    raw = [_get(row, label_field) for row in rows]
    names, numeric = label_vocabulary(raw, names)
    if num_labels is None:
        # integer labels are class indices: never more classes than examples (a stray huge
        # label would otherwise build a classifier head of that size)
        num_labels = len(names) if names else min(max(int(v) for v in raw) + 1, len(rows))
    examples: list[Example] = [
        TextExample(
            text=str(_get(row, text_field)),
            text_pair=str(_get(row, pair_field)) if pair_field else None,
            label=to_label(row, label_field, value, names, numeric, num_labels),
        )
        for row, value in zip(rows, raw, strict=True)
    ]
    return examples, list(names) if names else [str(i) for i in range(num_labels)]


def _choice_texts(row: Row, field: str) -> tuple[list[str], list[str] | None]:
    value = _get(row, field)
    if isinstance(value, dict) and "text" in value:  # HF ARC style {"text": [...], "label": [...]}
        return [str(v) for v in value["text"]], [str(v) for v in value.get("label", [])] or None
    if isinstance(value, str):  # CSV cells: a JSON list or "a|b|c"
        import json

        try:
            value = json.loads(value)
        except ValueError:
            value = value.split("|")
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError(f"{row[0]}: field {field!r} must be a list of at least 2 choices")
    return [str(v) for v in value], None


def _answer_index(row: Row, field: str, choices: list[str], labels: list[str] | None) -> int:
    value = _get(row, field)
    text = str(value).strip()
    if labels and text in labels:
        return labels.index(text)
    if _int_like(value) and 0 <= int(value) < len(choices):
        return int(value)
    if len(text) == 1 and text in LETTERS[: len(choices)]:
        return LETTERS.index(text)
    if text in choices:
        return choices.index(text)
    raise ValueError(
        f"{row[0]}: field {field!r}: answer {value!r} is not a choice index "
        f"(0..{len(choices) - 1}), letter or choice text"
    )


def format_question(question: str, choices: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """``("Question: q\\n A. c1\\n B. c2\\nAnswer:", (" A", " B"))``: the letter format of the
    shipped commonsense tasks."""
    listed = "".join(f"\n {LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"Question: {question}{listed}\nAnswer:", tuple(
        f" {LETTERS[i]}" for i in range(len(choices))
    )


def choice_examples(rows: list[Row], fields: Fields, task: str) -> list[Example]:
    """Multiple-choice examples in the letter format (see `format_question`)."""
    first = rows[0]
    question_field = _pick(fields.question, QUESTION, first, "question")
    choices_field = _pick(fields.choices, CHOICES, first, "choices")
    answer_field = _pick(fields.answer, ANSWER, first, "answer")
    examples: list[Example] = []
    for row in rows:
        choices, labels = _choice_texts(row, choices_field)
        if len(choices) > len(LETTERS):
            raise ValueError(f"{row[0]}: field {choices_field!r}: more than 26 choices")
        prompt, continuations = format_question(str(_get(row, question_field)), choices)
        answer = _answer_index(row, answer_field, choices, labels)
        examples.append(ChoiceExample(prompt, continuations, answer, task))
    return examples
