"""The one per-round record of a run: what metrics.json and metrics.csv hold, what the
progress display shows and what the reports read.

:class:`RoundRecord` is built once per round from the strategy's `RoundLog`, the round step's
diagnostics and the server's evaluation; every consumer derives its view from it: JSON
(:meth:`RoundRecord.to_dict`), the CSV's scalar columns (:data:`CSV_COLUMNS`, the scalar fields
in declaration order, then one energy column per rank partition) and the progress line
(:func:`describe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raflora.federation.strategy import RoundLog


@dataclass(frozen=True)
class RoundRecord:
    """One round (round 0: the untrained start, evaluated only)."""

    round: int
    sampled: int  # clients asked to train
    ok: int  # replies aggregated
    failed: int  # errors and timeouts
    rejected: int  # replies refused by validation
    clipped_modules: int  # module updates scaled down to the norm bound
    skipped: bool  # too few valid replies: the global update was kept
    train_loss: float | None  # example-weighted mean over the aggregated clients
    server_loss: float | None  # on the held-out test set (when evaluated this round)
    server_accuracy: float | None
    client_val_accuracy: float | None  # example-weighted mean of the clients' local validation
    client_val_loss: float | None
    # collapse diagnostics of the global update (mean over modules; _worst: the worst module)
    top_rmin_energy: float | None
    top_rmin_energy_worst: float | None
    effective_rank: float | None
    effective_rank_worst: float | None
    stable_rank: float | None
    norm: float | None  # ‖ΔW‖_F over all modules
    carried_energy_share: float | None  # share of the update carried over unchanged
    global_rank: int | None  # rank of the kept update (the largest module's)
    bytes_sent: int  # server → clients, this round's train messages
    bytes_received: int  # clients → server, accepted replies
    seconds: float  # wall time of the round
    partition_energy: list[float] | None = None  # energy share per rank partition (+ the rest)
    predicted_retention: list[float] | None = None  # c_i = Σ_{r_k ≥ i} p_k of this round
    clients: list[int] = field(default_factory=list)  # partition ids aggregated
    failures: dict[str, str] = field(default_factory=dict)  # partition id → reason
    rejections: dict[str, str] = field(default_factory=dict)
    server_metrics: dict[str, Any] = field(default_factory=dict)
    client_metrics: dict[str, Any] = field(default_factory=dict)
    client_time: dict[str, Any] = field(default_factory=dict)
    per_module: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, current: RoundLog, server: dict[str, float] | None, seconds: float) -> RoundRecord:
        """The record of a round from the strategy's log and the server's evaluation."""
        diag, client, server = current.diagnostics, current.client_eval, server or {}
        return cls(
            round=current.round,
            sampled=len(current.sampled),
            ok=len(current.ok),
            failed=len(current.failed),
            rejected=len(current.rejected),
            clipped_modules=current.clipped_modules,
            skipped=current.skipped,
            train_loss=current.train_loss if current.ok else None,
            server_loss=server.get("loss"),
            server_accuracy=server.get("accuracy"),
            client_val_accuracy=client.get("val-accuracy"),
            client_val_loss=client.get("val-loss"),
            **{name: diag.get(name) for name in DIAGNOSTICS},
            bytes_sent=current.bytes_sent,
            bytes_received=current.bytes_received,
            seconds=seconds,
            clients=current.ok,
            failures={str(k): v for k, v in current.failed.items()},
            rejections={str(k): v for k, v in current.rejected.items()},
            server_metrics=server,
            client_metrics=client,
            client_time={str(k): v for k, v in sorted(current.client_time.items())},
            per_module=diag.get("per_module", {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (one element of metrics.json)."""
        return dataclasses.asdict(self)


# the round step's diagnostics the record carries (`raflora.math.round.aggregate_round`)
DIAGNOSTICS = (
    "top_rmin_energy",
    "top_rmin_energy_worst",
    "effective_rank",
    "effective_rank_worst",
    "stable_rank",
    "norm",
    "carried_energy_share",
    "global_rank",
    "partition_energy",
    "predicted_retention",
)
_SCALAR_TYPES = {"int", "float", "bool", "int | None", "float | None"}
# metrics.csv's columns before the per-partition energies: the record's scalar fields
CSV_COLUMNS = tuple(f.name for f in dataclasses.fields(RoundRecord) if f.type in _SCALAR_TYPES)


def _fmt(value: Any, pattern: str) -> str:
    return "–" if value is None or value != value else format(value, pattern)


def describe(record: dict[str, Any]) -> str:
    """The progress line of a round: train loss, test accuracy, top-r_min energy."""
    return (
        f"loss {_fmt(record.get('train_loss'), '.3f')}  "
        f"acc {_fmt(record.get('server_accuracy'), '.3f')}  "
        f"top-r_min energy {_fmt(record.get('top_rmin_energy'), '.2f')}"
    )
