"""Bounded server memory (issue 21, part 2): a K = 100 round at LLaMA-7B shapes, streamed.

    .venv/bin/python benchmarks/bench_stream.py --layers 32   # the whole model: 224 modules
    .venv/bin/python benchmarks/bench_stream.py --layers 4    # 28 modules (what fits an hour)
    .venv/bin/python benchmarks/bench_stream.py --quick       # smoke run: tiny shapes, in-process

1. Spool: K clients with ranks drawn (seeded) from {4, 8, 16, 32, 64}, random float32 factors
   ``B_k (m, r_k)``, ``A_k (r_k, n)`` for every module of the first ``--layers`` LLaMA-7B layers
   (q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008; out × in), written one client at a
   time through the strategy's own `raflora.federation.spool.ReplySpool` (float32 on disk:
   ≈ 0.78 GB per layer at K = 100, ≈ 25 GB for 32 layers; the free space is checked first and
   the spool deleted at the end).
2. Streamed round: a fresh worker process reopens the spool and runs
   `raflora.math.round.aggregate_streamed` (the server's round step, method ``--method``,
   ``keep="leading"``: the kept state is each module's top r_cap = 64 triplets in float32) over
   every module. Peak memory: the worker's ``ru_maxrss`` (its whole life: interpreter, torch,
   every module's factors, stack, float64 copies, R×R matrices, the kept state), and the rise
   over its resident set just before the round. Per module: seconds reading the spool and
   seconds computing.
3. In-memory step, same run: a second worker loads every client's factors of ``--subset``
   modules (the first layer's 7 by default: every shape) into memory and times today's
   in-memory step (`aggregate_round`, ``keep="all"``) and the streamed step from the spool on
   exactly those modules, alternating, ``--repeats`` times each (the fastest counts), and
   compares what clients get (the top-64 factors) and the diagnostics.

Goals (issue 21): peak RSS ≤ 4 GB on this 24 GB machine; streamed time (reading included) ≤
1.2× the in-memory step's compute for the same modules and R; results equal to float32
tolerance. Both workers run with glibc's defaults (as a server process does) and the
benchmark's threads; run it under ``nice -n 19`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, emit, fmt_bytes, fmt_seconds, machine, output_path, run_worker, table

LLAMA = {  # projection → (out, in) = (m, n) of its LoRA update B A
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
RANK_CHOICES = (4, 8, 16, 32, 64)
GOAL_PEAK_BYTES = 4 * 2**30
GOAL_RATIO = 1.2
GOAL_DIFF = 1e-4  # float32 storage


def module_shapes(layers: int, quick: bool) -> dict[str, tuple[int, int]]:
    """``model.layers.<i>.<projection>`` → (m, n) for the first ``layers`` layers (quick: /64)."""
    scale = 64 if quick else 1
    return {
        f"model.layers.{i}.{proj}": (m // scale, n // scale)
        for i in range(layers)
        for proj, (m, n) in LLAMA.items()
    }


def client_ranks(clients: int, seed: int, choices: tuple[int, ...]) -> list[int]:
    return [int(r) for r in np.random.default_rng([seed, 21]).choice(choices, size=clients)]


def write_spool(root: Path, spec: dict[str, Any]) -> tuple[Path, int, float]:
    """Write every client's factors through `ReplySpool`; (folder, bytes on disk, seconds)."""
    from raflora.federation.spool import ReplySpool
    from raflora.math.round import ClientUpdate

    shapes = module_shapes(spec["layers"], spec["quick"])
    spool = ReplySpool(root, 1)
    start = time.perf_counter()
    for pid, rank in enumerate(spec["ranks"]):
        rng = np.random.default_rng([spec["seed"], pid])
        factors = {}
        for name, (m, n) in shapes.items():  # LoRA-like scales: B small, A ~ 1/√n
            B = rng.standard_normal((m, rank), dtype=np.float32) * np.float32(1e-2)
            A = rng.standard_normal((rank, n), dtype=np.float32) * np.float32(1 / np.sqrt(n))
            factors[name] = (B, A)
        spool.add(ClientUpdate(pid, rank, int(rng.integers(100, 1000)), factors))
        del factors
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in spool.folder.iterdir())
    return spool.folder, size, seconds


