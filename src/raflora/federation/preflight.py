"""Checks before a run starts: its folder, its data, every client's share, and the checkpoint to
resume.

Each would otherwise fail later, after Ray has started, inside the ServerApp thread or a
client process, with a traceback. Checked first, each is one line naming the problem; the data
is loaded through the same cached `task.load_data` the server then uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from raflora.config import Config
from raflora.federation import task
from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint


class RunSetupError(ValueError):
    """The run cannot start: unusable data or an impossible client partition (one line)."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def check_data(config: Config) -> None:
    """The data loads, has a test split, and every client gets a non-empty training share."""
    try:
        data = task.load_data(config.to_json())
    except (ValueError, OSError) as error:  # the loaders name the file, line and field
        raise RunSetupError(_one_line(error)) from None
    if not data.test:
        raise RunSetupError(
            f"data.name {config.data.name!r}: no test examples for the server's evaluation "
            f"({len(data.train)} training examples); add examples or a test file"
        )
    clients, partition = config.clients.num_clients, config.data.partition
    try:
        shares = task.client_shares(config, data)
    except ValueError as error:
        settings_ = [
            f"clients.num_clients={clients}",
            f"data.min_client_size={config.data.min_client_size}",
        ]
        if partition == "dirichlet":
            settings_.append(f"data.dirichlet_alpha={config.data.dirichlet_alpha:g}")
        where = f"data.partition={partition} ({', '.join(settings_)})"
        raise RunSetupError(f"{where}: {_one_line(error)}") from None
    for client, share in enumerate(shares):
        train, _ = task.local_split(config, share, client)
        if len(train) == 0:
            raise RunSetupError(f"client {client} gets no training examples ({partition} split)")


# what a run writes into its folder (config.toml alone is not a run: it is written before round 1)
RUN_OUTPUTS = ("run.json", "metrics.json", "metrics.csv", "checkpoints", "adapter", "plots")


def run_outputs(run_dir: Path) -> list[str]:
    """The outputs of an earlier run that `run_dir` holds (an empty folder counts as none)."""
    found = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_new_run(run_dir: Path) -> None:
    """A new run (no ``--resume``) must not write into a folder that holds another run: its
    run.json, adapter/ and metrics would mix with the new run's."""
    found = run_outputs(run_dir)
    if found:
        raise RunSetupError(
            f"{run_dir} already holds a run ({', '.join(found[:3])}); continue it with --resume, "
            "or start a new run under another run.name or --out"
        )


def clear_run(run_dir: Path) -> None:
    """Remove an earlier run's outputs from `run_dir` (`raflora demo` replaces its own runs);
    nothing else in the folder is touched."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()


def check_resume(run_dir: Path) -> None:
    """The checkpoint `--resume` would load is complete and intact (raises `CheckpointError`)."""
    path = latest_checkpoint(run_dir)
    if path is not None:
        load_checkpoint(path)


def check_run(config: Config, run_dir: Path, *, resume: bool = False) -> None:
    """Everything above, in the order a run would meet it."""
    if resume:
        check_resume(run_dir)
    check_data(config)
    if not resume:
        check_new_run(run_dir)
