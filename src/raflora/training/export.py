"""Write a global LoRA update as a standard PEFT adapter folder.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
``PeftModel.from_pretrained(base, out_dir)``; task heads (``modules_to_save``) are included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor

from raflora.training.factors import Factors, set_dense_trainables, set_factors
from raflora.training.models import (
    build_lora_model,
    load_base_model,
    resolve_model,
)


def save_peft_adapter(
    base_name_or_path: str,
    task: str,
    factors: Mapping[str, Factors],
    dense: Mapping[str, Tensor],
    rank: int,
    alpha: float,
    rslora: bool,
    target_modules: list[str],
    out_dir: str | Path,
    num_labels: int | None = None,
) -> Path:
    """Save ``ΔW = B_fold @ A`` per module (plus dense heads) as a rank-``rank`` PEFT adapter.

    Factors of rank above ``rank`` are rejected (truncate with the math layer's ``allocate``
    first); lower-rank factors are padded with zero-product directions (fresh A, zero B), so the
    adapter reproduces exactly the given update. An existing ``out_dir`` is replaced only once
    the new folder is complete.
    """
    base, _ = load_base_model(base_name_or_path, task, num_labels=num_labels, seed=0)
    model = build_lora_model(base, rank, alpha, target_modules, rslora=rslora)
    set_factors(model, factors, seed=0)
    set_dense_trainables(model, dense)
    model.peft_config[model.active_adapter].base_model_name_or_path = resolve_model(
        base_name_or_path
    )
    return _replace_folder(Path(out_dir), model.save_pretrained)


def _replace_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then swap it in: ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        write(new)
        old = new.with_name(new.name.replace(".new-", ".old-"))
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return out
