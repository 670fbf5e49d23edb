"""Flower ServerApp: the federated run's server, for simulation and deployment.

Deployment reads its settings from the run config (``flwr run … --run-config``):
``config-file`` (a raflora TOML file, absolute path; empty for the defaults), ``overrides``
(``"federation.method=flexlora; federation.rounds=3"``), ``out-dir`` and ``resume``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from raflora.config import Config, load_config
from raflora.federation.finish import finish_run
from raflora.federation.preflight import check_run
from raflora.federation.progress import Reporter
from raflora.federation.server import FederatedRun


def make_server_app(
    config: Config, run_dir: Path, *, resume: bool = False, reporter: Reporter | None = None
) -> ServerApp:
    """A ServerApp bound to one config (simulation: config comes from the caller)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        FederatedRun(config, run_dir, resume=resume, reporter=reporter).main(grid)

    return server_app


def config_from_run_config(run_config: dict) -> tuple[Config, Path, bool]:
    """Config, run folder and resume flag from Flower's run config (deployment)."""
    path = str(run_config.get("config-file", "") or "") or None
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    config = load_config(path, overrides)
    out_dir = str(run_config.get("out-dir", "") or "") or config.run.out_dir
    return config, Path(out_dir) / config.run.name, bool(run_config.get("resume", False))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, run_dir, resume = config_from_run_config(dict(context.run_config))
    # one-line errors before any client is asked; the clients check their own devices
    check_run(config, run_dir, resume=resume, clients_here=False)
    FederatedRun(config, run_dir, resume=resume).main(grid)
    finish_run(config, run_dir)
