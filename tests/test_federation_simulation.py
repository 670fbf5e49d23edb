"""The Flower simulation (Ray backend) end to end: one small run, and the same run in-process.

The in-process runs of test_federation_runs.py replace Ray by FakeGrid; this file checks that
Ray and FakeGrid give the same metrics bit for bit, so those tests speak for the simulation.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

import pytest

from helpers.runs import check_run_outputs, run_in_process, tiny_config, without_timing
from raflora.federation.simulation import run_federated

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_ray_simulation_writes_every_output_and_matches_the_in_process_run(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_bert_dir)
    summary = run_federated(config, tmp_path / "ray")
    history = check_run_outputs(tmp_path / "ray", 2)
    assert summary["rounds"] == 2 and summary["failed_clients"] == 0
    assert summary["wall_seconds"] > 0
    assert all(r["ok"] == 3 for r in history[1:])
    local = run_in_process(config, tmp_path / "local", finish=False)
    assert without_timing(history) == without_timing(local["history"])


@pytest.mark.slow
def test_ray_resume_matches_an_uninterrupted_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = ("federation.method=flexlora", "federation.fraction_train=0.67")
    run_dir = tmp_path / "ray"
    run_federated(tiny_config(tiny_bert_dir, *overrides, "federation.rounds=1"), run_dir)
    config = tiny_config(tiny_bert_dir, *overrides)
    summary = run_federated(config, run_dir, resume=True)
    history = check_run_outputs(run_dir, 2)
    assert summary["rounds"] == 2
    local = run_in_process(config, tmp_path / "local", finish=False)
    assert without_timing(history) == without_timing(local["history"])


def listening_sockets(seen: dict, stop: threading.Event) -> None:
    """Until `stop`: every listening TCP/UDP socket of this process and its descendants (Ray's
    gcs_server, raylet, agents, workers), as ``(process name, address) → port``."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        for proc in [me, *me.children(recursive=True)]:
            try:
                name, conns = proc.name(), proc.net_connections(kind="inet")
            except psutil.Error:  # it exited meanwhile
                continue
            for conn in conns:
                if conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM:
                    seen[name, conn.laddr.ip] = conn.laddr.port
        time.sleep(0.2)


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.removeprefix("::ffff:")).is_loopback


def test_every_socket_the_simulation_opens_is_on_loopback(tiny_bert_dir, tmp_path) -> None:
    """Issue 22.6: Ray has no authentication; nothing it starts may listen beyond 127.0.0.1."""
    config = tiny_config(
        tiny_bert_dir, "federation.rounds=1", "clients.num_clients=2", "clients.ranks=[2, 4]"
    )
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=listening_sockets, args=(seen, stop), daemon=True)
    watcher.start()
    try:
        summary = run_federated(config, tmp_path / "ray")
    finally:
        stop.set()
        watcher.join()
    assert summary["rounds"] == 1 and summary["failed_clients"] == 0
    names = {name for name, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the watcher saw Ray's servers
    exposed = {key: port for key, port in seen.items() if not is_loopback(key[1])}
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_ray_keeps_each_nodes_merged_rounds_between_messages(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """FLoRA's per-round wire relies on Flower's per-node ``context.state`` under Ray: round 3
    sends only round 2's stack (clients confirmed round 1), and a client whose state had not
    been kept would refuse it (``missing merged rounds [1]``)."""
    config = tiny_config(tiny_bert_dir, "federation.method=flora", "federation.rounds=3")
    run_federated(config, tmp_path / "ray")
    history = check_run_outputs(tmp_path / "ray", 3)
    assert all(r["ok"] == 3 and r["failures"] == {} for r in history[1:])
    assert history[3]["bytes_sent"] == history[2]["bytes_sent"] > history[1]["bytes_sent"]
    local = run_in_process(config, tmp_path / "local", finish=False)
    assert without_timing(history) == without_timing(local["history"])
