"""LLaMA-shaped LoRA factors through a real Flower deployment (`bench_llm_deploy.py`).

Modules: per decoder layer i, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` (hidden × hidden)
and ``model.layers.{i}.mlp.{gate,up}_proj`` (intermediate × hidden), ``…mlp.down_proj``
(hidden × intermediate), shapes (m, n) = (out, in). A client of rank r sends ``B (m, r)``,
``A (r, n)`` per module: ``r · Σ (m + n)`` floats, in ``wire-dtype`` (`raflora.federation.
messages.pack`, the project's wire format).

ClientApp: its rank comes from the node config (``rank=64``); it decodes what the server sent
(round ≥ 2: its rank-r share of the global update) and replies with seeded random factors of
standard deviation 0.01 (no model is trained: the payload is the point), plus its own time and
peak resident set (``VmHWM``). ServerApp: the real round step, `raflora.math.round.
aggregate_round` with ``method`` (raflora or flexlora), after the project's reply validation
(`check_update`); round t+1 sends each client the method's rank-r_k allocation. It writes a
JSON report (per round: seconds of each phase, bytes each way as Flower counts them, the
clients' reports; its own ``VmHWM``) to ``out-file``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from raflora.federation import messages as msg

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_UP = ("gate_proj", "up_proj")


def llama_modules(layers: int, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Every LoRA target of a LLaMA-shaped decoder: module name → (m, n) = (out, in)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        for name in ATTENTION:
            shapes[f"model.layers.{i}.self_attn.{name}"] = (hidden, hidden)
        for name in MLP_UP:
            shapes[f"model.layers.{i}.mlp.{name}"] = (intermediate, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (hidden, intermediate)
    return shapes


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def shape_config(config: dict) -> tuple[dict[str, tuple[int, int]], str]:
    """Module shapes and wire dtype from the run config."""
    modules = llama_modules(
        int(config["layers"]), int(config["hidden"]), int(config["intermediate"])
    )
    return modules, str(config["wire-dtype"])


def random_factors(
    modules: dict[str, tuple[int, int]], rank: int, seed: list[int]
) -> dict[str, msg.Factors]:
    """Seeded ``B (m, r)``, ``A (r, n)`` per module, entries N(0, 0.01²), float32."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.standard_normal((m, rank), dtype=np.float32) * np.float32(0.01),
            rng.standard_normal((rank, n), dtype=np.float32) * np.float32(0.01),
        )
        for name, (m, n) in modules.items()
    }


# ---------------------------------------------------------------------------------- client
clientapp = ClientApp()


@clientapp.train()
def train(message: Message, context: Context) -> Message:
    """Decode the server's factors (checked against this node's rank), reply with new ones."""
    start = time.perf_counter()
    modules, wire = shape_config(dict(context.run_config))
    rank, pid = int(context.node_config["rank"]), int(context.node_config["partition-id"])
    server_round = int(message.content[msg.CONFIG][msg.SERVER_ROUND])
    received, _, _ = msg.unpack(message.content[msg.ARRAYS], wire_dtype=wire)
    if received and {B.shape[1] for B, _ in received.values()} != {rank}:
        raise ValueError(f"partition {pid}: sent factors not of rank {rank}")
    del received
    decoded = time.perf_counter()
    factors = random_factors(modules, rank, [pid, server_round])
    generated = time.perf_counter()
    arrays = msg.pack(lora=factors, wire_dtype=wire)
    del factors
    metrics = {
        msg.NUM_EXAMPLES: 100 * (pid + 1),
        msg.PARTITION_ID: pid,
        msg.RANK: rank,
        "decode-seconds": decoded - start,
        "generate-seconds": generated - decoded,
        "pack-seconds": time.perf_counter() - generated,
        "peak-rss-bytes": peak_rss_bytes(),
    }
    return Message(
        RecordDict({msg.ARRAYS: arrays, msg.METRICS: MetricRecord(metrics)}), reply_to=message
    )


