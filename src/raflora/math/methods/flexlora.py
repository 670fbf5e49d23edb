"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024; code github.com/alibaba/FederatedScope, branch
FlexLoRA): aggregate the products, allocate by truncated SVD.

    ΔW = Σ_k p_k B_k A_k = [p_1 B_1 … p_K B_K] [A_1; …; A_K]     (kept stacked, R = Σ r_k)

A client of rank r starts from the best rank-r approximation of ΔW, B = U_r S_r, A = V_rᵀ.
Option ``norm_target`` rescales B so that ‖B A‖_F equals it (a zero update can only be 0).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.lowrank import _frobenius
from raflora.math.methods._common import client_columns, stacked
from raflora.math.methods.registry import Method, register


@dataclass(frozen=True)
class FlexloraOptions:
    norm_target: float | None = None  # if set, rescale B so that ‖B A‖_F equals it

    def __post_init__(self) -> None:
        t = self.norm_target
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0
        ):
            raise ValueError(f"norm_target must be a finite number ≥ 0 or None, got {t!r}")


def rescaled(B: Tensor, A: Tensor, target: float) -> tuple[Tensor, Tensor]:
    """(B · target / ‖B A‖_F, A); a zero product stays zero (refused if target > 0)."""
    norm = float(_frobenius(B, A))
    if norm == 0.0 and target > 0:
        raise ValueError("norm_target: the aggregated update is zero and cannot be rescaled")
    return B * (float(target) / norm if norm > 0 else 0.0), A


def flexlora(c: Clients, opts: FlexloraOptions) -> tuple[Tensor, Tensor]:
    """Σ p_k B_k A_k, stacked (rank Σ r_k); rescaled to ``norm_target`` if set."""
    B, A = stacked(c, client_columns(c))
    return (B, A) if opts.norm_target is None else rescaled(B, A, opts.norm_target)


def _columns(c: Clients, opts: FlexloraOptions) -> list[list[float]] | None:
    return client_columns(c) if opts.norm_target is None else None


register(
    Method(
        name="flexlora",
        summary="FlexLoRA (Bai et al. 2024): Σ p_k B_k A_k, SVD allocation to each rank",
        paper="Bai, Chen, Qian, Yao, Li, Federated Fine-tuning of Large Language Models under "
        "Heterogeneous Tasks and Client Resources, NeurIPS 2024",
        code="https://github.com/alibaba/FederatedScope/tree/FlexLoRA",
        aggregate=flexlora,
        options=FlexloraOptions,
        columns=_columns,
        retention="c_i",
    )
)
