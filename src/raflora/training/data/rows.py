"""Turn raw rows (dicts from the general loader) into examples, checking every field."""

from __future__ import annotations

import math
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


def _non_finite(value: Any) -> bool:
    """NaN or ±inf, as a JSON number or as text (``"NaN"``, ``"inf"``, ``"-Infinity"``)."""
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def check_label_value(row: Row, field: str, value: Any) -> None:
    """A label is a string or an integer, never NaN/inf (a missing value, not a class)."""
    where = row[0]
    if not isinstance(value, str | int | float):
        raise ValueError(
            f"{where}: field {field!r}: label {value!r} is a {type(value).__name__}; labels "
            "are strings or integers"
        )
    if _non_finite(value):
        raise ValueError(
            f"{where}: field {field!r}: label {value!r} is a missing or non-finite value, not a "
            "class; fix or drop the row (if it is a class, list every class in data.labels)"
        )


def _label_text(value: Any) -> str:
    """How a label value is matched against ``data.labels``: integers (also ``1.0``, ``true``)
    as their decimal text, anything else as its text."""
    if isinstance(value, bool | int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value)


def declared_label(row: Row, field: str, value: Any, labels: Sequence[str]) -> int:
    """The index of a row's label in ``data.labels`` (the text as given, else as an integer)."""
    for text in (str(value), _label_text(value)):
        if text in labels:
            return list(labels).index(text)
    shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
    raise ValueError(
        f"{row[0]}: field {field!r}: label {value!r} is not one of data.labels [{shown}]; add "
        "it there or fix the row"
    )


def check_contiguous(rows: list[Row], field: str, raw: list[Any]) -> int:
    """Integer labels without declared names are class indices: they must be exactly 0..K-1
    (K = number of distinct values), so one stray label (50 among 0 and 1) cannot silently make
    a 51-class head. Returns K; raises naming the first row outside 0..K-1."""
    values = sorted({int(value) for value in raw})
    count = len(values)
    if values == list(range(count)):
        return count
    pairs = zip(rows, raw, strict=True)
    row, value = next((r, int(v)) for r, v in pairs if not 0 <= int(v) < count)
    shown = ", ".join(map(str, values[:10])) + (", ..." if count > 10 else "")
    raise ValueError(
        f"{row[0]}: field {field!r}: label {value} out of range: integer labels must be the "
        f"classes 0..{count - 1} ({count} distinct values: {shown}); fix the row, or list the "
        f"classes in data.labels (e.g. labels = [{shown}])"
    )


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
    labels: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Text examples and the label names (``str(i)`` when the data gives none).

    ``labels`` (``data.labels``) declares the classes in order: class i is ``labels[i]``, and a
    row with any other label is refused. Without it, integer labels are class indices and must
    be 0..K-1; other labels are classes sorted by their text."""
    first = rows[0]
    text_field, pair_field = fields.text, fields.text_pair
    if text_field is None:
        pair = next((p for p in PAIRS if p[0] in first[1] and p[1] in first[1]), None)
        text_field, pair_field = pair if pair else (_pick(None, TEXT, first, "text"), None)
    raw = [_get(row, label_field) for row in rows]
    if labels is not None:
        pairs = zip(rows, raw, strict=True)
        indices = [declared_label(row, label_field, value, labels) for row, value in pairs]
        names, numeric, num_labels, raw = list(labels), True, len(labels), indices
    else:
        for row, value in zip(rows, raw, strict=True):
            check_label_value(row, label_field, value)
        names, numeric = label_vocabulary(raw, names)
        if num_labels is None and names is None:
            num_labels = check_contiguous(rows, label_field, raw)
        elif num_labels is None:
            num_labels = len(names)
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
