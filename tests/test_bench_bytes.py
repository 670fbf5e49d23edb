"""benchmarks/bench_bytes.py on the tiny BERT: for every registered method, the bytes the strategy
counts in each of 2 rounds equal the paper's formula (the README's method table)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from raflora.math import available_methods

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bytes.py"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_measured_bytes_equal_the_formula_for_every_method(
    tiny_bert_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("_bench_bytes", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bytes.json"
    argv = ["bench_bytes.py", "--quick", "--model-path", str(tiny_bert_dir), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert saved["summary"] == summary and summary["quick"] is True
    rows = {row["method"]: row for row in saved["methods"]}
    assert set(rows) == set(available_methods())
    for method, row in rows.items():
        assert [r["round"] for r in row["rounds"]] == [1, 2]
        for r in row["rounds"]:
            assert (r["bytes_sent"], r["bytes_received"]) == (
                r["formula_sent"],
                r["formula_received"],
            ), (method, r)
        first, second = row["rounds"]
        assert first["ranks_sent"] == ([8, 8, 8] if method == "fedit" else [2, 4, 8])
        assert second["bytes_sent"] > first["bytes_sent"]  # round 2 sends the global update
    # FedEx-LoRA's dense residual: m n per module instead of (Σ r_k + r_max)(m + n), same ranks
    (variant,) = saved["variants"]
    assert variant["method"] == "fedex" and variant["options"] == {"residual_wire": "dense"}
    assert variant["matches"], variant["rounds"]
    first, second = variant["rounds"]
    assert first["bytes_sent"] == rows["fedex"]["rounds"][0]["bytes_sent"]
    assert second["bytes_sent"] != rows["fedex"]["rounds"][1]["bytes_sent"]
    assert second["bytes_received"] == rows["fedex"]["rounds"][1]["bytes_received"]
    assert summary["all_match"] is True
    # same ranks, same bytes: the product-averaging methods cost what zero-padding costs
    same = {rows[m]["rounds"][1]["bytes_sent"] for m in ("zeropad", "flexlora", "raflora")}
    assert len(same) == 1

    # HetLoRA clients that prune: round 1's replies and round 2's payloads use the pruned ranks
    pruning = ["federation.options.prune_threshold=1e9", "federation.options.gamma=0.5"]
    quick = [f"model.path={tiny_bert_dir}", "data.train_size=60", "data.test_size=16"]
    config = bench.demo_config("hetlora", bench.TINY, *quick, *pruning)
    row = bench.measure(config, tmp_path / "pruned")
    first, second = row["rounds"]
    assert first["ranks_sent"] == [2, 4, 8] and first["ranks_received"] == [1, 1, 1]
    assert second["ranks_sent"] == [1, 1, 1]
    assert row["matches"], row["rounds"]


def test_readme_method_table_lists_every_method_with_its_recorded_bytes() -> None:
    """The README's method table has one row per registered method, and its measured column
    quotes round 2 of benchmarks/results/bench_bytes.json (formula-checked when recorded)."""
    root = BENCH.parents[1]
    recorded = json.loads((root / "benchmarks" / "results" / "bench_bytes.json").read_text())
    assert recorded["summary"]["all_match"] is True and recorded["summary"]["quick"] is False
    readme = (root / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    methods = {name: row for name, row in rows.items() if name in available_methods()}
    assert set(methods) == set(available_methods())
    for row in recorded["methods"]:
        second = row["rounds"][1]
        assert second["bytes_sent"] == second["formula_sent"]
        total = second["bytes_sent"] + second["bytes_received"]
        assert f"{total:,}" in methods[row["method"]][-1], row["method"]
    for row in recorded["variants"]:  # quoted in the method's row, after its options
        second = row["rounds"][1]
        assert second["bytes_sent"] == second["formula_sent"]
        total = second["bytes_sent"] + second["bytes_received"]
        cell = methods[row["method"]][-1]
        for key, value in row["options"].items():
            assert f"{key} = {value}" in cell, row["options"]
        assert f"{total:,}" in cell.split(f"{key} = {value}")[1], row["method"]
