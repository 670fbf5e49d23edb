"""Flower ClientApp: answers the server's query, train and evaluate messages.

Everything a client needs comes in the message (the run's config as JSON, its rank, the
factors); from its node it reads only ``partition-id`` and, optionally, ``rank`` (deployment:
``flower-supernode --node-config "partition-id=0 num-partitions=8 rank=16"``).

What it keeps across messages is the factors of every round merged into its base (merge mode,
FedEx-LoRA's residual; ``federation.merged_wire = "rounds"``), one ArrayRecord per round in
Flower's per-node ``context.state`` (kept by the simulation engine and by the SuperNode for the
run), so the server sends each round's factors once. The message lists every round the base
must contain; a client that lacks one refuses (`work.MissingMergedRounds`), and the server
resends them all next time.
"""

from __future__ import annotations

import hashlib
import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from raflora.federation import client as work
from raflora.federation import messages as msg
from raflora.federation.faults import claimed_size, hostile_reply, maybe_fail

app = ClientApp()


def _node(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config lacks partition-id (flower-supernode --node-config ...)")
    return int(node["partition-id"]), int(node.get("rank", 0))


def _context(message: Message, context: Context) -> work.ClientContext:
    config_json = str(message.content[msg.CONFIG][msg.RUN_CONFIG])
    partition_id, node_rank = _node(context)
    return work.client_context(config_json, partition_id, node_rank)


Factors = work.Factors
STATE_PREFIX = "raflora-merged"


def _state_key(config_json: str, server_round: int) -> str:
    """Where round t's merged factors live in ``context.state``: per run configuration, so a
    node that serves another run (deployment) never mixes their bases."""
    digest = hashlib.sha256(config_json.encode()).hexdigest()[:16]
    return f"{STATE_PREFIX}-{digest}@{server_round}"


def _merged_update(
    message: Message, context: Context, payload: msg.Payload
) -> tuple[dict[str, Factors], int | None]:
    """What the base must have merged, per module: the whole D sent (``merged_wire =
    "total"``), or the stacked factors of the rounds the config lists, read from this node's
    state or the message (new rounds are stored). Also the last listed round (None: total)."""
    config = message.content[msg.CONFIG]
    if msg.MERGED_ROUNDS not in config:
        return payload.merged, None
    required = sorted(int(t) for t in config[msg.MERGED_ROUNDS])
    config_json = str(config[msg.RUN_CONFIG])
    held = {}
    for t in required:
        record = context.state.array_records.get(_state_key(config_json, t))
        if record is not None:
            held[t] = msg.unpack(record)[1]
    merged = work.merged_factors(required, held, payload.rounds, refusal=msg.MISSING_ROUNDS)
    for t in required:  # only after the check: a refusing client keeps its state as it was
        if t not in held:
            context.state[_state_key(config_json, t)] = msg.pack(merged=payload.rounds[t])
    return merged, (required[-1] if required else 0)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Report partition id, rank and local data size so the server can allocate."""
    ctx = _context(message, context)
    info = ConfigRecord(
        {
            msg.PARTITION_ID: ctx.partition_id,
            msg.RANK: ctx.rank,
            msg.NUM_EXAMPLES: claimed_size(ctx.config, ctx.partition_id, ctx.data.num_examples),
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({msg.CONFIG: info}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Start from the allocated factors, train locally, send the folded factors back."""
    ctx = _context(message, context)
    config = message.content[msg.CONFIG]
    server_round, rank = int(config[msg.SERVER_ROUND]), int(config[msg.RANK])
    maybe_fail(ctx.config, server_round, ctx.partition_id)
    rows = work.shared_rows(ctx)  # frozen-A methods: B travels alone, both ways
    wire = ctx.config.federation.wire_dtype
    payload = msg.unpack_payload(message.content[msg.ARRAYS], frozen_a=rows, wire_dtype=wire)
    merged, through = _merged_update(message, context, payload)
    reply = work.train_round(ctx, server_round, rank, payload.lora, merged, payload.dense)
    factors, new_dense, metrics = hostile_reply(
        ctx.config, server_round, ctx.partition_id, reply, payload.dense
    )
    if through is not None:
        metrics[msg.MERGED_THROUGH] = through
    arrays = msg.pack(lora=factors, dense=new_dense, frozen_a=rows is not None, wire_dtype=wire)
    content = RecordDict({msg.ARRAYS: arrays, msg.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model at this client's rank on its local validation split."""
    ctx = _context(message, context)
    rank = int(message.content[msg.CONFIG][msg.RANK])
    payload = msg.unpack_payload(
        message.content[msg.ARRAYS],
        frozen_a=work.shared_rows(ctx),
        wire_dtype=ctx.config.federation.wire_dtype,
    )
    merged, _ = _merged_update(message, context, payload)
    metrics = work.evaluate_round(ctx, rank, payload.lora, merged, payload.dense)
    return Message(RecordDict({msg.METRICS: MetricRecord(metrics)}), reply_to=message)
