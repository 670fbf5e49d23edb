"""Flower messages for unit tests of the strategy, built without a running app.

`Message(...)` needs Flower's task identity, which only a running app sets; replies are built
from an explicit public `Metadata` instead (see /work/notes/flower142.md §1).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from raflora.federation import messages as msg


def metadata(src_node_id: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{src_node_id}",
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{src_node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )


def train_reply(
    src_node_id: int,
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    num_examples: float | int,
    dense: dict[str, np.ndarray] | None = None,
    train_loss: float = 1.0,
    extra: dict[str, int | float] | None = None,
) -> Message:
    metrics = MetricRecord(
        {msg.NUM_EXAMPLES: num_examples, msg.TRAIN_LOSS: train_loss, **(extra or {})}
    )
    content = RecordDict({msg.ARRAYS: msg.pack(lora=lora, dense=dense), msg.METRICS: metrics})
    return Message(content=content, metadata=metadata(src_node_id))


def evaluate_reply(src_node_id: int, metrics: dict[str, float]) -> Message:
    content = RecordDict({msg.METRICS: MetricRecord(metrics)})
    return Message(content=content, metadata=metadata(src_node_id, MessageType.EVALUATE))


def error_reply(src_node_id: int, reason: str = "boom", code: int = 2) -> Message:
    return Message(error=Error(code=code, reason=reason), metadata=metadata(src_node_id))
