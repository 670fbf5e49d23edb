"""Export a run's global update as a standard PEFT adapter (``PeftModel.from_pretrained``).

By default the adapter holds the whole global update, the factors the server evaluates (its
rank is their width: the stacked Σ r_k in adapter mode), so it reproduces the server's
evaluation exactly; with ``rank`` r it holds the best rank-r approximation (Eckart–Young, a
slice of the stored SVD, or a new one above the federation's largest rank).
"""

from __future__ import annotations

from pathlib import Path

import torch

from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint
from raflora.federation.evaluation import global_factors, global_rank
from raflora.training import save_peft_adapter


def export_run(run_dir: Path, out_dir: Path, rank: int | None = None) -> tuple[Path, int]:
    """Write the latest checkpoint's global update as a PEFT adapter: whole, or truncated to
    rank `rank` (1 ≤ rank ≤ the update's number of significant directions). Returns the
    adapter's folder and rank."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        runs = sorted(p.name for p in run_dir.iterdir() if latest_checkpoint(p) is not None)
        hint = f"it holds runs {', '.join(runs)}: export one" if runs else "has it done a round?"
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export ({hint})")
    state, meta = load_checkpoint(checkpoint)
    full = global_rank(state)
    if full == 0:
        raise ValueError(f"{checkpoint}: the global update is empty; nothing to export")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1 (got {rank})")
    if rank is not None and rank > full:
        raise ValueError(f"--rank {rank} exceeds the global update's rank {full}")
    model = meta["model"]
    factors, rank = global_factors(state, rank)
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
