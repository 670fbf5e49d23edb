"""`raflora run --dry-run`: every shipped run config whose assets are here passes, the bytes it
predicts are the bytes a run moves, and each kind of problem is one line with exit code 2."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.runs import run_in_process, tiny_config
from raflora.cli import app
from raflora.federation.dryrun import DryRunError, dry_run

ROOT = Path(__file__).resolve().parents[1]
# run configs (suite files, `raflora experiment`'s input, have a [suite] table instead)
RUN_CONFIGS = sorted(
    path
    for path in (ROOT / "examples").rglob("*.toml")
    if "suite" not in tomllib.loads(path.read_text())
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _invoke(*args: str):
    return CliRunner().invoke(app, ["run", *args, "--dry-run"])


def _assets_here(path: Path) -> bool:
    """Whether the config's model resolves on this machine (shipped alias or local folder)."""
    from raflora.training.models import resolve_model

    model = tomllib.loads(path.read_text()).get("model", {}).get("path", "minilm")
    try:
        resolve_model(model, materialize=False)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_dry_runs(path: Path, tmp_path: Path) -> None:
    result = _invoke(str(path), "--out", str(tmp_path))
    if not _assets_here(path):
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and ("model.path" in lines[0] or "data.name" in lines[0])
        pytest.skip(f"{path.name}: its model is not on this machine (refused in one line)")
    assert result.exit_code == 0, result.output
    assert "ok: " in result.output and "nothing was trained" in result.output
    assert "bytes " in result.output and "memory " in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_predicted_bytes_are_the_runs_bytes(tiny_bert_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_bert_dir, "federation.rounds=2")
    found = dry_run(config)
    history = run_in_process(config, tmp_path / "run", finish=False)["history"]
    steady = history[2]  # round 2: the first with LoRA factors both ways
    assert steady["bytes_sent"] + steady["bytes_received"] == found["bytes_per_round"]
    assert found["ranks"] == [2, 4, 8]
    assert found["target_modules"]["shapes"] == ["32x32"]
    assert found["bytes_exact"] is True  # raflora: the adapter wire


@pytest.mark.parametrize("method", ["flora", "fedex", "ffa_lora"])
def test_dry_run_says_when_its_bytes_are_an_estimate(tiny_bert_dir: Path, method: str) -> None:
    """Merged rounds, FedEx's residual and FFA-LoRA's B-only messages are not the adapter wire
    the dry run counts: it says so and names the method's own formula."""
    found = dry_run(tiny_config(tiny_bert_dir, f"federation.method={method}"))
    assert found["bytes_exact"] is False and found["wire"]
    assert sum(found["data"]["client_sizes"]) == found["data"]["train"] == 120


def test_memory_estimate_counts_weights_in_their_dtype(tiny_bert_dir: Path) -> None:
    full = dry_run(tiny_config(tiny_bert_dir))
    half = dry_run(tiny_config(tiny_bert_dir, "model.dtype=bfloat16"))
    weights_mb = full["model"]["parameters"] * 4 / 2**20
    for f32, b16 in zip(full["memory_mb"], half["memory_mb"], strict=True):
        assert f32 - b16 == pytest.approx(weights_mb / 2, rel=1e-9)
    assert full["memory_mb"] == sorted(full["memory_mb"])  # ranks 2 < 4 < 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['model.target_modules=["nothere"]'], "model.target_modules: no linear layer named"),
        (["clients.ranks=[2, 64]"], "clients.ranks: rank above 32 = min(out, in)"),
        (["data.name=/nonexistent/reviews.csv"], "/nonexistent/reviews.csv"),
        (["clients.num_clients=100", "clients.ranks=[2]"], "data.partition=dirichlet"),
        (["train.device=cuda"], "train.device = 'cuda'"),
    ],
)
def test_problems_are_one_line(tiny_bert_dir: Path, overrides: list[str], message: str) -> None:
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("checks the refusal on a CPU-only machine")
    args = [str(ROOT / "examples" / "tiny.toml"), "--set", f"model.path={tiny_bert_dir}"]
    for override in overrides:
        args += ["--set", override]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_missing_weight_files_are_named(tiny_bert_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(DryRunError, match=r"model\.path .* holds no weight files"):
        dry_run(tiny_config(folder))
