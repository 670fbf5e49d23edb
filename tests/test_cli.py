"""The command line: help, config docs, errors, the synthetic command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raflora.cli import app
from raflora.config_docs import as_markdown, fields
from raflora.math import available_methods

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_methods_lists_every_registered_method():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for method in available_methods():
        assert method in result.output
    assert "raFLoRA: rank-partitioned aggregation" in result.output  # its registered summary


def test_methods_details_show_each_methods_protocol_and_options():
    result = runner.invoke(app, ["methods", "--details"])
    assert result.exit_code == 0
    assert "leading r columns of the kept averaged factors" in result.output  # zeropad & co
    assert "best rank-r truncation" in result.output  # flexlora & co
    assert "reg_lambda=0.0005" in result.output  # hetlora's options with their defaults
    assert "Cho, Liu" in result.output  # the HetLoRA paper's citation


def test_method_summary_is_the_registered_line_and_rejects_unknown_names():
    from raflora.math import get_method
    from raflora.math.methods import method_summary

    assert method_summary("raflora") == get_method("raflora").summary
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods"):
        method_summary("nope")


def test_config_docs_cover_every_field_with_a_description():
    rows = fields()
    assert len(rows) > 40
    for name, _, _, text in rows:
        assert text, f"{name} has no description"


def test_readme_config_table_is_current():
    assert as_markdown() in (ROOT / "README.md").read_text()


def test_run_rejects_bad_config_with_one_line_per_field():
    result = runner.invoke(
        app,
        [
            "run",
            str(ROOT / "examples" / "tiny.toml"),
            "--set",
            "clients.ranks=[0, 2]",
            "--set",
            "federation.method=nope",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2
    assert "clients.ranks: rank must be >= 1 (got 0)" in result.output
    assert "federation.method: unknown method 'nope'" in result.output


def test_run_reports_missing_config_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "no checkpoint to export (has it done a round?)" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "nope: no such run folder" in result.output


def test_export_of_a_folder_of_runs_names_them(tmp_path):
    for name in ("raflora", "flexlora"):  # as `raflora demo` lays them out
        (tmp_path / name / "checkpoints" / "round_001").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "round_001" / "state.json").write_text("{}")
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "it holds runs flexlora, raflora: export one" in " ".join(result.output.split())
    assert not (tmp_path / "a").exists()


def test_resume_of_a_missing_run_folder_is_refused(tmp_path):
    args = ["run", str(ROOT / "examples" / "tiny.toml"), "--out", str(tmp_path), "--resume"]
    result = runner.invoke(app, [*args, "--set", "run.name=typo", "--no-progress"])
    assert result.exit_code == 2
    assert "--resume: no run folder" in result.output and "run.name" in result.output
    assert not (tmp_path / "typo").exists()


def test_a_new_run_into_a_folder_holding_a_run_is_refused(tiny_bert_dir, tmp_path):
    """Issue 22.1: `raflora run` without --resume into runs/tiny, which holds a finished run,
    stops with one line (exit 2) before it starts and leaves the old run as it was."""
    import os
    import subprocess
    import sys

    from helpers.runs import run_in_process, tiny_config

    run_dir = tmp_path / "tiny"  # examples/tiny.toml: run.name = "tiny"
    config = tiny_config(tiny_bert_dir, "federation.rounds=1", f"run.out_dir={str(tmp_path)!r}")
    run_in_process(config, run_dir)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert {"run.json", "metrics.json"} <= {p.name for p in before}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "raflora.cli", "run", str(ROOT / "examples" / "tiny.toml"),
         "--set", "federation.method=flexlora", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{run_dir} already holds a run (run.json" in lines[0]
    assert "--resume" in lines[0] and "run.name" in lines[0] and "--out" in lines[0]
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_best_accuracy_counts_trained_rounds_only():
    from raflora.federation.finish import final_metrics

    rows = [(0, 0.60), (1, 0.40), (2, 0.55), (3, 0.50)]  # the untrained start scores highest
    history = [
        {"round": r, "server_accuracy": a, "server_loss": 1.0, "bytes_sent": 1, "bytes_received": 1}
        for r, a in rows
    ]
    metrics = final_metrics(history)
    assert metrics["best_accuracy"] == 0.55 and metrics["final_accuracy"] == 0.50
    assert final_metrics(history[:1])["best_accuracy"] is None  # no trained round yet


def test_a_one_round_energy_plot_draws_without_warnings(tmp_path):
    import warnings

    from raflora.plots import plot_partition_energy

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_partition_energy({"raflora": [[0.5, 0.3, 0.2]]}, [2, 4], tmp_path / "e.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_command_writes_results(tmp_path):
    out = tmp_path / "syn"
    args = ["synthetic", "--out", str(out), "--rounds", "3", "--methods", "raflora,flexlora"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"raflora", "flexlora"}
    assert len(results["raflora"]["rel_error"]) == 3
    assert (out / "plots" / "partition_energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_command_rejects_bad_option(tmp_path):
    result = runner.invoke(app, ["synthetic", "--out", str(tmp_path), "--fraction", "0"])
    assert result.exit_code == 2
    assert "fraction" in result.output
    result = runner.invoke(app, ["synthetic", "--out", str(tmp_path), "--ranks", "2,x"])
    assert result.exit_code == 2
    assert "--ranks '2,x': comma-separated integers" in result.output


def test_demo_outside_the_repository_says_where_its_config_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "examples/demo.toml is relative to the repository root" in output
    assert not (tmp_path / "runs").exists()


def test_tables_piped_or_logged_keep_their_headers_whole(capsys):
    from rich.table import Table

    from raflora.cli import _print_table

    table = Table(title="runs compared")
    titles = ["run", "final acc", "best acc", "top-r_min energy", "eff. rank", "bytes/round"]
    for title in [*titles, "a column past eighty characters wide"]:
        table.add_column(title)
    table.add_row("flexlora_no_merge", "0.630", "0.643", "0.845", "3.34", "4,171,072", "x")
    _print_table(table)  # stdout is captured: not a terminal, rich would fit it to 80 columns
    out = capsys.readouterr().out
    assert "top-r_min energy" in out and "flexlora_no_merge" in out and "4,171,072" in out
    assert "a column past eighty characters wide" in out and "…" not in out
