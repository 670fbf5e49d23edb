"""An in-process Flower Grid for the engine's tests: the ClientApp runs in this process.

`FakeGrid.push_messages` hands each message straight to `raflora.federation.client_app.app`
(the real handlers: query, train, evaluate) and stores the reply for `pull_messages`, so the
server's loop, the strategy and the client code run exactly as in a simulation, minus Ray and
serialisation. A ClientApp exception becomes an error reply (code 2), as Flower does.
Messages can only be built where Flower's `TaskIdentity` is set; `task_identity()` sets it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = 2


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Let `Message(...)` be built outside a running ServerApp (Flower's private API)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """A Grid whose nodes are `node_configs` (partition-id, optional rank), served in-process.

    Parameters
    ----------
    node_configs : list of dict
        One Flower node config per client, e.g. ``{"partition-id": 0}``.
    node_ids : list of int, optional
        Node ids (default: large distinct ints, like Flower's uint64 ids, not in pid order).
    drop : callable, optional
        ``drop(message, node_config) -> bool``: when true the message gets no reply (a client
        that vanished or stalled past the round timeout).
    """

    def __init__(
        self,
        node_configs: list[dict],
        node_ids: list[int] | None = None,
        drop: Callable[[Message, dict], bool] | None = None,
    ) -> None:
        from raflora.federation.client_app import app

        self.app = app
        self.node_ids = node_ids or [
            2**62 + 7919 * (len(node_configs) - i) for i in range(len(node_configs))
        ]
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={}
            )
            for node, cfg in zip(self.node_ids, node_configs, strict=True)
        }
        self.drop = drop or (lambda message, node_config: False)
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            ids.append(message_id)
            context = self.contexts[message.metadata.dst_node_id]
            if self.drop(message, context.node_config):
                continue
            try:
                reply = self.app(message, context)
            except Exception as error:  # Flower turns any exception into a reply
                reply = Message(
                    Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(error).__name__}: {error}"),
                    reply_to=message,
                )
            reply.metadata.__dict__["_message_id"] = f"r{message_id}"
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
