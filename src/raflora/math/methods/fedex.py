"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", ACL 2025, arXiv:2410.09432; code
github.com/RaghavSinghal10/fedex-lora, ``aggregate_models_ours`` in ``fed_agg.py``): average
the factors as FedIT does, and fold what that average misses into the base weights.

Round t, sampled clients k with p_k (Σ p_k = 1):

    B̄ = Σ_k p_k B̃_k (m, r_max),   Ā = Σ_k p_k Ã_k (r_max, n)   (zero-padded to r_max)
    residual_t = Σ_k p_k B_k A_k − B̄ Ā                         (folded: W ← W + residual_t)

The server keeps (B̄, Ā) as the global LoRA and a client of rank r restarts from its leading
slices ``B̄[:, :r]``, ``Ā[:r, :]`` (its code has one rank for all clients; heterogeneous ranks
by zero-padding, as the padded average allows). The global model
``W_0 + Σ_t residual_t + B̄_t Ā_t`` then equals ``W_0 + Σ_t Σ_k p_k B_k A_k`` exactly, the
average of the clients' own models; a client of rank r < r_max trains from ``W_0 + Σ residual
+ B̄[:, :r] Ā[:r]``, without the columns beyond its rank.

On the wire the residual is sent factored by default (option ``residual_wire = "factored"``),
``[p_1 B_1 … p_K B_K, −B̄] [A_1; …; A_K; Ā]``, of rank ≤ Σ_k r_k + r_max: per sampled client
and module its slice r_k (m + n) and the residual of every round it has not merged yet,
(Σ_k r_k + r_max)(m + n) floats each (``federation.merged_wire``). With ``residual_wire =
"dense"`` each residual travels as the one m×n array the paper describes (``ΔW_res``; its code
adds it to the base layer's weight), m n floats per module and round, which the client adds to
its base weights. Both give the same global model (to float rounding); the factored form is
fewer floats whenever Σ_k r_k + r_max < mn / (m + n). The README's bytes column counts the
default, factored form. Client weights are p_k ∝ n_k like every method here (the paper's code
averages uniformly).

With heterogeneous ranks the exactness is of the aggregate, not of the clients' restart: a
client of rank r drops the columns (r, r_max] of the adapter when it restarts from its slice,
so column i of B̄ Ā survives a round only in the share Σ_{r_k ≥ i} p_k (as with zero-padding,
`raflora synthetic` shows the same rank collapse as FlexLoRA's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.methods._common import client_columns, padded_average, per_client, stacked
from raflora.math.methods.registry import Method, register


@dataclass(frozen=True)
class FedExOptions:
    # how each round's residual reaches the clients: its factors, or the dense m×n matrix
    residual_wire: Literal["factored", "dense"] = "factored"

    def __post_init__(self) -> None:
        if self.residual_wire not in ("factored", "dense"):
            raise ValueError(
                f"residual_wire = {self.residual_wire!r} must be 'factored' (the residual's "
                "factors, Σ_k r_k + r_max columns) or 'dense' (the m×n matrix)"
            )


def dense_residual(opts: FedExOptions) -> bool:
    """Whether the residual travels as the dense m×n matrix."""
    return opts.residual_wire == "dense"


def fedex(c: Clients, _: FedExOptions) -> tuple[Tensor, Tensor]:
    """The global LoRA: (Σ p_k B̃_k (m, r_max), Σ p_k Ã_k (r_max, n)), zero-padded."""
    return padded_average(c, per_client(c, c.p))


def fedex_residual(
    c: Clients, _: FedExOptions, average: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``Σ p_k B_k A_k − B̄ Ā`` as factors ``[p_1 B_1 … p_K B_K, −B̄]`` (m, Σ r_k + r_max),
    ``[A_1; …; A_K; Ā]`` (Σ r_k + r_max, n); ``average`` is (B̄, Ā)."""
    B, A = stacked(c, client_columns(c))  # Σ p_k B_k A_k, (m, Σ r), (Σ r, n)
    B_bar, A_bar = average
    return torch.cat([B, -B_bar], dim=1), torch.cat([A, A_bar], dim=0)


register(
    Method(
        name="fedex",
        summary="FedEx-LoRA (Singhal et al. 2025): average B and A, fold the residual "
        "Σ p_k B_k A_k − B̄ Ā into the base; clients get the leading slices",
        paper="Singhal, Ponkshe, Vepakomma, FedEx-LoRA: Exact Aggregation for Federated and "
        "Efficient Fine-Tuning of Foundation Models, ACL 2025",
        code="https://github.com/RaghavSinghal10/fedex-lora",
        aggregate=fedex,
        allocation="slice",
        residual=fedex_residual,
        options=FedExOptions,
        dense_merged=dense_residual,
        wire="down Σ_k r_k (m + n) + K (Σ_k r_k + r_max)(m + n) (slices + the round's residual, "
        "factored, to each client; residual_wire = dense: K m n for the residual), "
        "up Σ_k r_k (m + n)",
    )
)
