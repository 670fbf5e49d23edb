"""Fault injection for robustness tests (config section ``[faults]``, off by default).

Each round a seeded ``round(fraction · K)`` of the K clients misbehave: raise an exception,
stall past the round timeout, or vanish (the client process exits without replying).
"""

from __future__ import annotations

import os
import time

import numpy as np

from raflora.config import Config
from raflora.federation.task import derived_seed


class InjectedFault(RuntimeError):
    """The failure a faulty client raises on purpose."""


def failing_clients(config: Config, server_round: int) -> set[int]:
    """The partition ids that fail in this round."""
    num = config.clients.num_clients
    count = round(config.faults.fraction * num)
    if count == 0:
        return set()
    rng = np.random.default_rng(derived_seed(config.run.seed, "faults", server_round))
    return {int(pid) for pid in rng.choice(num, size=count, replace=False)}


def maybe_fail(config: Config, server_round: int, partition_id: int) -> None:
    """Misbehave as configured if this client is among the round's failing ones."""
    if partition_id not in failing_clients(config, server_round):
        return
    mode = config.faults.mode
    if mode == "stall":
        time.sleep(config.faults.stall_s)
        return
    if mode == "vanish":
        os._exit(17)
    raise InjectedFault(f"injected failure: client {partition_id}, round {server_round}")
