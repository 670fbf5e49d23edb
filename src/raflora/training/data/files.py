"""General data loader: .jsonl / .csv / .parquet files, folders of train/test files, and HF
``datasets`` save-to-disk folders (read with pyarrow, no ``datasets`` package needed).

Every problem is a one-line ``ValueError`` naming the file, the line or row, and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = tuple[str, dict[str, Any]]  # (where: "file line N" / "file row N", fields)
SUFFIXES = (".jsonl", ".csv", ".parquet")
TEST_NAMES = ("test", "validation", "val", "dev")


@dataclass(frozen=True)
class Fields:
    """Column names for the general loader (``None``: try the usual names)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    question: str | None = None
    choices: str | None = None
    answer: str | None = None


def _not_utf8(path: Path, error: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})")


def _jsonl_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON allows U+2028
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for number, line in enumerate(_jsonl_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _csv_rows(path: Path) -> Iterator[Row]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:
        return
    except pd.errors.ParserError as error:  # e.g. a row with more cells than the header
        message = " ".join(str(error).split())
        raise ValueError(f"{path}: malformed CSV ({message})") from None
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None
    for number, record in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        yield f"{path} line {number}", record


def _numbered(records: list[dict], path: Path) -> Iterator[Row]:
    for number, record in enumerate(records, start=1):
        yield f"{path} row {number}", record


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"{path}: unreadable Parquet file ({message})") from None
    yield from _numbered(table.to_pylist(), path)


def read_rows(path: Path) -> list[Row]:
    """All rows of one .jsonl / .csv / .parquet file; an empty file is an error."""
    readers = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
    rows = list(readers[path.suffix](path))
    if not rows:
        raise ValueError(f"{path}: empty file (no rows)")
    return rows


def _arrow_table(folder: Path) -> Any:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    tables = []
    for file in sorted(folder.glob("data-*.arrow")):
        with file.open("rb") as handle:
            tables.append(ipc.open_stream(handle).read_all())
    if not tables:
        raise ValueError(f"{folder}: no data-*.arrow files (not a save_to_disk dataset?)")
    return pa.concat_tables(tables)


def _label_names(folder: Path, field: str) -> list[str] | None:
    info = folder / "dataset_info.json"
    if not info.is_file():
        return None
    feature = json.loads(info.read_text()).get("features", {}).get(field, {})
    return list(feature["names"]) if isinstance(feature, dict) and "names" in feature else None


def read_arrow_folder(folder: Path, label_field: str) -> tuple[list[dict], list[str] | None]:
    """Rows and the label's class names (if declared) of one HF save-to-disk split folder."""
    return _arrow_table(folder).to_pylist(), _label_names(folder, label_field)


def _is_hf_split(folder: Path) -> bool:
    return (folder / "state.json").is_file() and any(folder.glob("data-*.arrow"))


def _find_split_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
        if _is_hf_split(folder / name):
            return folder / name
    return None


def _read_split(path: Path, label_field: str) -> tuple[list[Row], list[str] | None]:
    if path.is_dir():
        rows, names = read_arrow_folder(path, label_field)
        if not rows:
            raise ValueError(f"{path}: empty dataset (no rows)")
        return list(_numbered(rows, path)), names
    return read_rows(path), None


def read_source(
    path: Path, label_field: str
) -> tuple[list[Row], list[Row] | None, list[str] | None]:
    """``(train_rows, test_rows or None, label names or None)`` for a file or folder.

    A single file or a single HF split gives ``test_rows=None`` (the caller splits it); a folder
    needs ``train.*`` and one of ``test.* / validation.* / val.* / dev.*`` (files or HF splits).
    """
    if path.is_file():
        return read_rows(path), None, None
    if not path.is_dir():
        raise ValueError(f"data.name {str(path)!r}: no such file, folder or shipped dataset")
    if _is_hf_split(path):
        rows, names = _read_split(path, label_field)
        return rows, None, names
    train = _find_split_file(path, ("train",))
    test = _find_split_file(path, TEST_NAMES)
    if train is None:
        raise ValueError(f"{path}: no train.jsonl/.csv/.parquet or HF 'train' split folder inside")
    train_rows, names = _read_split(train, label_field)
    if test is None:
        return train_rows, None, names
    test_rows, _ = _read_split(test, label_field)
    return train_rows, test_rows, names