class TimedSource:
    """A module source that records, per module, the seconds spent reading it."""

    def __init__(
        self, source: Any, modules: list[str] | None = None, progress: str | None = None
    ) -> None:
        self.source = source
        self.progress = progress  # a file that gets one line per module read
        self._modules = modules if modules is not None else source.modules
        self.read: dict[str, float] = {}
        self.marks: list[tuple[str, float, float]] = []  # (module, load start, load end)

    @property
    def updates(self) -> list[Any]:
        return self.source.updates

    @property
    def modules(self) -> list[str]:
        return self._modules

    def load(self, name: str) -> list[Any]:
        start = time.perf_counter()
        out = self.source.load(name)
        end = time.perf_counter()
        self.read[name] = end - start
        self.marks.append((name, start, end))
        if self.progress:
            with open(self.progress, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {len(self.marks)} {name}\n")
        return out


def settings_for(spec: dict[str, Any], keep: str) -> Any:
    from raflora.math.methods import get_method
    from raflora.math.round import RoundSettings

    bounds = tuple(sorted(set(spec["ranks"])))
    return RoundSettings.of(get_method(spec["method"]), bounds=bounds, keep=keep)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def stream_round(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole round, streamed from the spool (worker 2)."""
    import torch

    from raflora.federation.spool import ReplySpool
    from raflora.math.round import GlobalState, aggregate_streamed

    torch.set_num_threads(spec["threads"])
    source = TimedSource(ReplySpool.reopen(Path(spec["folder"])), None, spec["progress"])
    settings = settings_for(spec, "leading")
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    state, diagnostics = aggregate_streamed(GlobalState(0, {}, {}, {}, {}), source, settings)
    seconds = time.perf_counter() - start
    ends = [end for _, _, end in source.marks]
    starts = [s for _, s, _ in source.marks[1:]] + [start + seconds]
    compute = {name: s - e for (name, _, _), e, s in zip(source.marks, ends, starts, strict=True)}
    kept = sum(x.nbytes for u in state.adapter.values() for x in (u.U, u.S, u.Vt))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "read_seconds": sum(source.read.values()),
        "module_read_seconds": source.read,
        "module_compute_seconds": compute,
        "peak_rss_bytes": peak,
        "vm_hwm_bytes": _status_bytes("VmHWM"),
        "rss_before_round_bytes": rss_before,
        "kept_state_bytes": kept,
        "modules": len(source.modules),
        "global_rank": diagnostics["global_rank"],
        "effective_rank": diagnostics["effective_rank"],
    }


def _payload_diff(a: Any, b: Any, rank: int) -> float:
    """max |x − y| / max |x| over the rank-`rank` factors (U S, Vt) two states hand a client."""
    worst = 0.0
    for x, y in zip(a.factors(rank), b.factors(rank), strict=True):
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def compare_subset(spec: dict[str, Any]) -> dict[str, Any]:
    """In-memory step vs streamed step on the same modules (worker 3)."""
    import torch

    from raflora.federation.spool import ReplySpool
    from raflora.math.round import ClientUpdate, GlobalState, aggregate_round, aggregate_streamed

    torch.set_num_threads(spec["threads"])
    spool = ReplySpool.reopen(Path(spec["folder"]))
    subset = spec["subset"]
    columns = {name: spool.load(name) for name in subset}  # every client's factors, in memory
    updates = [
        ClientUpdate(h.partition_id, h.rank, h.num_examples, {n: columns[n][i] for n in subset})
        for i, h in enumerate(spool.updates)
    ]
    del columns
    empty = GlobalState(0, {}, {}, {}, {})
    memory_times, stream_times = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        in_memory, diag_memory = aggregate_round(empty, updates, settings_for(spec, "all"))
        memory_times.append(time.perf_counter() - start)
        source = TimedSource(spool, subset)
        start = time.perf_counter()
        streamed, diag_stream = aggregate_streamed(empty, source, settings_for(spec, "leading"))
        stream_times.append(time.perf_counter() - start)
    r_cap = max(spec["ranks"])
    diff = max(_payload_diff(in_memory.adapter[n], streamed.adapter[n], r_cap) for n in subset)
    values = max(
        float(np.abs(in_memory.adapter[n].S[:r_cap] - streamed.adapter[n].S).max())
        / float(in_memory.adapter[n].S[0])
        for n in subset
    )
    same_diagnostics = all(
        np.allclose(diag_memory["per_module"][n][key], diag_stream["per_module"][n][key])
        for n in subset
        for key in ("effective_rank", "stable_rank", "norm", "partition_energy")
    ) and diag_memory["global_rank"] == diag_stream["global_rank"]
    return {
        "modules": subset,
        "sum_rank": int(sum(spec["ranks"])),
        "in_memory_seconds": memory_times,
        "streamed_seconds": stream_times,
        "streamed_read_seconds": sum(source.read.values()),
        "ratio": min(stream_times) / min(memory_times),
        "payload_max_rel_diff": diff,
        "values_max_rel_diff": values,
        "same_diagnostics": bool(same_diagnostics),
        "in_memory_kept_bytes": sum(
            x.nbytes for u in in_memory.adapter.values() for x in (u.B, u.A, u.U, u.S, u.Vt)
        ),
        "streamed_kept_bytes": sum(
            x.nbytes for u in streamed.adapter.values() for x in (u.U, u.S, u.Vt)
        ),
    }


def worker_main(text: str) -> None:
    spec = json.loads(text)
    result = stream_round(spec) if spec["task"] == "stream" else compare_subset(spec)
    print(json.dumps(result, default=float), flush=True)


def run_task(spec: dict[str, Any], task: str) -> dict[str, Any]:
    """In-process for --quick (no workers in CI), else a fresh worker process."""
    spec = {**spec, "task": task}
    if spec["quick"]:
        return stream_round(spec) if task == "stream" else compare_subset(spec)
    return run_worker(Path(__file__), spec, timeout=6 * 3600.0, memory=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, K = 6, in-process")
    parser.add_argument("--layers", type=int, default=32, help="LLaMA-7B layers (7 modules each)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--method", default="raflora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="in-memory vs streamed timings")
    parser.add_argument(
        "--subset",
        default=",".join(LLAMA),
        help="layer 0's projections also timed in memory (default: all 7)",
    )
    parser.add_argument("--progress", help="a file the streamed round logs each module to")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--spool-root", default=tempfile.gettempdir(), help="spool's parent")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_stream.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    clients = 6 if args.quick else args.clients
    layers = 1 if args.quick else args.layers
    choices = (1, 2, 4) if args.quick else RANK_CHOICES
    ranks = client_ranks(clients, args.seed, choices)
    shapes = module_shapes(layers, args.quick)
    subset = [f"model.layers.0.{proj}" for proj in args.subset.split(",")]
    if args.quick or not set(subset) <= set(shapes):
        subset = list(shapes)[:7]
    needed = 4 * sum(ranks) * sum(m + n for m, n in shapes.values())
    root = Path(args.spool_root)
    free = shutil.disk_usage(root).free
    if needed * 1.05 + 2**30 > free:
        sys.exit(
            f"--spool-root {root}: the spool needs {fmt_bytes(needed)} and only "
            f"{fmt_bytes(free)} is free (keep 1 GiB spare); use fewer --layers or another root"
        )
    threads = args.threads or len(os.sched_getaffinity(0))
    info = machine() | {"quick": args.quick, "threads": threads}
    console.print(
        f"bench_stream on {info}: K = {clients}, R = Σ r_k = {sum(ranks)}, {len(shapes)} "
        f"modules, spool {fmt_bytes(needed)}"
    )
    spec: dict[str, Any] = {
        "quick": args.quick, "layers": layers, "ranks": ranks, "method": args.method,
        "seed": args.seed, "threads": threads, "subset": subset, "repeats": args.repeats,
        "progress": args.progress,
    }  # fmt: skip
    folder = None
    try:
        folder, size, write_seconds = write_spool(root, spec)
        spec["folder"] = str(folder)
        console.print(f"spool written: {fmt_bytes(size)} in {fmt_seconds(write_seconds)}")
        stream = run_task(spec, "stream")
        console.print(f"streamed round: {fmt_seconds(stream['seconds'])}")
        subset_run = run_task(spec, "compare")
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    compute = stream["module_compute_seconds"]
    read = stream["module_read_seconds"]
    rows = [
        [
            "whole round (streamed)", len(shapes), fmt_seconds(stream["seconds"]),
            fmt_seconds(stream["read_seconds"]), fmt_bytes(stream["peak_rss_bytes"]),
            fmt_bytes(stream["kept_state_bytes"]),
        ],
        [
            "subset, in memory", len(subset), fmt_seconds(min(subset_run["in_memory_seconds"])),
            "–", "–", fmt_bytes(subset_run["in_memory_kept_bytes"]),
        ],
        [
            "subset, streamed", len(subset), fmt_seconds(min(subset_run["streamed_seconds"])),
            fmt_seconds(subset_run["streamed_read_seconds"]), "–",
            fmt_bytes(subset_run["streamed_kept_bytes"]),
        ],
    ]  # fmt: skip
    table(
        f"K = {clients} round, R = {sum(ranks)}, method {args.method}",
        ["step", "modules", "seconds", "reading", "peak RSS", "kept state"],
        rows,
    )
    per_layer_state = stream["kept_state_bytes"] / layers
    summary = {
        "quick": args.quick,
        "clients": clients,
        "sum_rank": int(sum(ranks)),
        "layers": layers,
        "modules": len(shapes),
        "spool_bytes": size,
        "spool_write_seconds": write_seconds,
        "round_seconds": stream["seconds"],
        "round_read_seconds": stream["read_seconds"],
        "peak_rss_bytes": stream["peak_rss_bytes"],
        "peak_rss_rise_bytes": stream["peak_rss_bytes"] - stream["rss_before_round_bytes"],
        "kept_state_bytes": stream["kept_state_bytes"],
        # the kept state grows linearly with layers; the rest of the peak is one module's work
        "peak_rss_32_layers_estimate_bytes": stream["peak_rss_bytes"]
        + per_layer_state * (32 - layers),
        "subset_modules": len(subset),
        "subset_in_memory_seconds": min(subset_run["in_memory_seconds"]),
        "subset_streamed_seconds": min(subset_run["streamed_seconds"]),
        "time_ratio": subset_run["ratio"],
        "time_ratio_whole_round": sum(compute[n] + read[n] for n in subset)
        / min(subset_run["in_memory_seconds"]),
        "payload_max_rel_diff": subset_run["payload_max_rel_diff"],
        "values_max_rel_diff": subset_run["values_max_rel_diff"],
        "same_diagnostics": subset_run["same_diagnostics"],
    }
    summary["goal_memory_met"] = bool(summary["peak_rss_bytes"] <= GOAL_PEAK_BYTES)
    summary["goal_time_met"] = bool(summary["time_ratio"] <= GOAL_RATIO)
    summary["correct"] = bool(
        summary["payload_max_rel_diff"] <= GOAL_DIFF and summary["same_diagnostics"]
    )
    out = output_path("bench_stream", args.out, args.quick)
    details = {"machine": info, "ranks": ranks, "stream": stream, "subset": subset_run}
    emit(summary, out, details)


if __name__ == "__main__":
    main()
