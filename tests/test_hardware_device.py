"""Device choice: `train.device` / `federation.server_device` resolution and its errors (torch's
CUDA/MPS probes mocked), the preflight and CLI refusals, the server's math on a device, and
(CUDA only) a client round and a server step on the GPU against the CPU."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from raflora.cli import app
from raflora.config import ConfigError, load_config
from raflora.federation import task
from raflora.federation.preflight import RunSetupError, check_devices, simulated_client_device
from raflora.math import get_method
from raflora.math.device import computing_on, on_device, on_host
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    RoundSettings,
    aggregate_round,
)
from raflora.training.device import DeviceError, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """``gpus(n)`` makes torch report n visible CUDA devices (0: none) and no MPS."""

    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return set_count


@pytest.mark.parametrize(
    ("count", "spec", "expected"),
    [
        (0, "auto", "cpu"),
        (0, "cpu", "cpu"),
        (2, "auto", "cuda:0"),
        (2, "cuda", "cuda:0"),
        (2, "cuda:1", "cuda:1"),
        (2, "cpu", "cpu"),
    ],
)
def test_resolve_device(gpus, count: int, spec: str, expected: str) -> None:
    gpus(count)
    assert resolve_device(spec) == torch.device(expected)


def test_auto_prefers_mps_without_cuda(gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    gpus(0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize(
    ("count", "spec", "message"),
    [
        (0, "cuda", "train.device = 'cuda': no CUDA device"),
        (0, "cuda:0", "train.device = 'cuda:0': no CUDA device"),
        (2, "cuda:2", "train.device = 'cuda:2': only 2 CUDA device(s) visible (cuda:0 … cuda:1)"),
        (0, "mps", "train.device = 'mps': Apple's MPS backend is not available"),
        (0, "gpu", "train.device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_missing_device_names_the_field(gpus, count: int, spec: str, message: str) -> None:
    gpus(count)
    with pytest.raises(DeviceError) as error:
        resolve_device(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def _fake_ray(actor: bool, gpu_ids: list[int]) -> types.ModuleType:
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: True  # type: ignore[attr-defined]
    context = types.SimpleNamespace(get_actor_id=lambda: "actor-1" if actor else None)
    ray.get_runtime_context = lambda: context  # type: ignore[attr-defined]
    ray.get_gpu_ids = lambda: gpu_ids  # type: ignore[attr-defined]
    return ray


@pytest.mark.parametrize(
    ("actor", "ids", "expected"),
    [
        (True, [], "cpu"),  # a Ray actor without a GPU share trains on the CPU, GPUs or not
        (True, [3], "cuda:0"),  # Ray's GPU 3 is cuda:0 under its CUDA_VISIBLE_DEVICES
        (False, [], "cuda:0"),  # the driver: whatever torch sees
    ],
)
def test_auto_in_ray_uses_the_assigned_gpu(
    gpus, monkeypatch: pytest.MonkeyPatch, actor: bool, ids: list[int], expected: str
) -> None:
    gpus(2)
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(actor, ids))
    assert resolve_device("auto") == torch.device(expected)


def test_config_checks_device_syntax() -> None:
    with pytest.raises(ConfigError, match=r"^train.device: 'gpu' is not a device"):
        load_config(None, ["train.device=gpu"])
    with pytest.raises(ConfigError, match=r"^federation.server_device: mps has no float64"):
        load_config(None, ["federation.server_device=mps"])
    with pytest.raises(ConfigError, match=r"^model.dtype: "):
        load_config(None, ["model.dtype=float64"])
    config = load_config(None, ["train.device='cuda:1'", "federation.server_device=auto"])
    assert (config.train.device, config.federation.server_device) == ("cuda:1", "auto")


def test_float16_needs_cuda() -> None:
    with pytest.raises(DeviceError, match=r"model.dtype = 'float16' needs a CUDA device"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda:0")) == torch.float16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.device=cuda"], "train.device = 'cuda': no CUDA device"),
        (["federation.server_device='cuda:0'"], "federation.server_device = 'cuda:0'"),
        (["simulation.num_gpus_per_client=0.5"], "simulation.num_gpus_per_client = 0.5: no CUDA"),
        (["model.dtype=float16"], "model.dtype = 'float16' needs a CUDA device"),
    ],
)
def test_preflight_refuses_missing_devices(gpus, overrides: list[str], message: str) -> None:
    gpus(0)
    config = load_config(None, overrides)
    with pytest.raises(RunSetupError, match=message.replace("(", r"\(")):
        check_devices(config, clients_here=True)


def test_deployment_server_does_not_check_client_devices(gpus) -> None:
    gpus(0)
    check_devices(load_config(None, ["train.device=cuda"]), clients_here=False)
    with pytest.raises(RunSetupError, match=r"federation\.server_device"):
        check_devices(load_config(None, ["federation.server_device=cuda"]), clients_here=False)


def test_simulated_auto_follows_the_ray_gpu_share(gpus) -> None:
    gpus(1)
    assert simulated_client_device(load_config(None, [])) == torch.device("cpu")
    shared = load_config(None, ["simulation.num_gpus_per_client=0.5"])
    assert simulated_client_device(shared) == torch.device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cli_refuses_a_missing_gpu_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            *("run", str(ROOT / "examples" / "tiny.toml"), "--out", str(tmp_path)),
            *("--no-progress", "--set", "train.device=cuda"),
        ],
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.device = 'cuda': no CUDA device" in lines[0]
    assert not (tmp_path / "tiny").exists()


def test_server_device_cpu_is_the_identity() -> None:
    B, A = np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)
    with computing_on("cpu"):
        assert on_device(B, A)[0] is B
    assert on_host(torch.ones(2))[0].dtype == np.float32
    assert on_device(B)[0] is B  # no device set


def _round_inputs(seed: int = 0) -> tuple[GlobalState, list[ClientUpdate], RoundSettings]:
    rng = np.random.default_rng(seed)
    updates = []
    for pid, rank in enumerate((2, 4, 8)):
        factors = {
            name: (
                rng.standard_normal((24, rank)).astype(np.float32),
                rng.standard_normal((rank, 16)).astype(np.float32),
            )
            for name in ("q", "v")
        }
        updates.append(ClientUpdate(pid, rank, 10 + pid, factors))
    state = GlobalState(0, {}, {}, {}, {})
    return state, updates, RoundSettings.of(get_method("raflora"), bounds=(2, 4, 8))


@CUDA
def test_server_step_on_cuda_matches_cpu() -> None:
    state, updates, settings = _round_inputs()
    cpu_state, cpu_diag = aggregate_round(state, updates, settings)
    with computing_on("cuda"):
        gpu_state, gpu_diag = aggregate_round(state, updates, settings)
    for name, update in cpu_state.adapter.items():
        other = gpu_state.adapter[name]
        assert isinstance(other.S, np.ndarray)
        np.testing.assert_allclose(other.S, update.S, rtol=1e-5)
        B, A = update.factors(4)
        Bg, Ag = other.factors(4)
        np.testing.assert_allclose(Bg @ Ag, B @ A, atol=1e-4)
    assert gpu_diag["top_rmin_energy"] == pytest.approx(cpu_diag["top_rmin_energy"], rel=1e-5)


@CUDA
def test_client_round_on_cuda_sends_float32_numpy(tiny_bert_dir: Path) -> None:
    from raflora.federation import client as work

    config = load_config(
        ROOT / "examples" / "tiny.toml",
        [
            f"model.path={tiny_bert_dir}",
            "data.train_size=60",
            "data.test_size=10",
            "train.local_steps=2",
            "train.batch_size=8",
            "train.device=cuda",
        ],
    )
    ctx = work.client_context(config.to_json(), 0)
    assert ctx.device.type == "cuda"
    factors, dense, metrics = work.train_round(ctx, 1, ctx.rank, {}, {}, {})
    for B, A in factors.values():
        assert isinstance(B, np.ndarray) and B.dtype == np.float32 and A.dtype == np.float32
    assert np.isfinite(metrics["train-loss"])
    assert all(v.dtype == np.float32 for v in dense.values())
    assert task.train_device(config)[0].type == "cuda"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantised_base_refused_without_bitsandbytes_or_cuda(
    gpus, monkeypatch: pytest.MonkeyPatch, bits: str
) -> None:
    import importlib.util

    gpus(0)
    real = importlib.util.find_spec
    config = load_config(None, [f"model.quantization={bits}"])
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(RunSetupError) as error:
        check_devices(config, clients_here=True)
    assert str(error.value).startswith(f"model.quantization (federation.server_device) = '{bits}'")
    assert "pip install 'raflora[quant]'" in str(error.value)
    # bitsandbytes present but no CUDA: the backend is what is missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(RunSetupError, match=rf"= '{bits}' needs a CUDA device"):
        check_devices(config, clients_here=True)
    with pytest.raises(DeviceError, match=r"^model\.quantization = .* needs a CUDA device"):
        task.base_placement(config, torch.device("cpu"))
    assert task.base_placement(load_config(None, []), torch.device("cpu")) == "cpu"


def test_quantised_base_cannot_merge() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization = '4bit' cannot merge"):
        load_config(None, ["model.quantization=4bit", "federation.method=flora"])


@CUDA
def test_streamed_server_step_from_a_spool_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """Issue 21: the module-streamed step (spooled replies, keep="leading") on the GPU."""
    from dataclasses import replace

    from raflora.federation.spool import ReplySpool
    from raflora.math.round import aggregate_streamed

    state, updates, settings = _round_inputs()
    settings = replace(settings, keep="leading")
    with ReplySpool(tmp_path, 1) as spool:
        for update in updates:
            spool.add(update)
        cpu_state, cpu_diag = aggregate_streamed(state, spool, settings)
        with computing_on("cuda"):
            gpu_state, gpu_diag = aggregate_streamed(state, spool, settings)
    for name, update in cpu_state.adapter.items():
        other = gpu_state.adapter[name]
        assert isinstance(other.U, np.ndarray) and other.U.shape == update.U.shape
        np.testing.assert_allclose(other.S, update.S, rtol=1e-5)
        B, A = update.factors(8)
        Bg, Ag = other.factors(8)
        np.testing.assert_allclose(Bg @ Ag, B @ A, atol=1e-4)
    assert gpu_diag["global_rank"] == cpu_diag["global_rank"]
