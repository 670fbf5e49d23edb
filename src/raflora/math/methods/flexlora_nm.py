"""FlexLoRA rescaled to raFLoRA's ‖ΔW‖_F on the same updates (norm-matching control).

    ΔW = (‖ΔW_raflora‖_F / ‖ΔW_flexlora‖_F) · Σ_k p_k B_k A_k

Same directions and energy shares as flexlora, raflora's step size: it separates "a bigger
step" from "more directions" when explaining a gap between the two. Its options are raflora's
(the run's partitions and weighting define the target norm). A control of this project, not a
published method.
"""

from __future__ import annotations

from torch import Tensor

from raflora.math._arrays import Clients
from raflora.math.lowrank import _frobenius
from raflora.math.methods import raflora as ra
from raflora.math.methods._common import client_columns, stacked
from raflora.math.methods.flexlora import rescaled
from raflora.math.methods.registry import Method, register


def flexlora_nm(c: Clients, opts: ra.RafloraOptions) -> tuple[Tensor, Tensor]:
    """flexlora's stack scaled to ‖raflora(c, opts)‖_F (unchanged if flexlora's is zero)."""
    target = float(_frobenius(*ra.raflora(c, opts)))
    B, A = stacked(c, client_columns(c))
    return rescaled(B, A, target) if float(_frobenius(B, A)) > 0 else (B, A)


register(
    Method(
        name="flexlora_nm",
        summary="FlexLoRA rescaled to raFLoRA's ‖ΔW‖_F on the same updates (control)",
        paper="control of this project (FlexLoRA with raFLoRA's step norm)",
        aggregate=flexlora_nm,
        options=ra.RafloraOptions,
        check=ra.check,
    )
)
