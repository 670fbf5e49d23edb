"""Flower strategy for heterogeneous-rank LoRA: every protocol detail comes from the method.

Each round, for every sampled client k of rank r_k the strategy sends what the run's method
hands a client of that rank (`raflora.math.methods`: the best rank-r_k truncation of the kept
update, or the leading r_k columns of the kept averaged factors, or nothing but the merged
update), receives the trained factors ``B_k (m, r_k)``, ``A_k (r_k, n)`` (LoRA scaling folded
in) and ``num-examples``, validates them, and runs the round step
(`raflora.math.round.aggregate_round`). FedAvg's aggregation cannot be used: client arrays
differ in shape.

The global state lives in the strategy; the ``arrays`` argument of the Flower hooks is not read
(it is handed an empty record). Clients are known by partition id: Flower node ids change from
run to run, partition ids do not, which keeps sampling and resumption reproducible.

What a round merged into the base (merge mode; a method's residual) reaches a client as that
round's factors, once (``federation.merged_wire = "rounds"``, FLoRA's and FedEx-LoRA's wire):
the strategy remembers per partition the last merged round the client confirmed (its train
reply's ``merged-through``) and sends only the later ones; a client that refuses for lack of
an earlier round gets them all next time. A new server process (a resumed run: a new Flower
run whose nodes start with an empty state) starts from nothing confirmed. A method that sends
its merged updates dense (``Method.dense_merged``: FedEx-LoRA's ``residual_wire = "dense"``)
gets each as the one m×n product instead of its factors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from raflora.config import Config
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.federation.spool import ReplySpool, spool_root
from raflora.federation.validation import (
    Expectation,
    RejectedUpdate,
    StartPoint,
    check_metrics,
    check_num_examples,
    check_update,
)
from raflora.math.device import computing_on
from raflora.math.methods import get_method
from raflora.math.round import (
    ClientUpdate,
    GlobalState,
    InMemorySource,
    RoundSettings,
    aggregate_streamed,
)
from raflora.training import torch_threads

log = logging.getLogger("raflora")


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    partition_id: int
    rank: int
    num_examples: int


@dataclass
class RoundLog:
    """What happened in one round, for metrics and the progress display."""

    round: int
    sampled: list[int] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped_modules: int = 0
    clipped: dict[int, str] = field(default_factory=dict)  # partition id → what was clipped
    # partition id → {"total": ‖contribution‖_F over all tensors, "largest": of one tensor}
    # (only when a norm bound is set)
    contributions: dict[int, dict[str, float]] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)  # partition id → num-examples
    ignored_evaluations: dict[int, str] = field(default_factory=dict)
    skipped: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    train_loss: float = float("nan")
    diagnostics: dict = field(default_factory=dict)
    client_eval: dict = field(default_factory=dict)
    # partition id → the client's own wall time of its round: {"seconds": total, "train":
    # {"seconds": local steps only}} (every timing field is named "seconds")
    client_time: dict[int, dict] = field(default_factory=dict)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WRAPPED = re.compile(r"<class '(?P<cls>[^']+)'>:<'(?P<text>.*)'>", re.S)  # Flower's error reason
_RAISED = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*): (?P<text>\S.*)$")


def readable_error(reason: str, limit: int = 300) -> str:
    """One line from a client error's reason: the first exception outside Ray and Flower (the
    client's own), as ``Name: message``; else the wrapping exception's first line."""
    text = _ANSI.sub("", reason)
    wrapped = _WRAPPED.fullmatch(text.strip())
    outer = wrapped["cls"].rsplit(".", 1)[-1] if wrapped else ""
    text = wrapped["text"] if wrapped else text
    for line in text.splitlines():
        raised = _RAISED.match(line)
        if raised and not raised["cls"].startswith(("ray.", "flwr.")):
            return f"{raised['cls'].rsplit('.', 1)[-1]}: {raised['text']}"[:limit]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"{outer}: {first}" if outer else first)[:limit]


def weighted_mean(values: list[tuple[float, float]]) -> float:
    """``Σ w x / Σ w`` over ``(x, w)`` pairs; NaN when there are none."""
    total = sum(w for _, w in values)
    return float(sum(x * w for x, w in values) / total) if total > 0 else float("nan")


class HeteroRankStrategy(Strategy):
    """Rank-heterogeneous FedLoRA strategy (FlexLoRA-style SVD allocation + any method).

    Parameters
    ----------
    config : Config
        The validated run configuration (method, options, sampling, apply mode...).
    state : GlobalState
        The state to start from (round 0, or a checkpoint).
    expectation : Expectation
        Module shapes and bounds used to validate replies.
    """

    def __init__(self, *, config: Config, state: GlobalState, expectation: Expectation) -> None:
        self.config = config
        self.state = state
        self.expectation = expectation
        self.config_json = config.to_json()
        self.nodes: dict[int, NodeInfo] = {}  # partition id → node
        self.sent: dict[int, StartPoint] = {}  # partition id → what its train message held
        self.current: RoundLog = RoundLog(round=state.round)
        # partition id → the last merged round the client confirmed holding (absent: none)
        self.confirmed: dict[int, int] = {}
        fed = config.federation
        self.method = get_method(fed.method)
        self.settings = RoundSettings.of(
            self.method,
            dict(fed.options),
            apply=fed.apply,
            carry_over=fed.carry_over,
            keep=fed.server_keep,
        )
        self._frozen_rows: msg.SharedRows | None = None  # frozen-A methods: see _shared_rows
        # dense_merged methods: the dense products of the merged rounds, per configure call
        self._dense_rounds: dict[int | None, dict[str, msg.Merged]] = {}

    # ------------------------------------------------------------------ nodes and sampling
    def register_nodes(self, nodes: Iterable[NodeInfo]) -> None:
        """Record the clients found by the query round; ranks already in the state win.

        The rank partitions (diagnostics, carry-over's r_cap) come from the ranks the clients
        report, i.e. the configured ones, not from ranks HetLoRA pruned since: a resumed run
        must use the same partitions as an uninterrupted one.
        """
        nodes = list(nodes)
        for node in nodes:
            rank = self.state.ranks.get(node.partition_id, node.rank)
            self.nodes[node.partition_id] = NodeInfo(
                node.node_id, node.partition_id, rank, node.num_examples
            )
        ranks = {node.rank for node in nodes}
        self.method.check_ranks(self.settings.options, sorted(ranks))
        self.settings = replace(self.settings, bounds=tuple(sorted(ranks)))
        self._frozen_rows = None  # drawn again for the new largest rank

    def sample(self, server_round: int) -> list[int]:
        """Seeded sample of partition ids: ``max(1, round(fraction · K))`` of them."""
        pids = sorted(self.nodes)
        count = max(1, round(self.config.federation.fraction_train * len(pids)))
        rng = np.random.default_rng([self.config.run.seed, server_round])
        return sorted(pids[i] for i in rng.choice(len(pids), size=count, replace=False))

    def rank_of(self, partition_id: int) -> int:
        return self.state.ranks.get(partition_id, self.nodes[partition_id].rank)

    # ------------------------------------------------------------------ messages
    @property
    def _per_round(self) -> bool:
        """Merged updates travel round by round (else: the whole merged sum every time)."""
        return self.config.federation.merged_wire == "rounds"

    def _payload(self, partition_id: int, remember: bool = False) -> ArrayRecord:
        rank = self.rank_of(partition_id)
        allocation = self.method.allocation
        lora = self.state.client_payload(rank, self.config.federation.split, allocation)
        if remember:  # a train message: its reply is measured from this start (validation.py)
            size = self.nodes[partition_id].num_examples
            bounded = self.expectation.max_norm is not None or (
                self.expectation.max_total_norm is not None
            )  # only the norm bounds read the factors sent (else: Σ r_k (m + n) floats kept)
            start = lora if bounded else {}
            self.sent[partition_id] = StartPoint(start, dict(self.state.dense), size)
        if self._per_round:  # the merged rounds this client has not confirmed
            after = self.confirmed.get(partition_id, 0)
            rounds = {
                t: self._on_wire(t, f) for t, f in self.state.merged_rounds.items() if t > after
            }
            return msg.pack(
                lora=lora,
                dense=self.state.dense,
                rounds=rounds,
                frozen_a=self.method.frozen_a,
                wire_dtype=self.config.federation.wire_dtype,
            )
        total = {name: update.factors() for name, update in self.state.merged.items()}
        merged = self._on_wire(None, total)
        return msg.pack(
            lora=lora,
            merged=merged,
            dense=self.state.dense,
            frozen_a=self.method.frozen_a,
            wire_dtype=self.config.federation.wire_dtype,
        )

    def _on_wire(self, t: int | None, factors: dict[str, msg.Factors]) -> dict[str, msg.Merged]:
        """Merged round ``t``'s factors (None: the whole merged update) as they travel: as they
        are, or for a ``dense_merged`` method the products ``(B A (m, n), None)``, computed
        once per configure call."""
        if not self.method.dense_merged(self.settings.options):
            return dict(factors)
        if t not in self._dense_rounds:
            self._dense_rounds[t] = {
                name: (np.asarray(B, np.float32) @ np.asarray(A, np.float32), None)
                for name, (B, A) in factors.items()
            }
        return self._dense_rounds[t]

    def _shared_rows(self) -> msg.SharedRows | None:
        """A frozen-A method's shared A (module, r) → A_0[:r], rebuilt from the run seed for
        the clients' B-only replies (None for every other method)."""
        if not self.method.frozen_a:
            return None
        if self._frozen_rows is None:
            modules = self.expectation.modules
            self._frozen_rows = task.shared_a_rows(
                self.config, lambda name: modules[name][1], self.settings.max_rank
            )
        return self._frozen_rows

    def _config(self, server_round: int, partition_id: int, base: ConfigRecord) -> ConfigRecord:
        record = ConfigRecord(dict(base))  # copy: never write into the caller's record
        record[msg.SERVER_ROUND] = server_round
        record[msg.RANK] = self.rank_of(partition_id)
        record[msg.RUN_CONFIG] = self.config_json
        if self._per_round:
            record[msg.MERGED_ROUNDS] = sorted(self.state.merged_rounds)
        return record

    def _confirm(self, partition_id: int, metrics: dict) -> None:
        """Note the last merged round a client's reply says its base holds (``merged-through``;
        ignored unless an integer between 0 and the last round the server has merged)."""
        through = metrics.get(msg.MERGED_THROUGH)
        last = max(self.state.merged_rounds, default=0)
        if isinstance(through, int) and not isinstance(through, bool) and 0 <= through <= last:
            self.confirmed[partition_id] = through

    def _messages(
        self, server_round: int, config: ConfigRecord, kind: str, pids: list[int]
    ) -> list[Message]:
        out = []
        self._dense_rounds = {}  # the state changed since the last call
        for pid in pids:
            content = RecordDict(
                {
                    msg.ARRAYS: self._payload(pid, remember=kind == MessageType.TRAIN),
                    msg.CONFIG: self._config(server_round, pid, config),
                }
            )
            node = self.nodes[pid].node_id
            ttl = self.config.federation.round_timeout_s + 60.0
            out.append(Message(content, node, kind, group_id=str(server_round), ttl=ttl))
        return out

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send each its rank-r_k share of the global update."""
        sampled = self.sample(server_round)
        self.current = RoundLog(round=server_round, sampled=sampled)
        self.sent = {}
        out = self._messages(server_round, config, MessageType.TRAIN, sampled)
        self.current.bytes_sent = sum(m.content[msg.ARRAYS].count_bytes() for m in out)
        return out

    def _node_to_pid(self) -> dict[int, int]:
        return {node.node_id: pid for pid, node in self.nodes.items()}

    def _accept(self, reply: Message, pid: int) -> ClientUpdate | None:
        log_ = self.current
        if reply.has_error():
            reason = readable_error(reply.error.reason)
            log_.failed[pid] = f"client error {reply.error.code}: {reason}"
            if msg.MISSING_ROUNDS in reply.error.reason:  # its state lost merged rounds
                self.confirmed.pop(pid, None)
            return None
        try:
            record = reply.content.array_records.get(msg.ARRAYS)
            metrics = reply.content.metric_records.get(msg.METRICS)
            if record is None or metrics is None:
                raise RejectedUpdate("reply lacks its arrays or metrics record")
            wire = self.config.federation.wire_dtype
            lora, _, dense = msg.unpack(record, frozen_a=self._shared_rows(), wire_dtype=wire)
            update, review = check_update(
                pid,
                lora,
                dense,
                metrics.get(msg.NUM_EXAMPLES),
                self.rank_of(pid),
                self.expectation,
                metrics=dict(metrics),
                start=self.sent.get(pid),
            )
        except (RejectedUpdate, msg.MessageFormatError) as error:
            log_.rejected[pid] = str(error)
            return None
        self._confirm(pid, dict(metrics))
        log_.bytes_received += record.count_bytes()
        log_.clipped_modules += review.clipped_modules
        log_.examples[pid] = update.num_examples
        if review.clipped:
            log_.clipped[pid] = review.clipped
        if review.norm is not None:
            log_.contributions[pid] = {"total": review.norm, "largest": review.largest}
        total, train = metrics.get(msg.SECONDS), metrics.get(msg.TRAIN_SECONDS)
        log_.client_time[pid] = {
            "seconds": None if total is None else float(total),
            "train": {"seconds": None if train is None else float(train)},
        }
        return update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate the good ones, keep the old state if too few remain.
        With ``federation.spool_dir`` each accepted reply's factors go to disk at once
        (`raflora.federation.spool`) and the round step reads them module by module; the
        spool is deleted after the round."""
        root = spool_root(self.config.federation.spool_dir)
        if root is None:
            return self._aggregate_train(server_round, replies, None)
        with ReplySpool(root, server_round) as spool:
            return self._aggregate_train(server_round, replies, spool)

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message], spool: ReplySpool | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_node = self._node_to_pid()
        updates: list[ClientUpdate] = []
        answered = set()
        for reply in replies:
            pid = by_node.get(reply.metadata.src_node_id)
            if pid is None or pid not in self.current.sampled:
                continue
            answered.add(pid)
            update = self._accept(reply, pid)
            if update is not None:  # spooled: only its header stays in memory
                updates.append(update if spool is None else spool.add(update))
        for pid in sorted(set(self.current.sampled) - answered):
            self.current.failed[pid] = "no reply before the round timeout"
        for pid, reason in sorted({**self.current.failed, **self.current.rejected}.items()):
            log.warning("round %d: client %d dropped: %s", server_round, pid, reason)
        self.current.ok = sorted(u.partition_id for u in updates)
        if len(updates) < self.config.federation.min_clients:
            log.warning(
                "round %d skipped: %d valid replies < min_clients=%d; global update kept",
                server_round,
                len(updates),
                self.config.federation.min_clients,
            )
            self.current.skipped = True
            self.state = replace(self.state, round=server_round)
            return None, None
        fed = self.config.federation
        with torch_threads(fed.server_threads), computing_on(task.server_device(self.config)):
            # fixed threads: same bits in every process; server_device: where the math runs
            source = InMemorySource(updates) if spool is None else spool
            self.state, diagnostics = aggregate_streamed(self.state, source, self.settings)
        self.current.diagnostics = diagnostics
        self.current.train_loss = weighted_mean(
            [(u.metrics.get(msg.TRAIN_LOSS, float("nan")), u.num_examples) for u in updates]
        )
        total = sum(u.num_examples for u in updates)
        return None, MetricRecord({"num-examples": total, "train-loss": self.current.train_loss})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the clients of this round to evaluate the new global model at their rank."""
        if not self.config.federation.evaluate_clients or self.current.skipped:
            return []
        return self._messages(server_round, config, MessageType.EVALUATE, self.current.ok)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' local validation metrics; a reply with a
        metric that is not a finite number in its range (or a bad num-examples) is ignored and
        named in `RoundLog.ignored_evaluations`."""
        results: dict[str, list[tuple[float, float]]] = {}
        by_node = self._node_to_pid()
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.metric_records.get(msg.METRICS)
            if metrics is None:
                continue
            values = dict(metrics)
            try:
                weight = self._evaluation_weight(values.pop(msg.NUM_EXAMPLES, 0))
                check_metrics(values)
            except RejectedUpdate as error:  # a malformed reply must not stop the server
                pid = by_node.get(reply.metadata.src_node_id, -1)
                self.current.ignored_evaluations[pid] = str(error)
                continue
            for key, value in values.items():
                results.setdefault(key, []).append((float(value), weight))
        summary = {key: weighted_mean(values) for key, values in results.items()}
        self.current.client_eval = summary
        return MetricRecord(summary) if summary else None

    def _evaluation_weight(self, num_examples: object) -> float:
        """An evaluation reply's num-examples: 0 (no validation split) or a valid count."""
        if isinstance(num_examples, (int, float)) and num_examples == 0:
            return 0.0
        return float(check_num_examples(num_examples, None, self.expectation.max_num_examples))

    def summary(self) -> None:
        fed = self.config.federation
        log.info(
            "HeteroRankStrategy(method=%s, options=%s, apply=%s, carry_over=%s, fraction=%s, "
            "min_clients=%d, clients=%d, ranks=%s)",
            fed.method,
            self.settings.options,
            self.settings.apply,
            self.settings.carry_over,
            fed.fraction_train,
            fed.min_clients,
            len(self.nodes),
            {pid: self.rank_of(pid) for pid in sorted(self.nodes)},
        )
