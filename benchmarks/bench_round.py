"""Flower simulation round time vs the clients' own time on the critical path (issue 6, item 3).

    .venv/bin/python benchmarks/bench_round.py            # full run: ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_round.py --quick    # smoke run: in-process, nothing saved

One federated run per method (raflora, flexlora), each in a fresh process, through
`raflora.federation.simulation.run_federated` (Flower's simulation engine on Ray): 10 MiniLM
clients of ranks 2/4/8/16, `examples/tiny.toml` otherwise, client-side evaluation off and
server evaluation only in the last round, so a round is: send allocations, clients train,
aggregate + allocate, checkpoint.

Definitions, per round r:
- wall T_r: time between the ends of rounds r−1 and r as the server loop sees them (progress
  callbacks), so it includes packing messages, Ray dispatch, the clients, the replies,
  aggregation, checkpoint and metrics writing. The last round also evaluates on the server's
  test set; it is reported but left out of the overhead statistic.
- client time s_k: what the client reports for its whole `train_round` (model setup, local
  steps, factor conversion; `metrics.json` → ``client_time``). Not included: unpacking the
  message and packing the reply (part of what Flower's side costs).
- critical path C_r: the clients run on A actors in parallel (A = CPUs / cpus per client = 2
  here); Flower's actor pool gives each message, in the order sent (partition ids), to the first
  actor that is free, so C_r = max over actors of the summed s_k of the clients it got under that
  greedy assignment. It is the round's length if everything but the clients' own work took no
  time. (Also reported: the lower bound max(max_k s_k, Σ_k s_k / A) of any assignment.)
- overhead_r = T_r / C_r − 1; "train phase" overhead uses only send → last reply.
Goal: median overhead ≤ 10 %. Bytes per round (sent + received) must be equal for raflora and
flexlora: both send rank-r_k allocations and receive rank-r_k factors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, console, emit, fmt_seconds, machine, median, output_path, table

METHODS = ("raflora", "flexlora")
GOAL_OVERHEAD = 0.10


def overrides(method: str, quick: bool, rounds: int, path: str | None = None) -> list[str]:
    common = [
        f"federation.method={method}",
        "federation.evaluate_clients=false",
        "eval.every=1000",  # server evaluation only in the last round
        "data.local_val_fraction=0.0",
        "train.threads=1",
        "simulation.num_cpus_per_client=1",
    ]
    if quick:
        common += [f"model.path={path}"] if path else []
        return [*common, "clients.num_clients=2", "clients.ranks=[2, 4]", "federation.rounds=2",
                "train.local_steps=2", "train.batch_size=4", "model.max_length=16",
                "data.train_size=60", "data.test_size=16"]  # fmt: skip
    return [*common, "clients.num_clients=10", "clients.ranks=[2, 4, 8, 16]",
            f"federation.rounds={rounds}", "train.local_steps=8", "train.batch_size=16",
            "model.max_length=48", "data.train_size=1200", "data.test_size=200"]  # fmt: skip


class Clock:
    """A progress reporter that only timestamps the server loop's callbacks."""

    def __init__(self) -> None:
        self.start_time = 0.0
        self.rounds: dict[int, dict[str, Any]] = {}
        self.current = 0

    def start(self, first_round: int, last_round: int) -> None:
        self.start_time = time.perf_counter()

    def round_started(self, server_round: int, clients: int) -> None:
        self.current = server_round
        self.rounds[server_round] = {"sent": time.perf_counter(), "replies": []}

    def client_done(self) -> None:
        self.rounds[self.current]["replies"].append(time.perf_counter())

    def round_done(self, record: dict[str, Any]) -> None:
        self.rounds[record["round"]]["done"] = time.perf_counter()

    def stop(self) -> None: ...

    def show(self, renderable: Any) -> None: ...


