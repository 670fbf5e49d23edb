"""Run a federated job as a Flower simulation (Ray backend) from a validated config."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from raflora.config import Config
from raflora.federation.progress import Reporter

log = logging.getLogger("raflora")


def quiet_flower() -> None:
    """Less Flower/Ray chatter; must run before `flwr` is first imported to take effect."""
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


LOOPBACK = "127.0.0.1"


def ray_on_loopback() -> None:
    """Make every server Ray starts (GCS, raylet, object manager, workers, runtime-env agent)
    listen on 127.0.0.1 only: Ray has no authentication, so a port open on the network lets
    anyone who reaches the machine join the cluster and run code in it.

    Ray binds its gRPC servers to 127.0.0.1 when the node's IP address is 127.0.0.1, and to
    every interface otherwise; on Linux it replaces a requested 127.0.0.1 by the machine's
    outward address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode,
    read when ``ray`` is first imported; set here and, if Ray is already imported, in its
    constants too). Together with ``_node_ip_address`` in `backend_config` this keeps the whole
    simulation on loopback (tests/test_federation_simulation.py checks every listening socket).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def backend_config(config: Config) -> dict[str, Any]:
    """Ray resources: one actor per `num_cpus_per_client` CPUs, a small object store, every
    server on loopback (`ray_on_loopback`) and no dashboard."""
    sim = config.simulation
    return {
        "client_resources": {  # passed to the actors' .options(...)
            "num_cpus": sim.num_cpus_per_client,
            "num_gpus": sim.num_gpus_per_client,
            # A client process that exits (faults.mode=vanish, OOM, segfault) kills its Ray
            # actor, and Flower puts the dead actor back into its pool: every later message it
            # gets fails too. Restart dead actors, and retry a message once when its actor died
            # under it, so only the client that died is reported failed.
            "max_restarts": -1,
            "max_task_retries": 1,
        },
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "object_store_memory": 256 * 1024**2,
            "log_to_driver": False,
            "logging_level": "ERROR",
            "_node_ip_address": LOOPBACK,
            "include_dashboard": False,
        },
    }


def run_federated(
    config: Config,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Simulate the whole run and write its outputs; returns the run summary (run.json)."""
    quiet_flower()
    ray_on_loopback()
    from flwr.simulation import run_simulation

    from raflora.federation.client_app import app as client_app
    from raflora.federation.finish import finish_run
    from raflora.federation.preflight import check_run
    from raflora.federation.server_app import make_server_app

    run_dir = Path(run_dir or Path(config.run.out_dir) / config.run.name)
    check_run(config, run_dir, resume=resume)  # bad data or checkpoint: one line, before Ray
    run_dir.mkdir(parents=True, exist_ok=True)  # config.toml: written by FederatedRun.main
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(config, run_dir, resume=resume, reporter=reporter),
        client_app=client_app,
        num_supernodes=config.clients.num_clients,
        backend_config=backend_config(config),
    )
    return finish_run(config, run_dir, wall_seconds=time.perf_counter() - start)
