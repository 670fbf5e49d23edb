"""Fault injection for robustness tests (config section ``[faults]``, off by default).

Each round a seeded ``round(fraction · K)`` of the K clients (or the fixed partition ids
``faults.clients``) misbehave: raise an exception, stall past the round timeout, or vanish (the
client process exits without replying). The hostile modes exist to test the server's defences
(validation.py) and are for tests only: the client trains honestly, then

- ``scale``: replies ``(s B, A)`` with ``s = strength`` (its update ``B A`` ×s, a "boosted"
  update) and moves its dense trainables s times as far from what it was sent;
- ``signflip``: the same with ``s = −strength`` (the update's sign flipped and boosted);
- ``inflate``: claims ``strength`` times its ``num-examples`` (its aggregation weight) in its
  train replies, and, if it is one of ``faults.clients``, in the query round too (a consistent
  liar, which only ``federation.max_num_examples`` can stop).
"""

from __future__ import annotations

import os
import time

import numpy as np

from raflora.config import Config
from raflora.federation.task import derived_seed

HOSTILE = ("scale", "signflip", "inflate")
Factors = tuple[np.ndarray, np.ndarray]


class InjectedFault(RuntimeError):
    """The failure a faulty client raises on purpose."""


def failing_clients(config: Config, server_round: int) -> set[int]:
    """The partition ids that fail in this round."""
    if config.faults.clients is not None:
        return set(config.faults.clients)
    num = config.clients.num_clients
    count = round(config.faults.fraction * num)
    if count == 0:
        return set()
    rng = np.random.default_rng(derived_seed(config.run.seed, "faults", server_round))
    return {int(pid) for pid in rng.choice(num, size=count, replace=False)}


def maybe_fail(config: Config, server_round: int, partition_id: int) -> None:
    """Misbehave as configured if this client is among the round's failing ones (the hostile
    modes act on the reply instead: `hostile_reply`)."""
    mode = config.faults.mode
    if mode in HOSTILE or partition_id not in failing_clients(config, server_round):
        return
    if mode == "stall":
        time.sleep(config.faults.stall_s)
        return
    if mode == "vanish":
        os._exit(17)
    raise InjectedFault(f"injected failure: client {partition_id}, round {server_round}")


def claimed_size(config: Config, partition_id: int, num_examples: int) -> int:
    """The data size a client reports in the query round: inflated for ``inflate`` clients
    named in ``faults.clients``, else the truth."""
    faults = config.faults
    if faults.mode == "inflate" and partition_id in (faults.clients or []):
        return round(num_examples * faults.strength)
    return num_examples


def hostile_reply(
    config: Config,
    server_round: int,
    partition_id: int,
    reply: tuple[dict[str, Factors], dict[str, np.ndarray], dict[str, float]],
    sent_dense: dict[str, np.ndarray],
) -> tuple[dict[str, Factors], dict[str, np.ndarray], dict[str, float]]:
    """The honest ``(factors, dense, metrics)`` reply turned hostile (module doc), or as is."""
    factors, dense, metrics = reply
    mode = config.faults.mode
    if mode not in HOSTILE or partition_id not in failing_clients(config, server_round):
        return reply
    s = config.faults.strength
    if mode == "inflate":
        return factors, dense, {**metrics, "num-examples": round(metrics["num-examples"] * s)}
    s = s if mode == "scale" else -s
    factors = {name: (np.float32(s) * B, A) for name, (B, A) in factors.items()}
    dense = {
        name: (sent_dense[name] + s * (x - sent_dense[name])).astype(np.float32)
        if name in sent_dense
        else x
        for name, x in dense.items()
    }
    return factors, dense, metrics
