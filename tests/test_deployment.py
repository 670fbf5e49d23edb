"""Deployment mode on loopback: `flower-superlink`, 2 `flower-supernode`s and `flwr run deploy/`
for 2 rounds on a tiny model; the run must finish as completed and write its run folder. Also
a run whose ClientApp processes exit mid-round (faults.mode=vanish) must complete without them.

The newer methods (FedEx-LoRA with each residual wire, FFA-LoRA, FLoRIST) run there as well:
every round's bytes equal the method's formula (benchmarks/bench_bytes.py's), and FedEx-LoRA's
clients keep each round's residual in their SuperNode's node state across the fresh ClientApp
processes (3 rounds: round 3 sends round 2's residual alone, and the clients must hold round 1).

Marked slow: every message starts a fresh `flwr-clientapp` process that imports torch,
transformers and PEFT, so even 2 tiny rounds take about 2 minutes on 2 busy cores (measured
113-136 s, of which ~25-33 s per round; the new methods' runs 110-114 s for 2 rounds and
197-228 s for FedEx-LoRA's 3, at load average ~11). No fast version: one deployment run costs
well over 40 s; the same protocols run in process in tests/test_bench_bytes.py and
tests/test_fedex.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import tomllib
from pathlib import Path

import pytest

from helpers.loopback import Loopback, two_node_overrides
from helpers.runs import ROOT, TINY, check_run_outputs
from raflora.config import ConfigError, load_config
from raflora.federation.faults import failing_clients
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
    result, context = loopback.run_app(out_dir, overrides, timeout=400)
    assert result.returncode == 0, context
    runs = loopback.runs()
    assert len(runs) == 1, runs
    assert runs[0]["status"] == "finished:completed", f"{runs[0]}\n{context}"
    run_dir = out_dir / "deployed"
    history = check_run_outputs(run_dir, 2)
    assert all(r["ok"] == 2 and r["failed"] == 0 for r in history[1:])
    assert [r["clients"] for r in history[1:]] == [[0, 1], [0, 1]]

    # a bad setting fails the ServerApp: `flwr run --stream` still returns 0, `flwr ls` tells
    result, _ = loopback.run_app(out_dir, "federation.rounds=0", timeout=300)
    failed = [run for run in loopback.runs() if run["run-id"] != runs[0]["run-id"]]
    assert len(failed) == 1 and failed[0]["status"] == "finished:failed", failed
    assert "federation.rounds" in failed[0]["status-details"] + result.stdout, failed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_clientapp_process_that_exits_fails_its_client_not_the_run(
    loopback: Loopback, tiny_bert_dir: Path, tmp_path: Path
):
    """faults.mode=vanish in deployment: each round one of the two clients' `flwr-clientapp`
    processes exits (os._exit) mid-message. Its SuperNode stays up and reports it (Flower's
    error 8 after its heartbeat lapses, ~35 s here), the round is aggregated from the other
    client, metrics.json names the vanished one, and the next round's message to that
    SuperNode starts a fresh ClientApp (client 0 vanishes in rounds 1 and 2, trains in 3)."""
    out_dir = tmp_path / "runs"
    faults = "faults.fraction=0.5; faults.mode=vanish; federation.round_timeout_s=150"
    overrides = f"{two_node_overrides(tiny_bert_dir, rounds=3, name='vanishing')}; {faults}"
    run_config = {"config-file": str(TINY), "overrides": overrides, "out-dir": str(out_dir)}
    config, _, _ = config_from_run_config({**run_config, "resume": False})
    failing = [failing_clients(config, r) for r in (1, 2, 3)]
    assert all(len(f) == 1 for f in failing) and len(set().union(*failing)) == 2  # both vanish
    loopback.start_superlink()
    nodes = [loopback.start_supernode(f"partition-id={pid} num-partitions=2") for pid in (0, 1)]
    result, context = loopback.run_app(out_dir, overrides, timeout=500)
    assert result.returncode == 0, context
    runs = loopback.runs()
    assert len(runs) == 1 and runs[0]["status"] == "finished:completed", f"{runs}\n{context}"
    history = check_run_outputs(out_dir / "vanishing", 3)
    for record, vanished in zip(history[1:], failing, strict=True):
        assert {int(pid) for pid in record["failures"]} == vanished, (record, context)
        assert all("ClientApp stopped responding" in r for r in record["failures"].values())
        assert record["ok"] == 1 and record["failed"] == 1 and not record["skipped"], record
    assert all(node.poll() is None for node in nodes), context  # both SuperNodes still up


def bench_bytes():
    """benchmarks/bench_bytes.py as a module (its formula and `against_formula`)."""
    path = ROOT / "benchmarks" / "bench_bytes.py"
    spec = importlib.util.spec_from_file_location("_bench_bytes_deploy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("method", "options", "rounds"),
    [
        ("fedex", "", 3),
        ("fedex", "federation.options.residual_wire=dense", 3),
        ("ffa_lora", "", 2),
        ("florist", "", 2),
    ],
    ids=["fedex", "fedex-dense", "ffa_lora", "florist"],
)
def test_new_methods_run_deployed_with_their_bytes(
    loopback: Loopback, tiny_bert_dir: Path, tmp_path: Path, method: str, options: str, rounds: int
):
    """Two SuperNodes (ranks 2, 8), real processes on 127.0.0.1: the run completes, metrics.json
    has every round with both clients, and each round's counted bytes equal the formula."""
    import sys

    out_dir, name = tmp_path / "runs", f"deployed-{method}"
    overrides = f"{two_node_overrides(tiny_bert_dir, rounds=rounds, name=name)}; "
    overrides += f"federation.method={method}" + (f"; {options}" if options else "")
    run_config = {"config-file": str(TINY), "overrides": overrides, "out-dir": str(out_dir)}
    config, run_dir, _ = config_from_run_config({**run_config, "resume": False})
    loopback.start_superlink()
    for pid in range(2):
        loopback.start_supernode(f"partition-id={pid} num-partitions=2")
    result, context = loopback.run_app(out_dir, overrides, timeout=800)
    assert result.returncode == 0, context
    runs = loopback.runs()
    assert len(runs) == 1 and runs[0]["status"] == "finished:completed", f"{runs}\n{context}"
    history = check_run_outputs(run_dir, rounds)
    assert all(r["ok"] == 2 and r["failed"] == 0 for r in history[1:]), context
    assert [r["clients"] for r in history[1:]] == [[0, 1]] * rounds
    sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_bytes imports its _common
    try:
        row = bench_bytes().against_formula(config, run_dir)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert [r["round"] for r in row["rounds"]] == list(range(1, rounds + 1))
    assert row["matches"], row["rounds"]
    if method == "fedex":  # round 3 carries round 2's residual only: round 1 was confirmed
        first, second, third = (r["bytes_sent"] for r in row["rounds"])
        assert second > first and third == second, row["rounds"]