# ---------------------------------------------------------------------------------- server
serverapp = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float = 120.0) -> list[int]:
    """The first ``count`` connected node ids (sorted); waits while fewer are connected."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes connected")
        time.sleep(0.5)
    return nodes[:count]


class Server:
    """The round loop: allocate, send, receive, validate, `aggregate_round`."""

    def __init__(self, config: dict) -> None:
        from raflora.federation.validation import Expectation
        from raflora.math.methods import get_method
        from raflora.math.round import GlobalState, RoundSettings

        self.config = config
        self.modules, self.wire = shape_config(config)
        self.method = get_method(str(config["method"]))
        self.expectation = Expectation(modules=self.modules, dense={})
        self.state = GlobalState(round=0, adapter={}, merged={}, dense={}, ranks={})
        self.settings = RoundSettings.of(self.method, bounds=(16, 64))
        self.ranks: dict[int, int] = {}  # node id → rank (from its round-1 reply)

    def messages(self, server_round: int, nodes: list[int]) -> list[Message]:
        """Each node's train message: its rank-r_k allocation (nothing in round 1)."""
        out = []
        for node in nodes:
            rank = self.ranks.get(node)
            lora = (
                {}
                if rank is None
                else self.state.client_payload(rank, "us", self.method.allocation)
            )
            content = RecordDict(
                {
                    msg.ARRAYS: msg.pack(lora=lora, wire_dtype=self.wire),
                    msg.CONFIG: ConfigRecord({msg.SERVER_ROUND: server_round}),
                }
            )
            out.append(Message(content, node, MessageType.TRAIN, group_id=str(server_round)))
        return out

    def accept(self, reply: Message) -> tuple[object, int, dict]:
        """A reply's validated update, its array bytes and its metrics."""
        from raflora.federation.validation import check_update

        if reply.has_error():
            raise RuntimeError(f"client error {reply.error.code}: {reply.error.reason[-400:]}")
        record: ArrayRecord = reply.content[msg.ARRAYS]
        metrics = dict(reply.content[msg.METRICS])
        lora, _, _ = msg.unpack(record, wire_dtype=self.wire)
        rank = int(metrics[msg.RANK])
        update, _ = check_update(
            int(metrics[msg.PARTITION_ID]),
            lora,
            {},
            metrics[msg.NUM_EXAMPLES],
            rank,
            self.expectation,
        )
        self.ranks[reply.metadata.src_node_id] = rank
        return update, record.count_bytes(), metrics

    def round(self, grid: Grid, server_round: int, nodes: list[int]) -> dict:
        """One round, timed phase by phase."""
        from raflora.math.round import aggregate_round

        t0 = time.perf_counter()
        out = self.messages(server_round, nodes)
        sent = sum(m.content[msg.ARRAYS].count_bytes() for m in out)
        t1 = time.perf_counter()
        replies = list(grid.send_and_receive(out, timeout=float(self.config["timeout"])))
        del out
        t2 = time.perf_counter()
        accepted = [self.accept(reply) for reply in replies]
        del replies
        if len(accepted) != len(nodes):
            raise RuntimeError(f"round {server_round}: {len(accepted)} of {len(nodes)} replies")
        t3 = time.perf_counter()
        self.state, _ = aggregate_round(self.state, [u for u, _, _ in accepted], self.settings)
        t4 = time.perf_counter()
        return {
            "round": server_round,
            "seconds": t4 - t0,
            "pack_seconds": t1 - t0,
            "exchange_seconds": t2 - t1,
            "unpack_validate_seconds": t3 - t2,
            "aggregate_seconds": t4 - t3,
            "bytes_sent": sent,
            "bytes_received": sum(b for _, b, _ in accepted),
            "clients": sorted(
                ({k: v for k, v in m.items()} for _, _, m in accepted),
                key=lambda m: m[msg.PARTITION_ID],
            ),
        }


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds and write the JSON report to ``out-file``."""
    config = dict(context.run_config)
    started = time.perf_counter()
    nodes = wait_for_nodes(grid, int(config["nodes"]))
    server = Server(config)
    rounds = [server.round(grid, t, nodes) for t in range(1, int(config["rounds"]) + 1)]
    report = {
        "config": config,
        "modules": len(server.modules),
        "rounds": rounds,
        "seconds": time.perf_counter() - started,
        "serverapp_peak_rss_bytes": peak_rss_bytes(),
        "serverapp_pid": os.getpid(),
    }
    Path(str(config["out-file"])).write_text(json.dumps(report, indent=1))
