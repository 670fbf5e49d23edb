"""`load_task_data`: shipped names, comma-separated mixtures, or a general file/folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raflora.training.data import images, planted, shipped
from raflora.training.data.files import Fields, read_source
from raflora.training.data.rows import LABEL, choice_examples, classification_examples
from raflora.training.data.types import KINDS, Example, TaskData, stratified_split, subsample, take

# A model task also names the data it needs.
TASK_TO_KIND = {"causal-lm": "multiple-choice", **{kind: kind for kind in KINDS}}


def _kind(task: str) -> str:
    if task not in TASK_TO_KIND:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASK_TO_KIND)}")
    return TASK_TO_KIND[task]


def _names(name_or_path: str) -> list[str]:
    if str(name_or_path).startswith(planted.PREFIX):  # one task; its spec holds commas
        return [str(name_or_path)]
    parts = [part.strip() for part in str(name_or_path).split(",") if part.strip()]
    if not parts:
        raise ValueError("data.name is empty")
    names: list[str] = []
    for part in parts:
        part = shipped.ALIASES.get(part, part)
        names.extend(shipped.GROUPS.get(part, (part,)))
    return names


def _general(
    path: Path,
    kind: str,
    seed: int,
    test_fraction: float,
    fields: Fields,
    num_labels: int | None,
    labels: Sequence[str] | None = None,
) -> shipped.Loaded:
    if kind == "image-classification":
        if labels is not None:
            raise ValueError(
                f"data.labels: {str(path)!r} is image data, whose classes are its class "
                "folders (sorted) or CIFAR-100's; drop data.labels"
            )
        return _images(path, seed, test_fraction)
    if images.holds_images(path):
        raise ValueError(
            f'data.name {str(path)!r} holds images; set model.task = "image-classification" '
            "(and an image model) or point data.name at text data"
        )
    label_field = fields.label or "label"
    train_rows, test_rows, names = read_source(path, label_field)
    if kind == "multiple-choice":
        if labels is not None:
            raise ValueError(
                f"data.labels: {str(path)!r} is multiple-choice data (its answers index its "
                "choices); data.labels is for classification labels: drop it"
            )
        rows = train_rows + (test_rows or [])
        examples = choice_examples(rows, fields, task=path.stem)
        width = max(len(example.choices) for example in examples)  # type: ignore[union-attr]
        label_names = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:width])
    else:
        if fields.label is None:
            label_field = next((f for f in LABEL if f in train_rows[0][1]), "label")
        rows = train_rows + (test_rows or [])
        examples, label_list = classification_examples(
            rows, fields, names, num_labels, label_field, labels
        )
        label_names = tuple(label_list)
        present = sorted({example.label for example in examples})
        if len(present) < 2:
            raise ValueError(
                f"{path}: only one label value ({label_names[present[0]]!r}) in field "
                f"{label_field!r}; classification needs at least 2 classes"
            )
    if test_rows is None:
        train_idx, test_idx = stratified_split([ex.label for ex in examples], test_fraction, seed)
        train, test = take(examples, train_idx), take(examples, test_idx)
        how = f"seeded stratified split, test fraction {test_fraction}"
    else:
        train, test = examples[: len(train_rows)], examples[len(train_rows) :]
        how = "its own train/test split"
    return train, test, label_names, kind, f"{path} ({kind}, {how})"


def _images(path: Path, seed: int, test_fraction: float) -> shipped.Loaded:
    """An image folder or CIFAR-100 binary (`images.load_images`), split seeded and stratified
    when it has no test split of its own."""
    train, test, label_names, where = images.load_images(path)
    present = sorted({example.label for example in train + (test or [])})
    if len(present) < 2:
        raise ValueError(
            f"data.name {str(path)!r}: only one class ({label_names[present[0]]!r}) has images; "
            "classification needs at least 2"
        )
    if test is None:
        train_idx, test_idx = stratified_split([ex.label for ex in train], test_fraction, seed)
        train, test = take(train, train_idx), take(train, test_idx)
        how = f"seeded stratified split, test fraction {test_fraction}"
    else:
        how = "its own train/test split"
    return train, test, label_names, "image-classification", f"{where}, {how}"


def _check_mixable(parts: list[tuple[str, shipped.Loaded]]) -> None:
    kinds = {loaded[3] for _, loaded in parts}
    if len(kinds) > 1:
        raise ValueError(f"data.name: cannot mix kinds {sorted(kinds)}")
    if kinds != {"multiple-choice"} and len({loaded[2] for _, loaded in parts}) > 1:
        raise ValueError(
            "data.name: classification datasets can only be mixed when their label names agree"
        )


def load_task_data(
    name_or_path: str,
    *,
    task: str,
    seed: int,
    train_size: int | None = None,
    test_size: int | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    text_pair_field: str | None = None,
    question_field: str | None = None,
    choices_field: str | None = None,
    answer_field: str | None = None,
    num_labels: int | None = None,
    test_fraction: float = 0.2,
    labels: Sequence[str] | None = None,
) -> TaskData:
    """Load a task's train/test examples.

    ``name_or_path`` is a shipped name (`shipped.shipped_names()`: ``rotten_tomatoes``, ``sst2``,
    ``rte``, ``mrpc``, ``boolq``, ``piqa``, ``siqa``, ``winogrande``, ``hellaswag``,
    ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``csqa``, ``mnist5k``, the group
    ``commonsense`` = the first eight multiple-choice tasks), a planted-rank teacher task
    (``planted:rank=32,classes=8``, see `raflora.training.data.planted`), a comma-separated
    mixture of multiple-choice tasks, or a path: a .jsonl / .csv / .parquet file or a folder with
    ``train.*`` and ``test.*`` (or ``validation.*``), or an HF save-to-disk folder; image
    tasks: a folder of class subfolders of images or CIFAR-100's binary version
    (`raflora.training.data.images`). ``task`` is
    the data kind or the model task (``causal-lm`` → ``multiple-choice``). Data without its own
    test split is split seeded and stratified (``test_fraction``). ``train_size`` /
    ``test_size`` (None or 0 = all) keep a seeded random subset — per task in a mixture.
    ``labels`` (``data.labels``, files only) declares a classification file's classes in order
    (see `classification_examples`).
    """
    kind = _kind(task)
    fields = Fields(
        text_field, text_pair_field, label_field, question_field, choices_field, answer_field
    )
    loaders = shipped.shipped_loaders()
    parts: list[tuple[str, shipped.Loaded]] = []
    for name in _names(name_or_path):
        if name in loaders:
            if labels is not None:
                raise ValueError(
                    f"data.labels: {name!r} is a shipped dataset with its own labels; "
                    "data.labels is for data files: drop it"
                )
            loaded = loaders[name](seed, test_fraction)
        elif name.startswith(planted.PREFIX):
            loaded = planted.load_planted(name, seed, test_fraction)
        else:
            loaded = _general(
                Path(name).expanduser(), kind, seed, test_fraction, fields, num_labels, labels
            )
        if loaded[3] != kind:
            raise ValueError(
                f"data.name {name!r} is {loaded[3]} data, but task {task!r} needs {kind} data"
            )
        parts.append((name, loaded))
    _check_mixable(parts)
    train: list[Example] = []
    test: list[Example] = []
    for _, (part_train, part_test, *_rest) in parts:
        train += subsample(part_train, train_size, seed)
        test += subsample(part_test, test_size, seed)
    label_names = max((loaded[2] for _, loaded in parts), key=len)
    sizes = f"{len(train)} train / {len(test)} test examples"
    return TaskData(
        train=train,
        test=test,
        num_labels=len(label_names),
        label_names=tuple(label_names),
        kind=kind,
        description="; ".join(loaded[4] for _, loaded in parts) + f" — {sizes}",
        tasks=tuple(name for name, _ in parts),
    )
