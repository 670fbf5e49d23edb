"""Deployment mode on loopback: `flower-superlink`, 2 `flower-supernode`s and `flwr run deploy/`
for 2 rounds on a tiny model; the run must finish as completed and write its run folder.

Marked slow: every message starts a fresh `flwr-clientapp` process that imports torch,
transformers and PEFT, so even 2 tiny rounds take about 2 minutes on 2 busy cores (measured
113-136 s, of which ~25-33 s per round).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.loopback import CONNECTION, Loopback
from helpers.runs import ROOT, TINY, check_run_outputs


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
    overrides = "; ".join(
        [
            "clients.num_clients=2",
            "clients.ranks=[2, 8]",
            "federation.rounds=2",
            "federation.evaluate_clients=false",
            f"model.path={tiny_bert_dir}",
            "data.train_size=80",
            "data.test_size=20",
            "model.max_length=24",
            "train.local_steps=2",
            "train.batch_size=8",
            "run.name=deployed",
        ]
    )
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
