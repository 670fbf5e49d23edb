"""Deployment mode on loopback: `flower-superlink`, 2 `flower-supernode`s and `flwr run deploy/`
for 2 rounds on a tiny model; the run must finish as completed and write its run folder.

Marked slow: every message starts a fresh `flwr-clientapp` process that imports torch,
transformers and PEFT, so even 2 tiny rounds take about 2 minutes on 2 busy cores (measured
113-136 s, of which ~25-33 s per round).
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from helpers.loopback import CONNECTION, Loopback, two_node_overrides
from helpers.runs import ROOT, TINY, check_run_outputs
from raflora.config import ConfigError, load_config
from raflora.federation.server_app import config_from_run_config


def test_deploy_app_folder_points_at_the_installed_apps() -> None:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    project = tomllib.loads((ROOT / "deploy" / "pyproject.toml").read_text())
    assert [p.name for p in (ROOT / "deploy").iterdir()] == ["pyproject.toml"]  # no code in FAB
    app = project["tool"]["flwr"]["app"]
    assert set(app["config"]) == {"config-file", "overrides", "out-dir", "resume"}
    expected = {"serverapp": ServerApp, "clientapp": ClientApp}
    for kind, ref in app["components"].items():
        module, attribute = ref.split(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), expected[kind])


def test_run_config_becomes_config_run_folder_and_resume(tiny_bert_dir: Path, tmp_path) -> None:
    run_config = {
        "config-file": str(TINY),
        "overrides": f" federation.rounds=3;model.path={tiny_bert_dir} ; clients.ranks=[2, 4, 8];",
        "out-dir": str(tmp_path),
        "resume": True,
    }
    config, run_dir, resume = config_from_run_config(run_config)
    assert config.federation.rounds == 3 and config.clients.ranks == [2, 4, 8]
    assert config.model.path == str(tiny_bert_dir)
    assert run_dir == tmp_path / "tiny" and resume is True
    defaults = {"config-file": "", "overrides": "", "out-dir": "", "resume": False}
    config, run_dir, resume = config_from_run_config(defaults)
    assert config == load_config() and run_dir == Path("runs") / "run" and resume is False
    with pytest.raises(ConfigError, match=r"^federation\.rounds"):
        config_from_run_config({**defaults, "overrides": "federation.rounds=0"})


@pytest.fixture
def loopback(tmp_path: Path):
    net = Loopback(tmp_path / "net")
    try:
        yield net
    finally:
        leftovers = net.stop()
        assert not leftovers, f"needed SIGKILL: {leftovers}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_supernodes_two_rounds(loopback: Loopback, tiny_bert_dir: Path, tmp_path: Path):
    out_dir = tmp_path / "runs"
    overrides = two_node_overrides(tiny_bert_dir, rounds=2, name="deployed")
    loopback.start_superlink()
    for pid in range(2):
        loopback.start_supernode(f"partition-id={pid} num-partitions=2")
    result = loopback.flwr(
        "run",
        str(ROOT / "deploy"),
        CONNECTION,
        "--stream",
        "--run-config",
        f'config-file="{TINY}" out-dir="{out_dir}" overrides="{overrides}"',
        timeout=400,
    )
    context = f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}\n{loopback.logs()}"
    assert result.returncode == 0, context
    runs = loopback.runs()
    assert len(runs) == 1, runs
    assert runs[0]["status"] == "finished:completed", f"{runs[0]}\n{context}"
    run_dir = out_dir / "deployed"
    history = check_run_outputs(run_dir, 2)
    assert all(r["ok"] == 2 and r["failed"] == 0 for r in history[1:])
    assert [r["clients"] for r in history[1:]] == [[0, 1], [0, 1]]

    # a bad setting fails the ServerApp: `flwr run --stream` still returns 0, `flwr ls` tells
    result = loopback.flwr(
        "run",
        str(ROOT / "deploy"),
        CONNECTION,
        "--stream",
        "--run-config",
        f'config-file="{TINY}" out-dir="{out_dir}" overrides="federation.rounds=0"',
        timeout=300,
    )
    failed = [run for run in loopback.runs() if run["run-id"] != runs[0]["run-id"]]
    assert len(failed) == 1 and failed[0]["status"] == "finished:failed", failed
    assert "federation.rounds" in failed[0]["status-details"] + result.stdout, failed
