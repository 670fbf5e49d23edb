"""Where tensors live and in what precision: device specs, their resolution, autocast.

A device spec is ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``"auto"`` is the
GPU this process may use: inside a Ray actor (Flower's simulation engine) the GPU Ray assigned
to it (``ray.get_gpu_ids()``; Ray sets ``CUDA_VISIBLE_DEVICES`` so it is ``cuda:0`` here) or the
CPU when Ray assigned none; elsewhere the first visible CUDA device, else Apple's MPS, else the
CPU. Asking for a device that is not there raises :class:`DeviceError` naming the config field.

Precision (``model.dtype``): the frozen base is stored in float32, bfloat16 or float16; the
trainable LoRA factors (and task heads) stay float32, and forward/backward passes run under
``torch.autocast`` in the base's dtype; float16 also scales the loss (``torch.amp.GradScaler``)
and needs a CUDA device.
"""

from __future__ import annotations

import re
import sys
from contextlib import nullcontext
from typing import Any

import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A requested device or precision this machine cannot provide (one line, names the field)."""


def check_device_spec(spec: str) -> str:
    """The spec itself if well formed (no hardware check), else ``ValueError``."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ValueError(f"{spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return spec


def _ray_gpu_ids() -> list[Any] | None:
    """GPU ids Ray assigned to this process when it is a Ray actor, else None (Ray is only
    consulted when the process already imported it: a Ray actor always has)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        if ray.get_runtime_context().get_actor_id() is None:  # the driver, not an actor
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # an older/odd Ray: fall back to what torch sees
        return None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return "torch.cuda.is_available() is False (no driver or no visible GPU)"


def resolve_device(spec: str, field: str = "train.device") -> torch.device:
    """The ``torch.device`` a spec names on this machine (see the module docstring).

    Raises :class:`DeviceError` ``"<field> = 'cuda:3': ..."`` when the device is not there.
    """
    try:
        check_device_spec(spec)
    except ValueError as error:
        raise DeviceError(f"{field}: {error}") from None
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        ray_ids = _ray_gpu_ids()
        if ray_ids is not None:
            return torch.device("cuda:0" if ray_ids and torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.device("cuda:0")
        return torch.device("mps" if _mps_available() else "cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError(
                f"{field} = 'mps': Apple's MPS backend is not available here; use auto or cpu"
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{field} = {spec!r}: no CUDA device ({_no_cuda_reason()}); use auto or cpu"
        )
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{field} = {spec!r}: only {count} CUDA device(s) visible (cuda:0 … cuda:{count - 1}); "
            "CUDA_VISIBLE_DEVICES renumbers them from 0"
        )
    return torch.device(f"cuda:{index}")


def resolve_dtype(name: str, device: torch.device, field: str = "model.dtype") -> torch.dtype:
    """The torch dtype of ``model.dtype`` after checking ``device`` can train in it: float16
    needs CUDA (CPU autocast in float16 is slow or unsupported, and loss scaling is CUDA's)."""
    if name not in DTYPES:
        raise DeviceError(f"{field}: {name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise DeviceError(
            f"{field} = 'float16' needs a CUDA device (training runs on {device.type}); "
            "use bfloat16 on a CPU"
        )
    return dtype


def check_quantization(
    quantization: str, device: torch.device, field: str = "model.quantization"
) -> None:
    """A 4/8-bit base needs the bitsandbytes package and a CUDA device (its kernels' backend);
    raises :class:`DeviceError` naming ``field`` and the fix otherwise."""
    import importlib.util

    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeviceError(
            f"{field} = {quantization!r} needs the bitsandbytes package, which is not installed; "
            "pip install 'raflora[quant]' (on a CUDA machine), or set it to 'none'"
        )
    if device.type != "cuda":
        raise DeviceError(
            f"{field} = {quantization!r} needs a CUDA device for bitsandbytes' kernels "
            f"(this runs on {device.type}); set it to 'none' or use a GPU"
        )


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """``torch.autocast`` in ``dtype`` for a half-precision base, else a no-op context."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """Loss scaling for float16 on CUDA (bfloat16 has float32's range and needs none)."""
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def keep_trainables_float32(model: torch.nn.Module) -> None:
    """Cast every trainable parameter (LoRA factors, task heads) to float32 in place: the
    optimiser then updates full-precision weights whatever the base's dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
