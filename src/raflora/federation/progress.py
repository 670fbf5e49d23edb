"""Live progress of a federated run: round, clients done, loss, accuracy, top-r_min energy."""

from __future__ import annotations

import io
import logging
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raflora.federation.record import describe

log = logging.getLogger("raflora")


class Reporter(Protocol):
    def start(self, first_round: int, last_round: int) -> None: ...
    def round_started(self, server_round: int, clients: int) -> None: ...
    def client_done(self) -> None: ...
    def round_done(self, record: dict[str, Any]) -> None: ...
    def stop(self) -> None: ...
    def show(self, renderable: Any) -> None: ...


class RichReporter:
    """Two bars: rounds (with the latest metrics) and the clients of the current round."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.rounds = self.clients = None

    def start(self, first_round: int, last_round: int) -> None:
        self.progress.start()
        total = last_round - first_round + 1
        self.rounds = self.progress.add_task("rounds", total=total, info="")
        self.clients = self.progress.add_task("clients", total=1, info="")

    def round_started(self, server_round: int, clients: int) -> None:
        self.progress.update(
            self.clients, completed=0, total=clients, description=f"round {server_round} clients"
        )

    def client_done(self) -> None:
        self.progress.advance(self.clients)

    def round_done(self, record: dict[str, Any]) -> None:
        self.progress.update(self.rounds, advance=1, info=describe(record))

    def stop(self) -> None:
        self.progress.stop()

    def show(self, renderable: Any) -> None:
        self.progress.console.print(renderable)


class LogReporter:
    """Plain log lines (deployment: the ServerApp runs in its own process without a TTY)."""

    def start(self, first_round: int, last_round: int) -> None:
        log.info("rounds %d..%d", first_round, last_round)

    def round_started(self, server_round: int, clients: int) -> None:
        log.info("round %d: %d clients", server_round, clients)

    def client_done(self) -> None:
        pass

    def round_done(self, record: dict[str, Any]) -> None:
        log.info("round %d done: %s", record["round"], describe(record))

    def stop(self) -> None:
        pass

    def show(self, renderable: Any) -> None:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(renderable)
        log.info("\n%s", console.export_text())