def run_one(
    method: str, quick: bool, rounds: int, run_dir: Path, path: str | None = None
) -> dict[str, Any]:
    """One run (in this process); per round: wall, train phase, client times, bytes."""
    from raflora.config import load_config

    config = load_config(ROOT / "examples" / "tiny.toml", overrides(method, quick, rounds, path))
    clock = Clock()
    start = time.perf_counter()
    if quick:  # no Ray: the same server loop and ClientApp handlers in one process
        from raflora.experiments.inprocess import run_inprocess

        run_inprocess(config, run_dir, reporter=clock)
        actors = 1
    else:
        from raflora.federation.simulation import run_federated

        run_federated(config, run_dir, reporter=clock)
        actors = int((os.cpu_count() or 1) // config.simulation.num_cpus_per_client)
    wall = time.perf_counter() - start
    history = json.loads((run_dir / "metrics.json").read_text())
    out = []
    previous = clock.start_time
    for record in history[1:]:
        r = record["round"]
        marks = clock.rounds[r]
        times = [record["client_time"][str(pid)] for pid in record["clients"]]  # send order
        seconds = [t["seconds"] for t in times]
        free = [0.0] * actors  # Flower's actor pool: next message → first free actor
        for s in seconds:
            free[free.index(min(free))] += s
        critical = max(free)
        out.append({
            "round": r, "clients": len(seconds), "actors": actors,
            "wall": marks["done"] - previous,
            "train_phase": max(marks["replies"]) - marks["sent"],
            "critical_path": critical,
            "lower_bound": max(max(seconds), sum(seconds) / actors),
            "client_seconds": seconds,
            "client_train_seconds": [t["train"]["seconds"] for t in times],
            "server_eval": record.get("server_accuracy") is not None,
            "bytes_sent": record["bytes_sent"], "bytes_received": record["bytes_received"],
        })  # fmt: skip
        previous = marks["done"]
    return {"method": method, "wall_seconds": wall, "rounds": out}


def worker_main(spec: str) -> None:
    args = json.loads(spec)
    result = run_one(args["method"], args["quick"], args["rounds"], Path(args["run_dir"]))
    print(json.dumps(result))


def run_isolated(method: str, quick: bool, rounds: int, run_dir: Path) -> dict[str, Any]:
    spec = json.dumps({"method": method, "quick": quick, "rounds": rounds, "run_dir": str(run_dir)})
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", spec],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 clients, 2 rounds, no Ray")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (the last one evaluates)")
    parser.add_argument("--model-path", help="--quick: a local folder instead of MiniLM")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_round.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    info = machine() | {"quick": args.quick}
    console.print(f"bench_round on {info}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            run_dir = Path(tmp) / method
            if args.quick:
                runs[method] = run_one(method, True, args.rounds, run_dir, args.model_path)
            else:
                runs[method] = run_isolated(method, False, args.rounds, run_dir)
    rows = []
    for method, run in runs.items():
        for r in run["rounds"]:
            rows.append([
                method, r["round"] if not r["server_eval"] else f"{r['round']} (+eval)",
                f"{r['clients']} on {r['actors']}", fmt_seconds(r["wall"]),
                fmt_seconds(r["train_phase"]), fmt_seconds(r["critical_path"]),
                fmt_seconds(r["lower_bound"]), fmt_seconds(sum(r["client_seconds"])),
                f"{r['wall'] / r['critical_path'] - 1:+.1%}",
                f"{r['train_phase'] / r['critical_path'] - 1:+.1%}",
                f"{r['bytes_sent']:,}", f"{r['bytes_received']:,}",
            ])  # fmt: skip
    table(
        "Flower simulation rounds: wall time vs the clients' critical path",
        ["method", "round", "clients", "wall", "train phase", "critical path", "lower bound",
         "Σ client", "overhead", "train-phase overhead", "bytes sent", "bytes received"],
        rows,
    )  # fmt: skip
    summary: dict[str, Any] = {"quick": args.quick}
    for method, run in runs.items():
        counted = [r for r in run["rounds"] if not r["server_eval"]] or run["rounds"]
        summary[f"overhead_{method}"] = median(
            [r["wall"] / r["critical_path"] - 1 for r in counted]
        )
        summary[f"train_phase_overhead_{method}"] = median(
            [r["train_phase"] / r["critical_path"] - 1 for r in counted]
        )
        summary[f"bytes_per_round_{method}"] = median(
            [r["bytes_sent"] + r["bytes_received"] for r in run["rounds"]]
        )
    summary["max_overhead"] = max(summary[f"overhead_{m}"] for m in METHODS)
    summary["goal_met"] = bool(summary["max_overhead"] <= GOAL_OVERHEAD)
    summary["bytes_equal"] = all(
        (a["bytes_sent"], a["bytes_received"]) == (b["bytes_sent"], b["bytes_received"])
        for a, b in zip(runs["raflora"]["rounds"], runs["flexlora"]["rounds"], strict=True)
    )
    out = output_path("bench_round", args.out, args.quick)
    details = {"machine": info, "overrides": overrides("<method>", args.quick, args.rounds)}
    emit(summary, out, details | {"runs": runs})


if __name__ == "__main__":
    main()
