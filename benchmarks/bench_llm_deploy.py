"""LLM-scale rounds through a real Flower deployment on loopback (issue 21, item 1).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_deploy.py           # LLaMA-7B shapes
    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_deploy.py --quick   # 1 small layer

One `flower-superlink` and two `flower-supernode`s on 127.0.0.1 (tests/helpers/loopback.py),
then `flwr run benchmarks/llm_app` per wire dtype: clients of ranks 16 and 64 send LoRA factors
of every LLaMA-7B target (q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008, ×32 layers)
for 2 rounds; the server validates them and runs the real round step (`aggregate_round`, raflora),
and round 2 sends each client its rank-r_k allocation (llm_app/llm_payload.py).

Checked: every round completes, and the bytes Flower counts (`ArrayRecord.count_bytes`, the
project's ``bytes_sent``/``bytes_received``) equal the bytes computed here from the shapes alone:
per module ``r_k (m + n)`` floats × the wire dtype's item size + per array its npy header and key.
Measured: per round its wall time and phases (pack, exchange = `send_and_receive`, unpack +
validate, aggregate), throughput = bytes moved that round (both ways) / exchange seconds, the
peak resident set (``VmHWM``) of the SuperLink (read from /proc before it stops) and of the
ServerApp (its own, at its end), the clients' own, and of every Flower process, polled every
0.2 s (a peak reached in a process's last 0.2 s can be missed there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from flwr.app import Array

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import ROOT, emit, machine, output_path, table
from helpers.loopback import CONNECTION, Loopback
from llm_app.llm_payload import llama_modules

APP = ROOT / "benchmarks" / "llm_app"
RANKS = (16, 64)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
CARRIER = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
ROLES = ("flower-superlink", "flwr-serverapp", "flower-supernode", "flwr-clientapp")
MB = 1e6


def expected_bytes(modules: dict[str, tuple[int, int]], rank: int, wire: str) -> int:
    """What `count_bytes` counts for one message of rank-``rank`` factors of ``modules``: per
    module ``rank (m + n)`` floats × item size, plus per array its npy header and key."""
    header = len(Array(np.zeros((0, 0), CARRIER[wire])).data)  # npy v1: 128 bytes
    total = 0
    for name, (m, n) in modules.items():
        total += ITEMSIZE[wire] * rank * (m + n) + 2 * header
        total += len(name + ".lora_B") + len(name + ".lora_A")
    return total


def _role(proc: psutil.Process) -> str | None:
    try:
        words = " ".join(Path(w).name for w in proc.cmdline()[:3])
    except (psutil.Error, OSError):
        return None
    return next((role for role in ROLES if role in words), None)


def _hwm(pid: int) -> int:
    """A process's peak resident set so far (``VmHWM``), bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Polls the peak resident set of every Flower process under ``roots`` by role."""

    def __init__(self, roots: list[int], every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots, self.every = roots, every
        self.peaks: dict[int, tuple[str, int]] = {}  # pid → (role, VmHWM)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            for root in self.roots:
                try:
                    tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
                except psutil.Error:
                    continue
                for proc in tree:
                    role = self.peaks.get(proc.pid, (None,))[0] or _role(proc)
                    if role is not None:
                        peak = max(self.peaks.get(proc.pid, (role, 0))[1], _hwm(proc.pid))
                        self.peaks[proc.pid] = (role, peak)

    def by_role(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for role, peak in self.peaks.values():
            entry = out.setdefault(role, {"processes": 0, "max_peak_mb": 0.0})
            entry["processes"] += 1
            entry["max_peak_mb"] = max(entry["max_peak_mb"], peak / MB)
        return out


def run_deployment(wire: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One `flwr run` of the payload app on a fresh SuperLink + 2 SuperNodes."""
    net = Loopback(root)
    report_file = root / "report.json"
    try:
        net.start_superlink()
        for pid, rank in enumerate(RANKS):
            net.start_supernode(f"partition-id={pid} num-partitions={len(RANKS)} rank={rank}")
        sampler = Sampler([proc.pid for proc in net.procs])
        sampler.start()
        run_config = " ".join(
            [
                f"layers={args.layers} hidden={args.hidden} intermediate={args.intermediate}",
                f'rounds={args.rounds} method="{args.method}" wire-dtype="{wire}"',
                f'out-file="{report_file}"',
            ]
        )
        started = time.perf_counter()
        result = net.flwr(
            "run", str(APP), CONNECTION, "--stream", "--run-config", run_config,
            timeout=args.timeout,
        )  # fmt: skip
        wall = time.perf_counter() - started
        superlink_peak = _hwm(net.procs[0].pid)
        sampler.done.set()
        sampler.join()
        if result.returncode != 0 or not report_file.exists():
            raise RuntimeError(
                f"flwr run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-2000:]}\n{net.logs()}"
            )
        status = net.runs()[0]["status"]
    finally:
        leftovers = net.stop()
    report = json.loads(report_file.read_text())
    return {
        "report": report,
        "flwr_run_seconds": wall,
        "status": status,
        "superlink_peak_rss_mb": superlink_peak / MB,
        "polled_peaks": sampler.by_role(),
        "needed_sigkill": leftovers,
    }


def summarize(wire: str, run: dict[str, Any], modules: dict[str, tuple[int, int]]) -> dict:
    """Per round: time, throughput, bytes against the formula; peaks."""
    up = sum(expected_bytes(modules, r, wire) for r in RANKS)
    rounds = []
    for entry in run["report"]["rounds"]:
        down = 0 if entry["round"] == 1 else up  # round 1 sends no factors (fresh LoRA)
        moved = entry["bytes_sent"] + entry["bytes_received"]
        rounds.append(
            {
                "round": entry["round"],
                "seconds": entry["seconds"],
                "exchange_seconds": entry["exchange_seconds"],
                "aggregate_seconds": entry["aggregate_seconds"],
                "unpack_validate_seconds": entry["unpack_validate_seconds"],
                "bytes_sent": entry["bytes_sent"],
                "bytes_received": entry["bytes_received"],
                "expected_sent": down,
                "expected_received": up,
                "bytes_match": entry["bytes_sent"] == down and entry["bytes_received"] == up,
                "mb_per_s": moved / MB / entry["exchange_seconds"],
                "client_peak_rss_mb": [c["peak-rss-bytes"] / MB for c in entry["clients"]],
                # each client's own decode + generate + pack (part of the exchange)
                "client_work_seconds": [
                    c["decode-seconds"] + c["generate-seconds"] + c["pack-seconds"]
                    for c in entry["clients"]
                ],
            }
        )
    return {
        "wire_dtype": wire,
        "status": run["status"],
        "completed": run["status"] == "finished:completed",
        "bytes_match": all(r["bytes_match"] for r in rounds),
        "reply_bytes_per_rank": {r: expected_bytes(modules, r, wire) for r in RANKS},
        "rounds": rounds,
        "flwr_run_seconds": run["flwr_run_seconds"],
        "superlink_peak_rss_mb": run["superlink_peak_rss_mb"],
        "serverapp_peak_rss_mb": run["report"]["serverapp_peak_rss_bytes"] / MB,
        "polled_peaks": run["polled_peaks"],
        "needed_sigkill": run["needed_sigkill"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 layer of 64/172 widths")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="raflora")
    parser.add_argument("--wire", default="float32,float16", help="comma-separated dtypes")
    parser.add_argument("--timeout", type=float, default=3000.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate = 1, 64, 172
    modules = llama_modules(args.layers, args.hidden, args.intermediate)
    start_machine = machine()
    results = []
    for wire in args.wire.split(","):
        with tempfile.TemporaryDirectory(prefix="bench_llm_deploy_") as tmp:
            results.append(summarize(wire, run_deployment(wire, args, Path(tmp)), modules))
    rows = [
        [
            r["wire_dtype"], t["round"], f"{t['seconds']:.1f}", f"{t['exchange_seconds']:.1f}",
            f"{(t['bytes_sent'] + t['bytes_received']) / MB:,.1f}", f"{t['mb_per_s']:.1f}",
            t["bytes_match"], f"{r['superlink_peak_rss_mb']:,.0f}",
            f"{r['serverapp_peak_rss_mb']:,.0f}",
        ]
        for r in results
        for t in r["rounds"]
    ]  # fmt: skip
    columns = ["wire", "round", "s", "exchange s", "MB moved", "MB/s", "bytes ok",
               "SuperLink peak MB", "ServerApp peak MB"]  # fmt: skip
    table(f"{len(modules)} modules, ranks {RANKS}", columns, rows)
    summary = {
        "quick": args.quick,
        "modules": len(modules),
        "shapes": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate},
        "completed": all(r["completed"] for r in results),
        "bytes_match": all(r["bytes_match"] for r in results),
        **{
            r["wire_dtype"]: {
                "reply_mb_rank64": r["reply_bytes_per_rank"][64] / MB,
                "round_seconds": [t["seconds"] for t in r["rounds"]],
                "mb_per_s": [t["mb_per_s"] for t in r["rounds"]],
                "superlink_peak_rss_mb": r["superlink_peak_rss_mb"],
                "serverapp_peak_rss_mb": r["serverapp_peak_rss_mb"],
            }
            for r in results
        },
    }
    details = {
        "machine": {**start_machine, "load_average_1min_at_end": os.getloadavg()[0]},
        "method": args.method,
        "ranks": RANKS,
        "runs": results,
    }
    emit(summary, output_path("bench_llm_deploy", args.out, args.quick), details)
    return summary


if __name__ == "__main__":
    main()
