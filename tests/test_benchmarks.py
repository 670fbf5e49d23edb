"""Smoke tests of the benchmark scripts: each runs its tiny ``--quick`` mode and ends with one JSON
line of the documented keys whose correctness checks pass. No timing is asserted: speed goals
live in the benchmarks' own output (benchmarks/README.md).

The scripts run in this process (``main()`` with patched ``sys.argv``), so they reuse the
libraries the test session already imported; their --quick modes never spawn workers or Ray.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(name: str, out: Path, capsys, monkeypatch, *extra: str) -> dict:
    """Run ``benchmarks/<name>.py --quick --out <out> ...``; return its last stdout line (JSON)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick", "--out", str(out), *extra])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text())["summary"] == summary  # the saved copy
    assert summary["quick"] is True
    return summary


def test_bench_allocate_quick(tmp_path, capsys, monkeypatch) -> None:
    summary = run_quick("bench_allocate", tmp_path / "a.json", capsys, monkeypatch)
    for key in (
        "speedup_4096_K20",
        "memory_ratio_4096_K20",
        "rel_diff_4096_K20_float64",
        "rel_diff_4096_K20_float32",
        "speedup_4096_K20_one_pass",
        "memory_ratio_4096_K20_one_pass",
        "llama7b_seconds",
        "llama7b_seconds_one_pass",
        "server_step_adapter_seconds",
        "server_step_speedup",
        "server_step_speedup_householder",
        "server_merge_step_adapter_seconds",
        "server_merge_step_speedup",
        "slope_vs_K",
        "slope_vs_sum_rank",
        "slope_vs_m_plus_n",
    ):
        assert key in summary, key
    assert summary["correct"] and summary["robust_correct"]
    assert summary["rel_diff_4096_K20_float64"] <= 1e-5
    assert summary["rel_diff_4096_K20_float32"] <= 1e-4
    assert summary["server_merge_value_diff"] <= 1e-6  # float32 values, either route
    assert summary["server_step_max_diff"] <= 1e-4  # decompose vs compress, stored in float32


def test_bench_client_quick(tmp_path, capsys, monkeypatch, tiny_bert_dir) -> None:
    path = ("--model-path", str(tiny_bert_dir))
    summary = run_quick("bench_client", tmp_path / "c.json", capsys, monkeypatch, *path)
    for key in ("overhead_minilm", "step_overhead_minilm", "examples_per_second_minilm",
                "tokens_per_second_minilm", "max_overhead", "goal_met"):  # fmt: skip
        assert key in summary, key
    assert summary["examples_per_second_minilm"] > 0 and summary["tokens_per_second_minilm"] > 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert rows[0]["ours_round_seconds"] >= rows[0]["ours_train_seconds"] > 0


@pytest.mark.usefixtures("single_torch_thread")
def test_bench_round_quick(tmp_path, capsys, monkeypatch, tiny_bert_dir) -> None:
    path = ("--model-path", str(tiny_bert_dir))
    summary = run_quick("bench_round", tmp_path / "r.json", capsys, monkeypatch, *path)
    for key in ("overhead_raflora", "overhead_flexlora", "train_phase_overhead_raflora",
                "bytes_per_round_raflora", "bytes_per_round_flexlora", "max_overhead"):  # fmt: skip
        assert key in summary, key
    assert summary["bytes_equal"]  # raflora and flexlora move exactly the same bytes
    assert summary["bytes_per_round_raflora"] == summary["bytes_per_round_flexlora"] > 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    for run in runs.values():
        for r in run["rounds"]:
            assert r["critical_path"] > 0 and r["wall"] >= r["train_phase"] > 0


def test_bench_stream_quick(tmp_path, capsys, monkeypatch) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    extra = ("--spool-root", str(spool))
    summary = run_quick("bench_stream", tmp_path / "s.json", capsys, monkeypatch, *extra)
    for key in ("peak_rss_bytes", "round_seconds", "time_ratio", "kept_state_bytes",
                "payload_max_rel_diff", "goal_memory_met", "goal_time_met"):  # fmt: skip
        assert key in summary, key
    assert summary["correct"] and summary["payload_max_rel_diff"] <= 1e-4
    assert summary["modules"] == 7 and summary["spool_bytes"] > 0
    assert list(spool.iterdir()) == []  # the benchmark deletes its spool
