"""Flower ClientApp: answers the server's query, train and evaluate messages.

Everything a client needs comes in the message (the run's config as JSON, its rank, the
factors); from its node it reads only ``partition-id`` and, optionally, ``rank`` (deployment:
``flower-supernode --node-config "partition-id=0 num-partitions=8 rank=16"``).
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from raflora.federation import client as work
from raflora.federation import messages as msg
from raflora.federation.faults import maybe_fail

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


@app.query()
def query(message: Message, context: Context) -> Message:
    """Report partition id, rank and local data size so the server can allocate."""
    ctx = _context(message, context)
    info = ConfigRecord(
        {
            msg.PARTITION_ID: ctx.partition_id,
            msg.RANK: ctx.rank,
            msg.NUM_EXAMPLES: ctx.data.num_examples,
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
    lora, merged, dense = msg.unpack(message.content[msg.ARRAYS], frozen_a=rows)
    factors, new_dense, metrics = work.train_round(ctx, server_round, rank, lora, merged, dense)
    arrays = msg.pack(lora=factors, dense=new_dense, frozen_a=rows is not None)
    content = RecordDict({msg.ARRAYS: arrays, msg.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model at this client's rank on its local validation split."""
    ctx = _context(message, context)
    rank = int(message.content[msg.CONFIG][msg.RANK])
    lora, merged, dense = msg.unpack(message.content[msg.ARRAYS], frozen_a=work.shared_rows(ctx))
    metrics = work.evaluate_round(ctx, rank, lora, merged, dense)
    return Message(RecordDict({msg.METRICS: MetricRecord(metrics)}), reply_to=message)
