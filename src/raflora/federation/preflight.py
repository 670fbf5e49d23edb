"""Checks before a run starts: the checkpoint to resume, its data, every client's share, the
model (sequence length, memory budgets, ranks against the layers) and, for a simulation, what
it asks of this machine (CPUs, GPUs, threads).

Each would otherwise fail later, after Ray has started, inside the ServerApp thread or a
client process, with a traceback (or, for resources Ray cannot grant, a hang). Checked first,
each is one line naming the config field and the fix; data and model are loaded through the
same cached `task.load_data` / `task.load_base` the server then uses.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from raflora.config import Config, ConfigError
from raflora.federation import task
from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint
from raflora.training import TaskData, lora_shapes

RAY_RESOURCE_STEP = 1e-4  # Ray refuses a resource share that rounds to 0 in its fixed point


class RunSetupError(ValueError):
    """The run cannot start: unusable data or an impossible client partition (one line)."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def check_data(config: Config) -> TaskData:
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
    return data


def _rank_source(config: Config, *, budgets: str = "clients.memory_budgets_mb") -> str:
    """The config field the client ranks come from, for messages (``budgets``: the field to
    name when memory budgets pick them)."""
    clients = config.clients
    if clients.rank_tiers is not None:
        return "clients.rank_tiers"
    return budgets if clients.memory_budgets_mb is not None else "clients.ranks"


def check_max_length(config: Config, base: nn.Module) -> None:
    """A text model reads at most ``max_position_embeddings`` tokens: ``model.max_length`` must
    not ask for more (beyond it a learned position table has no row, and every client fails)."""
    limit = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    if config.model.task == "image-classification" or not isinstance(limit, int):
        return
    if config.model.max_length > limit:
        raise RunSetupError(
            f"model.max_length={config.model.max_length} exceeds the {limit} positions of "
            f"model.path {config.model.path!r} (its max_position_embeddings); use "
            f"model.max_length ≤ {limit}"
        )


def check_model(config: Config, data: TaskData, *, config_ranks: bool = True) -> None:
    """The model loads and takes ``model.max_length`` tokens, the memory budgets fit a candidate
    rank, and (``config_ranks``: ranks from the config, as in a simulation) every client rank
    r_k ≤ min(m, n) of every target module W (m×n)."""
    from raflora.federation.server import check_ranks_fit
    from raflora.federation.strategy import NodeInfo

    config_json = config.to_json()
    try:
        base, _ = task.load_base(config_json, task.model_num_labels(config, data))
    except (ValueError, OSError) as error:
        raise RunSetupError(f"model.path {config.model.path!r}: {_one_line(error)}") from None
    check_max_length(config, base)
    try:
        ranks = task.client_ranks(config, base)
    except ValueError as error:  # a budget that fits no candidate rank
        raise RunSetupError(
            f"{_rank_source(config)}: {_one_line(error)}; raise the budget or add a smaller "
            "rank to clients.candidate_ranks"
        ) from None
    if not config_ranks:  # deployment: nodes may bring their own ranks; the server checks them
        return
    try:
        model = task.lora_model(config, base, 1, seed=0)
    except ValueError:  # PEFT: no module matches model.target_modules
        names = sorted(task.target_modules(config, base))
        raise RunSetupError(
            f"model.target_modules: no linear layer named {names} in {type(base).__name__}; "
            f"its linear layers: {', '.join(_linear_names(base))}"
        ) from None
    modules = {name: (m, n) for name, (m, n, _) in lora_shapes(model).items()}
    nodes = [NodeInfo(pid, pid, rank, 0) for pid, rank in enumerate(ranks)]
    try:
        check_ranks_fit(nodes, modules)
    except ConfigError as error:
        message = _one_line(error).removeprefix("clients.ranks: ")
        # memory budgets pick the largest candidate that fits: the candidates are too large
        field = _rank_source(config, budgets="clients.candidate_ranks")
        raise RunSetupError(f"{field}: {message}") from None


def _linear_names(model: nn.Module) -> list[str]:
    """The last name parts of the model's linear layers (what ``target_modules`` lists)."""
    from transformers.pytorch_utils import Conv1D

    layers = (nn.Linear, Conv1D)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, layers)})


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; else every core)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def check_machine(config: Config) -> None:
    """What a simulation asks of this machine, it has: Ray is given ``os.cpu_count()`` CPUs
    (`simulation.backend_config`), and an actor that needs more never starts (Ray waits for
    it forever); a GPU share needs a GPU; torch threads beyond the usable cores only contend."""
    import torch

    from raflora.federation.simulation import backend_config

    sim, cpus = config.simulation, backend_config(config)["init_args"]["num_cpus"]
    for field, share in (
        ("simulation.num_cpus_per_client", sim.num_cpus_per_client),
        ("simulation.num_gpus_per_client", sim.num_gpus_per_client),
    ):
        if 0 < share < RAY_RESOURCE_STEP:
            raise RunSetupError(
                f"{field}={share:g}: Ray counts resources in steps of {RAY_RESOURCE_STEP:g}; "
                f"use at least {RAY_RESOURCE_STEP:g}"
            )
    if sim.num_cpus_per_client > cpus:
        raise RunSetupError(
            f"simulation.num_cpus_per_client={sim.num_cpus_per_client:g} exceeds the {cpus} "
            f"CPUs of this machine (what the simulation gives Ray); use at most {cpus}"
        )
    gpus = torch.cuda.device_count()
    if sim.num_gpus_per_client > gpus:
        have = f"only {gpus} GPU(s)" if gpus else "no GPU (torch.cuda.device_count() == 0)"
        fix = f"at most {gpus}" if gpus else "0"
        raise RunSetupError(
            f"simulation.num_gpus_per_client={sim.num_gpus_per_client:g}: this machine has "
            f"{have}; set it to {fix}"
        )
    cores = usable_cpus()
    for field, threads in (
        ("train.threads", config.train.threads),
        ("federation.server_threads", config.federation.server_threads),
    ):
        if threads > cores:
            raise RunSetupError(
                f"{field}={threads} exceeds the {cores} CPU cores this process may use; use at "
                f"most {cores} (0: the default)"
            )


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


def check_run(
    config: Config, run_dir: Path, *, resume: bool = False, simulation: bool = True
) -> None:
    """Everything above, in the order a run would meet it. ``simulation``: the clients run on
    this machine with the config's ranks (False in deployment: their machines, devices and
    ranks are the nodes' own business)."""
    if simulation:
        check_machine(config)
    check_devices(config, clients_here=simulation)
    check_tracker_packages(config)
    if resume:
        check_resume(run_dir)
    check_model(config, check_data(config), config_ranks=simulation)
    if not resume:
        check_new_run(run_dir)
