"""Shipped datasets, the general loader, its error messages, and encoding into batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from raflora.training.data import (
    ChoiceExample,
    ImageExample,
    TextExample,
    encode_examples,
    load_task_data,
    shipped_names,
    stratified_split,
)
from raflora.training.models import load_base_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# --- shipped datasets --------------------------------------------------------------------------


def test_rotten_tomatoes_drops_plot_rows_and_splits_stratified() -> None:
    data = load_task_data("rotten_tomatoes", task="classification", seed=0)
    assert data.kind == "classification" and data.label_names == ("rotten", "fresh")
    assert len(data.train) + len(data.test) == 7403 + 5405  # the 1097 plot rows are gone
    assert abs(len(data.test) - 0.2 * 12808) <= 2
    train_share = data.labels("train").mean()
    assert abs(train_share - data.labels("test").mean()) < 0.01
    assert abs(train_share - 7403 / 12808) < 0.01
    again = load_task_data("rotten_tomatoes", task="classification", seed=0)
    other = load_task_data("rotten_tomatoes", task="classification", seed=1)
    assert again.test == data.test and other.test != data.test


@pytest.mark.parametrize(
    ("name", "total", "names", "paired"),
    [
        ("sst2", 872, ("negative", "positive"), False),
        ("rte", 277, ("entailment", "not_entailment"), True),
        ("mrpc", 408, ("not_equivalent", "equivalent"), True),
    ],
)
def test_glue_validation_sets_are_split(name: str, total: int, names: tuple, paired: bool) -> None:
    data = load_task_data(name, task="classification", seed=3)
    assert len(data.train) + len(data.test) == total and data.label_names == names
    assert (data.train[0].text_pair is not None) == paired
    assert "validation set only" in data.description


@pytest.mark.parametrize(
    ("name", "train", "test", "choices"),
    [("piqa", 16113, 1838, 2), ("arc_easy", 2251, 2376, 5), ("csqa", 9741, 1221, 5)],
)
def test_commonsense_counts_match_the_olmo_files(name, train, test, choices) -> None:
    data = load_task_data(name, task="causal-lm", seed=0)
    assert (len(data.train), len(data.test)) == (train, test)
    assert data.kind == "multiple-choice" and data.num_labels == choices
    example = data.train[0]
    assert isinstance(example, ChoiceExample) and example.task == name
    assert example.prompt.endswith("Answer:") and example.choices[0] == " A"
    assert len({ex.prompt for ex in data.train}) > 0.95 * train  # deduplicated per question


@pytest.mark.slow
def test_all_commonsense_tasks_load_with_documented_sizes() -> None:
    sizes = {"boolq": (9427, 3270), "siqa": (33410, 1954), "winogrande": (40398, 1267),
             "hellaswag": (39905, 10042), "arc_challenge": (1119, 1172),
             "openbookqa": (4957, 500)}  # fmt: skip
    for name, expected in sizes.items():
        data = load_task_data(name, task="multiple-choice", seed=0)
        assert (len(data.train), len(data.test)) == expected, name


def test_mixture_subsamples_per_task_and_keeps_task_names() -> None:
    data = load_task_data(
        "arc_easy, arc_challenge", task="causal-lm", seed=0, train_size=50, test_size=20
    )
    assert Counter(ex.task for ex in data.train) == {"arc_easy": 50, "arc_challenge": 50}
    assert Counter(ex.task for ex in data.test) == {"arc_easy": 20, "arc_challenge": 20}
    assert data.tasks == ("arc_easy", "arc_challenge")
    assert data == load_task_data(
        "arc_easy,arc_challenge", task="causal-lm", seed=0, train_size=50, test_size=20
    )


def test_mnist5k_is_shuffled_images() -> None:
    data = load_task_data("mnist5k", task="image-classification", seed=0)
    assert len(data.train) + len(data.test) == 5000 and data.num_labels == 10
    assert isinstance(data.train[0], ImageExample) and data.train[0].pixels.shape == (28, 28)
    assert np.bincount(data.labels("test")).tolist() == [100] * 10
    assert np.any(np.diff(data.labels("train")) < 0)  # the file is sorted by label; we shuffle
    assert data.train[0].pixels.max() > 100


def test_digits_only_listed_when_sklearn_is_installed() -> None:
    import importlib.util

    has_sklearn = importlib.util.find_spec("sklearn") is not None
    assert ("digits8x8" in shipped_names()) == has_sklearn
    if not has_sklearn:
        with pytest.raises(ValueError, match="scikit-learn"):
            load_task_data("digits8x8", task="image-classification", seed=0)


def test_kind_mismatch_and_bad_task_are_errors() -> None:
    with pytest.raises(ValueError, match="needs multiple-choice data"):
        load_task_data("sst2", task="causal-lm", seed=0)
    with pytest.raises(ValueError, match="task 'text'"):
        load_task_data("sst2", task="text", seed=0)
    with pytest.raises(ValueError, match="no such file"):
        load_task_data("no_such_dataset", task="classification", seed=0)


# --- general loader ----------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text_rows(n: int) -> list[dict]:
    return [{"text": f"example number {i}", "label": i % 3} for i in range(n)]


def test_jsonl_csv_parquet_give_the_same_examples(tmp_path: Path) -> None:
    import pandas as pd

    rows = _text_rows(30)
    _jsonl(tmp_path / "d.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    loaded = [
        load_task_data(str(tmp_path / f"d.{ext}"), task="classification", seed=0)
        for ext in ("jsonl", "csv", "parquet")
    ]
    assert loaded[0].train == loaded[1].train == loaded[2].train
    assert loaded[0].num_labels == 3 and len(loaded[0].test) == 6


def test_folder_with_train_and_test_files_keeps_its_split(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", [{"review": "good", "stars": "pos"}] * 4)
    _jsonl(tmp_path / "validation.jsonl", [{"review": "bad", "stars": "neg"}] * 2)
    data = load_task_data(
        str(tmp_path), task="classification", seed=0, text_field="review", label_field="stars"
    )
    assert data.label_names == ("neg", "pos")
    assert [ex.label for ex in data.train] == [1] * 4 and [ex.label for ex in data.test] == [0] * 2


def test_hf_save_to_disk_folder(tmp_path: Path) -> None:
    import pyarrow as pa

    folder = tmp_path / "hf"
    folder.mkdir()
    table = pa.table({"sentence1": ["a", "b"] * 5, "sentence2": ["c", "d"] * 5,
                      "label": [0, 1] * 5})  # fmt: skip
    arrow = folder / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text("{}")
    info = {"features": {"label": {"names": ["no", "yes"], "_type": "ClassLabel"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    data = load_task_data(str(folder), task="classification", seed=0, test_fraction=0.4)
    assert data.label_names == ("no", "yes") and len(data.test) == 4
    assert data.train[0].text_pair in ("c", "d")


def test_multiple_choice_file_accepts_index_letter_and_text_answers(tmp_path: Path) -> None:
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "sky?", "choices": ["blue", "red", "green"], "answer": "A"},
        {"question": "cat?", "choices": ["dog", "cat"], "answer": "cat"},
        {"question": "ARC?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answer": "2"},
    ] * 5
    _jsonl(tmp_path / "mc.jsonl", rows)
    data = load_task_data(str(tmp_path / "mc.jsonl"), task="causal-lm", seed=0)
    by_prompt = {ex.prompt: ex for ex in data.train + data.test}
    assert by_prompt["Question: 2+2?\n A. 3\n B. 4\nAnswer:"].answer == 1
    assert by_prompt["Question: sky?\n A. blue\n B. red\n C. green\nAnswer:"].answer == 0
    assert by_prompt["Question: cat?\n A. dog\n B. cat\nAnswer:"].choices == (" A", " B")
    assert by_prompt["Question: cat?\n A. dog\n B. cat\nAnswer:"].answer == 1
    assert by_prompt["Question: ARC?\n A. x\n B. y\nAnswer:"].answer == 1
    assert data.num_labels == 3 and data.tasks == (str(tmp_path / "mc.jsonl"),)


@pytest.mark.parametrize(
    ("content", "task", "message"),
    [
        ('{"text": "a", "label": 0}\n{"text": "b", label: 1}\n', "classification",
         r"bad\.jsonl line 2: malformed JSON"),
        ('{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n', "classification",
         r"bad\.jsonl line 2: missing field 'text'"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": -1}\n', "classification",
         r"bad\.jsonl line 2: field 'label': label -1 out of range: .* classes 0\.\.1 "),
        ("", "classification", r"bad\.jsonl: empty file"),
        ('{"text": "a"}\n', "classification", r"bad\.jsonl line 1: missing field 'label'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', "multiple-choice",
         r"bad\.jsonl line 1: field 'answer': answer 5 is not a choice"),
        ('[1, 2]\n', "classification", r"bad\.jsonl line 1: expected a JSON object"),
        ('{"text": "a", "label": 0}\n', "image-classification", r"image data"),
    ],
)  # fmt: skip
def test_bad_files_give_one_line_errors(tmp_path: Path, content: str, task: str, message: str):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_task_data(str(tmp_path / "bad.jsonl"), task=task, seed=0, num_labels=None)
    assert "\n" not in str(error.value)


def test_label_out_of_range_with_declared_num_labels(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d.jsonl", _text_rows(9))
    with pytest.raises(ValueError, match=r"d\.jsonl line 3: .* label 2 out of range \[0, 2\)"):
        load_task_data(str(tmp_path / "d.jsonl"), task="classification", seed=0, num_labels=2)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_task_data(str(tmp_path / "d.txt"), task="classification", seed=0)


def test_stratified_split_keeps_proportions() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    train, test = stratified_split(labels, 0.25, seed=0)
    assert len(test) == 25 and labels[test].sum() == 5
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))


# --- encoding ----------------------------------------------------------------------------------


def test_text_encoding_pads_truncates_and_pairs(tiny_bert_dir: Path) -> None:
    _, tokenizer = load_base_model(str(tiny_bert_dir), "classification")
    examples = [TextExample("short", 1), TextExample("a much longer text " * 20, 0)]
    data = encode_examples(examples, tokenizer=tokenizer, max_length=16)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][0].sum() == 3 and batch["input_ids"][0, 3] == 0  # right pad
    pairs = encode_examples([TextExample("premise", 0, "hypothesis")], tokenizer=tokenizer)
    pair_batch = pairs.collate([pairs[0]])
    assert pair_batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1]]


def test_choice_encoding_left_pads_and_keeps_the_answer(tiny_llama_dir: Path) -> None:
    _, tokenizer = load_base_model(str(tiny_llama_dir), "causal-lm")
    examples = [
        ChoiceExample("Q: x\nAnswer:", (" A", " B"), 1),
        ChoiceExample("Question: " + "long " * 50 + "\nAnswer:", (" yes", " no"), 0),
    ]
    data = encode_examples(examples, tokenizer=tokenizer, max_length=32)
    batch = data.collate([data[0], data[1]])
    ids, mask, cont = batch["input_ids"], batch["attention_mask"], batch["cont_len"]
    assert ids.shape == (2, 32) and mask[1].all() and not mask[0, 0]  # left padding
    assert cont.tolist() == [1, 4]  # " B" is one token, " yes" four bytes
    assert tokenizer.decode(ids[0, -1:]) == " B" and tokenizer.decode(ids[1, -4:]) == " yes"
    assert tokenizer.decode(ids[1, :-4]).endswith("\nAnswer:")  # prompt truncated on the left
    assert data.single_token(0) and not data.single_token(1)
    prompts = list(data.prompt_batches([1, 0], batch_size=3))  # shortest prompt first
    assert prompts[0][1] == [0, 1] and prompts[0][0]["cont_len"].tolist() == [0, 0]
    pairs = [rows for _, rows in data.choice_batches([0, 1], batch_size=3)]
    assert pairs == [[(0, 0), (0, 1), (1, 1)], [(1, 0)]]  # " no" is shorter than " yes"


def test_image_encoding_normalises_and_resizes() -> None:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[0, 0] = 255
    examples = [ImageExample(pixels, 3), ImageExample(np.full((28, 28), 255, np.uint8), 1)]
    data = encode_examples(examples)
    batch = data.collate([data[0], data[1]])
    assert batch["pixel_values"].shape == (2, 1, 28, 28) and batch["labels"].tolist() == [3, 1]
    assert batch["pixel_values"][0, 0, 0, 0] == 1.0 and batch["pixel_values"][0, 0, 1, 1] == -1.0
    rgb = encode_examples(examples, image_size=32, num_channels=3)
    assert rgb[0]["pixel_values"].shape == (3, 32, 32)
    assert torch.allclose(rgb[1]["pixel_values"], torch.ones(3, 32, 32))
