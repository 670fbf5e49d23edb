"""Export a run's global update as a standard PEFT adapter (``PeftModel.from_pretrained``).

The adapter of rank R holds the best rank-R approximation of the global update (Eckart–Young,
a slice of the stored SVD); the default R is the update's full rank, which reproduces the
server's evaluation exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint
from raflora.federation.evaluation import global_rank
from raflora.training import save_peft_adapter


def export_run(run_dir: Path, out_dir: Path, rank: int | None = None) -> tuple[Path, int]:
    """Write the latest checkpoint's global update as a rank-`rank` PEFT adapter."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export (has the run done a round?)")
    state, meta = load_checkpoint(checkpoint)
    full = global_rank(state)
    if full == 0:
        raise ValueError(f"{checkpoint}: the global update is empty; nothing to export")
    rank = full if rank is None else rank
    if rank < 1:
        raise ValueError(f"--rank must be >= 1 (got {rank})")
    if rank > full:
        raise ValueError(f"--rank {rank} exceeds the global update's rank {full}")
    model = meta["model"]
    factors = {name: update.factors(rank) for name, update in state.total_update().items()}
    path = save_peft_adapter(
        model["path"],
        model["task"],
        factors,
        {name: torch.from_numpy(v) for name, v in state.dense.items()},
        rank,
        model["lora_alpha"],
        model["rslora"],
        model["target_modules"],
        out_dir,
        num_labels=model["num_labels"],
    )
    return path, rank
