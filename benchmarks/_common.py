"""Shared helpers of the benchmark scripts: peak-memory probes, worker processes, tables, JSON.

Peak memory is measured as the rise of the process's resident set (Linux ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) during one call, inside a fresh worker process
started with glibc's mmap threshold pinned at 64 KiB and MKL's buffer cache off, so that freed
buffers go back to the OS instead of being reused silently. It counts everything the call
touches (numpy, torch, LAPACK workspaces), unlike ``tracemalloc``, which does not see torch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
console = Console(highlight=False, width=160)

# Environment of a memory-measuring worker: every buffer ≥ 64 KiB is its own mmap and is unmapped
# when freed (no dynamic threshold, no arena reuse hiding a peak); MKL allocates through malloc.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MKL_DISABLE_FAST_MM": "1",
    "PYTHONWARNINGS": "ignore",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_call(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn()`` once: (result, seconds, peak resident-set rise in bytes during the call).

    The rise is measured against the resident set just before the call, so inputs that already
    exist do not count; the result, still alive at the end, does. Where the kernel cannot reset
    the high-water mark (e.g. gVisor), a thread samples VmRSS every millisecond instead.
    """
    import gc
    import threading

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
            f.write("5")
        sampler = None
    except OSError:
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                peak[0] = max(peak[0], _status_kib("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
    before = _status_kib("VmRSS")
    if sampler is not None:
        peak[0] = before
        sampler.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    if sampler is None:
        return result, seconds, (_status_kib("VmHWM") - before) * 1024
    done.set()
    sampler.join()
    return result, seconds, (max(peak[0], _status_kib("VmRSS")) - before) * 1024


def run_worker(
    script: Path, spec: dict[str, Any], timeout: float = 3600.0, memory: bool = True
) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh process; its last stdout line is a JSON dict.

    ``memory=True``: with `WORKER_ENV` (peak memory is exact, but every large buffer is a fresh
    mmap, so each call pays its page faults again). ``memory=False``: glibc's defaults, as a
    server process runs, for timing."""
    env = {**os.environ, **(WORKER_ENV if memory else {"PYTHONWARNINGS": "ignore"})}
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_seconds(s: float) -> str:
    if s != s:  # nan
        return "–"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    if b != b:
        return "–"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c not in columns[:1] else "left")
    for row in rows:
        t.add_row(*[str(x) for x in row])
    console.print(t)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpus_visible": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min_at_start": round(load, 2),
    }


def emit(summary: dict[str, Any], out: Path | None, details: dict[str, Any]) -> None:
    """Save ``{"summary": ..., **details}`` to ``out`` (if given) and print the summary as the
    last stdout line."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, **details}, indent=1, default=float) + "\n")
        console.print(f"saved {out}")
    print(json.dumps(summary, default=float), flush=True)


def output_path(name: str, out: str | None, quick: bool) -> Path | None:
    """``--out`` if given; else ``benchmarks/results/<name>.json`` for full runs and nothing for
    ``--quick`` smoke runs (they must not overwrite the recorded results)."""
    if out:
        return Path(out)
    return None if quick else RESULTS / f"{name}.json"
