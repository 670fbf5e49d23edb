"""Run one federated job in this process: the engine's server loop and ClientApp, no Ray.

`InProcessGrid` is a Flower `Grid` whose nodes are raflora's own ClientApp handlers (query,
train, evaluate) called one message at a time in this process. Every message and reply goes
through Flower's protobuf serialisation, as on the wire, so the server, the strategy and the
clients run exactly the code of `raflora run` and produce the same metrics for the same seed
(tests/test_experiments.py compares the two); only the clients run one after another
instead of in parallel Ray actors.

Why: a suite runs dozens of short jobs on a 2-core machine, and starting Ray plus one actor
process per CPU costs about a minute per job there. `raflora experiment --workers 2` runs two
jobs at once in separate processes instead.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from raflora.config import Config
from raflora.federation.progress import Reporter

CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's error code for an exception inside a ClientApp


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Flower builds a `Message` only where its `TaskIdentity` is set (inside a ServerApp or a
    ClientApp process); set it for the duration of an in-process run, then restore it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _wire(message: Any) -> Any:
    """The message as the receiver sees it: serialised to protobuf and parsed back."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


class InProcessGrid:
    """Grid of ``num_nodes`` clients (node config ``partition-id`` = 0 … K-1) served in-process.

    Parameters
    ----------
    num_nodes : int
        Number of clients (``clients.num_clients``).
    """

    pull_interval = 0.0  # replies exist as soon as `push_messages` returns

    def __init__(self, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        from raflora.federation.client_app import app

        self.app = app
        # Flower node ids are large random integers; keep them unrelated to partition ids.
        self.node_ids = [2**40 + 7919 * (num_nodes - i) for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": pid},
                state=RecordDict(),
                run_config={},
            )
            for pid, node in enumerate(self.node_ids)
        }
        self.replies: dict[str, Any] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _reply(self, message: Any) -> Any:
        from flwr.app import Error, Message

        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.app(_wire(message), context)
        except Exception as error:  # Flower turns a ClientApp exception into an error reply
            reply = Message(
                Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(error).__name__}: {error}"),
                reply_to=message,
            )
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return _wire(reply)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        """Deliver each message to its node now; the reply waits for `pull_messages`."""
        ids = []
        for message in messages:
            message_id = str(uuid.uuid4())
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's InMemoryGrid
            self.replies[message_id] = self._reply(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def run_inprocess(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`raflora.federation.simulation.run_federated` without Ray: same outputs, same summary."""
    from raflora.federation.finish import finish_run
    from raflora.federation.outputs import write_config
    from raflora.federation.preflight import check_new_run
    from raflora.federation.server import FederatedRun

    run_dir = Path(run_dir)
    if not resume:
        check_new_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    start = time.perf_counter()
    grid = InProcessGrid(config.clients.num_clients)
    with task_identity():
        FederatedRun(config, run_dir, resume=resume, reporter=reporter).main(grid)
    return finish_run(config, run_dir, wall_seconds=time.perf_counter() - start)
