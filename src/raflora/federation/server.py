"""The server's main loop: find clients, run rounds, evaluate, checkpoint, write outputs.

Runs inside a Flower ServerApp (simulation: a thread of the caller's process; deployment: its
own process). Rounds are driven with ``push_messages``/``pull_messages`` rather than
`Strategy.start`, because a run must resume at round t, checkpoint every round, time out a
round and report each client as it finishes; the strategy's four hooks do the work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from raflora.config import Config, ConfigError
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.federation.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from raflora.federation.evaluation import ServerEvaluator
from raflora.federation.outputs import write_config, write_metrics, write_plots
from raflora.federation.progress import LogReporter, Reporter
from raflora.federation.record import RoundRecord
from raflora.federation.strategy import HeteroRankStrategy, NodeInfo, RoundLog
from raflora.federation.trackers import Trackers
from raflora.federation.validation import expectation_for
from raflora.math.round import GlobalState
from raflora.training import partition_table

log = logging.getLogger("raflora")
# May differ between a run and its resumption: the rounds, and where the run folder is (a
# resume continues the folder it is pointed at, named relative or absolute, moved or renamed).
RESUMABLE_CHANGES = {("federation", "rounds"), ("run", "out_dir"), ("run", "name")}
# Finding the clients waits at least this long, however short the round timeout: the query is
# every client's first message (process start, imports, model and data loading).
STARTUP_TIMEOUT_S = 600.0


class RunAborted(RuntimeError):
    """The run cannot go on (no clients, duplicate partitions, mismatched resume...)."""


def exchange(
    grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[], None]
) -> list[Message]:
    """Send, then collect replies until all arrived or `timeout` seconds passed."""
    return list(arrivals(grid, messages, timeout, on_reply))


def arrivals(
    grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[], None]
) -> Iterator[Message]:
    """Send, then yield each reply as it is pulled, until all arrived or `timeout` seconds
    passed (the strategy can validate and spool a reply, then drop it, while others train)."""
    if not messages:
        return
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    interval = min(0.2, float(getattr(grid, "pull_interval", 0.2)))
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply()
            yield reply
        if pending:
            time.sleep(interval)


def discover_nodes(grid: Grid, config: Config, timeout: float) -> list[NodeInfo]:
    """Wait for the clients, then ask each for its partition id, rank and data size."""
    expected, deadline = config.clients.num_clients, time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RunAborted(f"only {len(node_ids)} of {expected} clients connected in {timeout}s")
        time.sleep(0.1)
    record = ConfigRecord({msg.RUN_CONFIG: config.to_json()})
    queries = [
        Message(RecordDict({msg.CONFIG: record}), node, MessageType.QUERY) for node in node_ids
    ]
    nodes: dict[int, NodeInfo] = {}
    for reply in exchange(grid, queries, timeout, lambda: None):
        if reply.has_error():
            raise RunAborted(f"client query failed: {reply.error.reason[:500]}")
        try:
            info = reply.content[msg.CONFIG]
            pid = int(info[msg.PARTITION_ID])
            rank, size = int(info[msg.RANK]), int(info[msg.NUM_EXAMPLES])
        except (KeyError, TypeError, ValueError) as error:
            raise RunAborted(
                f"client {reply.metadata.src_node_id} sent a malformed query reply ({error!r})"
            ) from None
        if pid in nodes:
            raise RunAborted(f"two clients claim partition-id {pid}")
        node = NodeInfo(reply.metadata.src_node_id, pid, rank, size)
        nodes[pid] = node
    if len(nodes) < expected:
        raise RunAborted(f"only {len(nodes)} of {expected} clients answered the query")
    return [nodes[pid] for pid in sorted(nodes)]


def check_ranks_fit(nodes: list[NodeInfo], modules: dict[str, tuple[int, int]]) -> None:
    """Every client's rank r_k ≤ min(m, n) of every target module W (m×n): a LoRA update
    B A of W has rank ≤ min(m, n), so a larger rank only ships and trains columns that can
    add nothing. Raises ConfigError naming the smallest module and the clients."""
    if not modules:
        return
    name, (m, n) = min(modules.items(), key=lambda item: min(item[1]))
    limit = min(m, n)
    over = {node.partition_id: node.rank for node in nodes if node.rank > limit}
    if over:
        listed = ", ".join(f"client {pid}: {rank}" for pid, rank in sorted(over.items()))
        raise ConfigError(
            f"clients.ranks: rank above {limit} = min(out, in) of target module {name} "
            f"({m}×{n}), which a LoRA update of it cannot exceed ({listed}); use ranks ≤ "
            f"{limit} (in deployment: the node's rank) or target larger modules"
        )


def client_table(config: Config, strategy: HeteroRankStrategy) -> Any:
    """Per client: local data size, rank and label (or task) counts."""
    data = task.load_data(config.to_json())
    shares = task.client_shares(config, data)
    ranks = [strategy.rank_of(pid) for pid in range(len(shares))]
    names = sorted(data.tasks) if data.kind == "multiple-choice" and len(data.tasks) > 1 else None
    names = names or list(data.label_names) or None
    return partition_table(task.partition_labels(data), shares, ranks, names)


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and (section, key) not in RESUMABLE_CHANGES:
                diffs.append(f"{section}.{key}: {old.get(key)!r} → {new.get(key)!r}")
    return diffs


class FederatedRun:
    """One federated run writing into `run_dir`; `main(grid)` is the ServerApp's body."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        reporter: Reporter | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.reporter = reporter or LogReporter()
        self.history: list[dict[str, Any]] = []
        self.state: GlobalState | None = None
        self.bounds: list[int] = []
        self.model_info: dict[str, Any] = {}
        self.trackers: Trackers | None = None

    def _start(self, evaluator: ServerEvaluator) -> GlobalState:
        path = latest_checkpoint(self.run_dir) if self.resume else None
        if path is None:
            if self.resume:
                log.warning("--resume: no checkpoint in %s; starting at round 1", self.run_dir)
            self.history = []
            return evaluator.initial_state()
        state, meta = load_checkpoint(path)
        diffs = _config_differences(meta.get("config", {}), self.config.to_dict())
        if diffs:
            raise ConfigError("cannot resume with a different config: " + "; ".join(diffs))
        self.history = list(meta.get("history", []))
        log.info("resuming from %s (round %d)", path, state.round)
        return state

    def main(self, grid: Grid) -> GlobalState:
        config = self.config
        evaluator = ServerEvaluator.load(config)
        state = self._start(evaluator)
        # only now: a refused resume must not overwrite the config the run was made with
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.run_dir, config)
        expectation = expectation_for(
            config, evaluator.module_shapes(), evaluator.dense_shapes(evaluator.initial_state())
        )
        strategy = HeteroRankStrategy(config=config, state=state, expectation=expectation)
        startup = max(config.federation.round_timeout_s, STARTUP_TIMEOUT_S)
        nodes = discover_nodes(grid, config, startup)
        check_ranks_fit(nodes, expectation.modules)
        strategy.register_nodes(nodes)
        strategy.summary()
        self.reporter.show(client_table(config, strategy))
        self.bounds = list(strategy.settings.bounds)
        self.model_info = evaluator.model_info()
        if state.round == 0 and not self.history:
            self.history.append(
                RoundRecord.of(RoundLog(round=0), evaluator.evaluate(state), 0.0).to_dict()
            )
        first, last = state.round + 1, config.federation.rounds
        self.trackers = Trackers(config, self.run_dir)
        if state.round == 0 and len(self.history) == 1:
            self.trackers.log_round(self.history[0], self.bounds, None)
        self.reporter.start(first, last)
        try:
            for server_round in range(first, last + 1):
                self._round(grid, strategy, evaluator, server_round, last)
        finally:
            self.reporter.stop()
            self.trackers.close()
        self.state = strategy.state
        return strategy.state

    def _round(self, grid, strategy, evaluator, server_round: int, last: int) -> None:
        config, start = self.config, time.perf_counter()
        timeout = config.federation.round_timeout_s
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        self.reporter.round_started(server_round, len(messages))
        replies = arrivals(grid, messages, timeout, self.reporter.client_done)
        strategy.aggregate_train(server_round, replies)  # consumes each reply as it arrives
        evaluations = list(
            strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
        )
        strategy.aggregate_evaluate(
            server_round, exchange(grid, evaluations, timeout, lambda: None)
        )
        due = server_round % config.eval.every == 0 or server_round == last
        server = evaluator.evaluate(strategy.state) if due else None
        record = RoundRecord.of(strategy.current, server, time.perf_counter() - start).to_dict()
        self.history.append(record)
        extra = {
            "history": self.history,
            "config": config.to_dict(),
            "bounds": self.bounds,
            "model": self.model_info,
        }
        save_checkpoint(self.run_dir, strategy.state, extra)
        write_metrics(self.run_dir, self.history, self.bounds)
        if self.trackers:  # the plots so far, for the trackers' image
            write_plots(self.run_dir, self.history, self.bounds, config.federation.method)
            image = self.run_dir / "plots" / "partition_energy.png"
            self.trackers.log_round(record, self.bounds, image)
        self.reporter.round_done(record)


def load_run_summary(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a finished or interrupted run."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (is this a run folder?)")
    return {"history": json.loads(path.read_text())}
