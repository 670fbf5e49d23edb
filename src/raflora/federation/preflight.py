"""Checks before a run starts: its data, every client's share, and the checkpoint to resume.

Each would otherwise fail later, after Ray has started, inside the ServerApp thread or a
client process, with a traceback. Checked first, each is one line naming the problem; the data
is loaded through the same cached `task.load_data` the server then uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def simulated_client_device(config: Config) -> torch.device:
    """The device a simulated client will train on: ``train.device`` as this machine resolves
    it, where ``auto`` is the GPU Ray assigns (``simulation.num_gpus_per_client`` > 0) or the
    CPU (none assigned). Raises ``DeviceError`` for a device that is not there."""
    from raflora.training.device import resolve_device

    if config.train.device == "auto":
        gpu = config.simulation.num_gpus_per_client > 0
        return resolve_device("cuda" if gpu else "cpu", "train.device")
    return resolve_device(config.train.device, "train.device")


def check_devices(config: Config, *, clients_here: bool) -> None:
    """The server's device exists; with ``clients_here`` (simulation: the clients run on this
    machine) so do the clients' device, the GPUs Ray is asked for, and ``model.dtype`` is one
    that device trains in. One line naming the field, as ``RunSetupError``."""
    from raflora.training.device import (
        DeviceError,
        check_quantization,
        resolve_device,
        resolve_dtype,
    )

    try:
        server = resolve_device(config.federation.server_device, "federation.server_device")
        # the server evaluates on the quantised base too
        field = "model.quantization (federation.server_device)"
        check_quantization(config.model.quantization, server, field)
        if not clients_here:
            return
        gpus = config.simulation.num_gpus_per_client
        if gpus > 0 and not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
            raise DeviceError(
                f"simulation.num_gpus_per_client = {gpus:g}: no CUDA GPU here for Ray to assign "
                "(the clients would wait for one forever); set it to 0"
            )
        device = simulated_client_device(config)
        resolve_dtype(config.model.dtype, device)
        check_quantization(config.model.quantization, device)
    except DeviceError as error:
        raise RunSetupError(str(error)) from None


def check_tracker_packages(config: Config) -> None:
    """Every tracker in ``run.trackers`` has its package installed (one line otherwise)."""
    from raflora.federation.trackers import TrackerError, check_trackers

    try:
        check_trackers(list(config.run.trackers))
    except TrackerError as error:
        raise RunSetupError(str(error)) from None


def check_resume(run_dir: Path) -> None:
    """The checkpoint `--resume` would load is complete and intact (raises `CheckpointError`)."""
    path = latest_checkpoint(run_dir)
    if path is not None:
        load_checkpoint(path)


def check_run(
    config: Config, run_dir: Path, *, resume: bool = False, clients_here: bool = True
) -> None:
    """Everything above, in the order a run would meet it (``clients_here`` False: a
    deployment's server, whose clients' devices are their own machines' business)."""
    check_devices(config, clients_here=clients_here)
    check_tracker_packages(config)
    if resume:
        check_resume(run_dir)
    check_data(config)
