"""Server aggregation + SVD allocation at LLM scale, against the dense baseline (issue 6, item 1).

    .venv/bin/python benchmarks/bench_allocate.py            # full run: about 25 minutes on 2 cores
    .venv/bin/python benchmarks/bench_allocate.py --quick    # smoke run: seconds, nothing saved

Ours, two paths: ``aggregate(method, factors, weights)`` then ``allocate(B, A, ranks)`` with every
client's rank (one decomposition for all of them), for raflora and flexlora; and the one-pass
``aggregate_allocate(method, factors, weights, ranks)``, the same result without ever forming
the stacked global factors (m, Σr) and (Σr, n). Baseline, FlexLoRA's reference
recipe: form ΔW = Σ q B_blk A_blk as a dense m×n matrix (in place with ``addmm_``, kinder to it
than a temporary per client), take its full thin SVD (``torch.linalg.svd``: LAPACK gesdd from the
same MKL as ours), then give each client U_r S_r and V_rᵀ. For raflora the baseline forms
raflora's own update densely (rank partitions, weights renormalised per partition), so both
sides compute the same thing. Client k has B_k (m, r_k), A_k (r_k, n) with i.i.d. Gaussian
entries, ranks drawn (seeded) from {4, 8, 16, 32, 64} and data-size weights from U(1, 10).

Every grid cell runs in fresh worker processes (see ``_common``): peak memory = the rise of the
resident set during one call (inputs excluded, outputs included) in a worker whose allocator
returns every freed buffer to the OS; times in another worker with glibc's default allocator (as
a server runs), calls after a tiny warm-up. Ours and the baseline alternate (ours, dense, ours,
...) and medians are reported.
Also: the server's own per-round step in adapter mode (``aggregate`` + ``decompose``: the
stacked factors kept as the global update with their first r_max singular triplets and every
significant singular value, one R×R eigendecomposition) for a LLaMA-7B-shaped adapter, against
the steps it replaced (``compress``, the thin SVD of every significant direction, by the
Cholesky route and, before that, by Householder QR), so the cost of a real round is on record;
and the step in merge mode (FLoRA), whose diagnostics need the round's singular values alone,
against the full ``compress`` it used to run for them.
Relative difference: max over the clients' ranks r of ‖B_r A_r − D_r‖_F / ‖D_r‖_F, computed from
the factors by QR (never forming m×n), against the dense baseline where it ran, else against
``factored_svd`` in float64 (Householder QR route), as the "vs" column says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    console,
    emit,
    fmt_bytes,
    fmt_seconds,
    machine,
    measure_call,
    median,
    output_path,
    run_worker,
    table,
)
from raflora.math import aggregate, aggregate_allocate, allocate, factored_svd, lowrank
from raflora.math.round import compress, compressed_values, decompose, stack

RANK_SET = (4, 8, 16, 32, 64)
METHODS = ("raflora", "flexlora")
LLAMA_7B = {  # LLaMA-7B attention and MLP projections: (out, in) = (m, n)
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
DTYPES = {"float64": np.float64, "float32": np.float32}
GOAL = {"speedup": 300.0, "memory_ratio": 20.0, "float64": 1e-5, "float32": 1e-4, "llama": 30.0}

# (m, n, K, dtype, methods that also run the dense baseline, dense repeats). A dense 4096×4096
# float64 SVD takes minutes on 2 cores, so the big shapes run it where the goal is set.
FULL_GRID = [
    *[(1024, 1024, K, "float64", METHODS, 2) for K in (10, 20, 50)],
    (4096, 4096, 10, "float64", ("flexlora",), 1),
    (4096, 4096, 20, "float64", METHODS, 1),
    (4096, 4096, 20, "float32", METHODS, 1),
    (4096, 4096, 50, "float64", ("flexlora",), 1),
    (4096, 11008, 10, "float64", (), 0),
    (4096, 11008, 20, "float64", ("flexlora",), 1),
    (4096, 11008, 50, "float64", (), 0),
]
QUICK_GRID = [(128, 128, 4, "float64", METHODS, 1), (128, 96, 4, "float32", METHODS, 1)]


# --------------------------------------------------------------------------- problem


def clients(m: int, n: int, K: int, dtype: str, seed: int = 0):
    """K clients' factors (numpy), weights and ranks; ranks and weights depend on (seed, K) only."""
    rng = np.random.default_rng([seed, K])
    ranks = [int(r) for r in rng.choice(RANK_SET, size=K)]
    weights = [float(w) for w in rng.uniform(1, 10, size=K)]
    rng = np.random.default_rng([seed, K, m, n])
    factors = [
        (
            (rng.standard_normal((m, r)) / np.sqrt(m)).astype(DTYPES[dtype]),  # (m, r_k)
            (rng.standard_normal((r, n)) / np.sqrt(n)).astype(DTYPES[dtype]),  # (r_k, n)
        )
        for r in ranks
    ]
    return factors, weights, ranks


def dense_blocks(method: str, factors, weights, ranks) -> list[tuple[float, Any, Any]]:
    """The update Σ q B_blk A_blk each method defines, written out independently of raflora.math."""
    p = np.asarray(weights) / np.sum(weights)
    if method == "flexlora":
        return [(float(p[k]), B, A) for k, (B, A) in enumerate(factors)]
    blocks, lo = [], 0  # raflora: partition (lo, hi] averaged over the clients with r_k > lo
    for hi in sorted(set(ranks)):
        members = [k for k, r in enumerate(ranks) if r > lo]
        total = sum(p[k] for k in members)
        for k in members:
            blocks.append((float(p[k] / total), factors[k][0][:, lo:hi], factors[k][1][lo:hi]))
        lo = hi
    return blocks


def warm_up(fn, method: str, dtype: str) -> None:
    """One tiny call: library start-up (thread pools, LAPACK) stays out of the timings."""
    factors, weights, _ = clients(96, 80, 4, dtype, seed=99)
    fn(method, [(B[:, :8], A[:8]) for B, A in factors], weights, [8] * 4)


def ours(method: str, factors, weights, ranks):
    B, A = aggregate(method, factors, weights)
    return allocate(B, A, ranks)


def one_pass(method: str, factors, weights, ranks):
    return aggregate_allocate(method, factors, weights, ranks)


SIDES = {"ours": ours, "one_pass": one_pass}  # our two paths, each timed against the baseline


def dense(method: str, factors, weights, ranks):
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    W = torch.zeros(m, n, dtype=torch.from_numpy(factors[0][0]).dtype)  # ΔW (m, n)
    for q, Bb, Ab in dense_blocks(method, factors, weights, ranks):
        W.addmm_(torch.from_numpy(Bb), torch.from_numpy(Ab), alpha=q)
    U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
    return [((U[:, :r] * S[:r]).numpy(), Vt[:r].numpy()) for r in ranks]


def top_pair(pairs, ranks) -> tuple[np.ndarray, np.ndarray]:
    """The largest rank's factors; every smaller rank's are their leading slices."""
    B, A = pairs[int(np.argmax(ranks))]
    return np.array(B, np.float64), np.array(A, np.float64)


def reference(method: str, m: int, n: int, K: int, seed: int = 0):
    """Top factors of the method's update from ``factored_svd`` in float64 (Householder QR)."""
    factors, weights, ranks = clients(m, n, K, "float64", seed)
    U, S, Vt = factored_svd(*aggregate(method, factors, weights))
    r = max(ranks)
    return U[:, :r] * S[:r], Vt[:r], ranks


def rel_diff(B1, A1, B2, A2) -> float:
    """‖B1 A1 − B2 A2‖_F / ‖B2 A2‖_F from QR factors of the stacked pairs (float64)."""
    t = [torch.from_numpy(np.asarray(x, np.float64)) for x in (B1, A1, B2, A2)]
    R_B = torch.linalg.qr(torch.cat([t[0], -t[2]], 1), mode="r")[1]
    R_A = torch.linalg.qr(torch.cat([t[1], t[3]], 0).mT, mode="r")[1]
    R_B2 = torch.linalg.qr(t[2], mode="r")[1]
    R_A2 = torch.linalg.qr(t[3].mT, mode="r")[1]
    return float(torch.linalg.norm(R_B @ R_A.mT) / torch.linalg.norm(R_B2 @ R_A2.mT))


def max_rel_diff(top, ref, ranks) -> float:
    return max(
        rel_diff(top[0][:, :r], top[1][:r], ref[0][:, :r], ref[1][:r]) for r in sorted(set(ranks))
    )


class RouteCounter:
    """Counts the routes ``allocate`` took inside the block: Householder QR fallbacks (calls of
    ``lowrank._svd`` on factors with R < min(m, n)) and dense products (``lowrank._dense_svd``,
    R ≥ min(m, n)); any other call took the Cholesky QR route."""

    def __init__(self) -> None:
        self.fallbacks, self.dense = 0, 0
        self._svd, self._dense_svd = lowrank._svd, lowrank._dense_svd

    def __enter__(self) -> RouteCounter:
        def householder(B, A, *args, **kwargs):
            self.fallbacks += not lowrank._is_wide(B, A)
            return self._svd(B, A, *args, **kwargs)

        def dense_product(*args, **kwargs):
            self.dense += 1
            return self._dense_svd(*args, **kwargs)

        lowrank._svd, lowrank._dense_svd = householder, dense_product
        return self

    def __exit__(self, *exc) -> None:
        lowrank._svd, lowrank._dense_svd = self._svd, self._dense_svd

    @property
    def route(self) -> str:
        if self.dense:
            return "dense product"
        return "Householder QR (fallback)" if self.fallbacks else "Cholesky QR"


# --------------------------------------------------------------------------- workers


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell for one side: warm up, time + peak memory of one call, then more timed calls."""
    torch.set_num_threads(spec["threads"])
    fn = SIDES.get(spec["kind"], dense)
    warm_up(fn, spec["method"], spec["dtype"])
    factors, weights, ranks = clients(spec["m"], spec["n"], spec["K"], spec["dtype"])
    with RouteCounter() as routes:
        pairs, first, peak = measure_call(lambda: fn(spec["method"], factors, weights, ranks))
    top = top_pair(pairs, ranks)
    del pairs
    times = [first]
    for _ in range(spec["repeats"] - 1):
        start = time.perf_counter()
        fn(spec["method"], factors, weights, ranks)
        times.append(time.perf_counter() - start)
    if spec.get("save"):
        np.savez(spec["save"], B=top[0], A=top[1])
    return {"seconds": times, "peak_bytes": peak, "fallbacks": routes.fallbacks,
            "route": routes.route, "top": top}  # fmt: skip


def run_side(spec: dict[str, Any], isolated: bool, tmp: Path) -> dict[str, Any]:
    """One side of a cell. Isolated: peak memory (and the factors) from one call in a worker
    with `WORKER_ENV`, times from another worker with glibc's default allocator (what a server
    runs with: a buffer freed by one round is reused by the next instead of being faulted in
    again, which the pinned mmap threshold would charge every call)."""
    if not isolated:
        return measure(spec)
    saved = {**spec, "repeats": 1, "save": str(tmp / f"{spec['kind']}-{spec['method']}.npz")}
    result = run_worker(Path(__file__), saved, memory=True)
    with np.load(saved["save"]) as data:
        result["top"] = (data["B"], data["A"])
    timing = run_worker(Path(__file__), spec, memory=False)
    result["first_seconds"], result["seconds"] = result["seconds"][0], timing["seconds"]
    return result


def worker_main(spec_json: str) -> None:
    result = measure(json.loads(spec_json))
    result.pop("top")
    print(json.dumps(result))


# --------------------------------------------------------------------------- sections


def grid_cell(cell, threads: int, ours_repeats: int, isolated: bool) -> list[dict[str, Any]]:
    m, n, K, dtype, dense_methods, dense_repeats = cell
    base = {"m": m, "n": n, "K": K, "dtype": dtype, "threads": threads}
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # ours, dense, ours, dense, ..., ours: each side sees the same background load.
        for rep in range(dense_repeats + 1):
            for method in METHODS:
                for kind in SIDES:
                    spec = {**base, "kind": kind, "method": method, "repeats": ours_repeats}
                    runs.setdefault((kind, method), []).append(run_side(spec, isolated, Path(tmp)))
            if rep == dense_repeats:
                break
            for method in dense_methods:
                spec = {**base, "kind": "dense", "method": method, "repeats": 1}
                runs.setdefault(("dense", method), []).append(run_side(spec, isolated, Path(tmp)))
    rows = []
    for method in METHODS:
        mine, theirs = runs[("ours", method)], runs.get(("dense", method), [])
        _, _, ranks = clients(m, n, K, dtype)
        if theirs:
            ref, versus = theirs[0]["top"], f"dense {dtype}"
        else:
            B_ref, A_ref, _ = reference(method, m, n, K)
            ref, versus = (B_ref, A_ref), "QR float64"
        row = {
            "m": m, "n": n, "K": K, "dtype": dtype, "method": method, "sum_rank": sum(ranks),
            "ours_seconds": median([t for r in mine for t in r["seconds"]]),
            "ours_peak_bytes": median([r["peak_bytes"] for r in mine]),
            "ours_fallbacks": max(r["fallbacks"] for r in mine),
            "ours_route": mine[0].get("route", "–"),
            "dense_seconds": median([t for r in theirs for t in r["seconds"]]),
            "dense_peak_bytes": median([r["peak_bytes"] for r in theirs]),
            "dense_runs": len(theirs),
            "rel_diff": max_rel_diff(mine[0]["top"], ref, ranks),
            "rel_diff_vs": versus,
        }  # fmt: skip
        if theirs and dtype == "float32":  # also: how far float32 dense itself is from float64
            B64, A64, _ = reference(method, m, n, K)
            row["dense_rel_diff_vs_float64"] = max_rel_diff(theirs[0]["top"], (B64, A64), ranks)
            row["ours_rel_diff_vs_float64"] = max_rel_diff(mine[0]["top"], (B64, A64), ranks)
        once = runs[("one_pass", method)]
        row |= {
            "one_pass_seconds": median([t for r in once for t in r["seconds"]]),
            "one_pass_peak_bytes": median([r["peak_bytes"] for r in once]),
            "one_pass_route": once[0].get("route", "–"),
            "one_pass_rel_diff": max_rel_diff(once[0]["top"], ref, ranks),
        }
        row["speedup"] = row["dense_seconds"] / row["ours_seconds"]
        row["memory_ratio"] = row["dense_peak_bytes"] / max(row["ours_peak_bytes"], 1)
        row["one_pass_speedup"] = row["dense_seconds"] / row["one_pass_seconds"]
        row["one_pass_memory_ratio"] = row["dense_peak_bytes"] / max(row["one_pass_peak_bytes"], 1)
        rows.append(row)
        console.print(
            f"  {m}×{n} K={K} {dtype} {method}: ours {fmt_seconds(row['ours_seconds'])} "
            f"{fmt_bytes(row['ours_peak_bytes'])}, dense {fmt_seconds(row['dense_seconds'])} "
            f"{fmt_bytes(row['dense_peak_bytes'])}, rel diff {row['rel_diff']:.1e}; one pass "
            f"{fmt_seconds(row['one_pass_seconds'])} {fmt_bytes(row['one_pass_peak_bytes'])}"
        )
    return rows


def robustness(threads: int, quick: bool) -> list[dict[str, Any]]:
    """Which route allocate takes, and its accuracy, on harder inputs than i.i.d. factors."""
    torch.set_num_threads(threads)
    size, K = (128, 4) if quick else (2048, 20)
    cases = []
    for label, delta in [("independent clients", None), ("shared start, δ = 1e-2", 1e-2),
                         ("shared start, δ = 1e-4", 1e-4)]:  # fmt: skip
        factors, weights, ranks = clients(size, size, K, "float64")
        if delta is not None:  # every client = the same global allocation + a small local change
            B0, A0 = factors[int(np.argmax(ranks))]
            factors = [
                (B0[:, :r] + delta * B, A0[:r] + delta * A)
                for (B, A), r in zip(factors, ranks, strict=True)
            ]
        cases.append((label, size, factors, weights, ranks))
    small = max(64, size // 4)
    factors, weights, ranks = clients(small, small, 3 * K, "float64")
    cases.append(("Σ r_k > m", small, factors, weights, ranks))
    rows = []
    for label, size_, factors, weights, ranks in cases:
        B64, A64 = aggregate("raflora", factors, weights)
        U, S, Vt = factored_svd(B64, A64)
        r = max(ranks)
        ref = (U[:, :r] * S[:r], Vt[:r])
        for dtype in DTYPES:
            cast = [(B.astype(dtype), A.astype(dtype)) for B, A in factors]
            warm_up(ours, "raflora", dtype)
            with RouteCounter() as routes:
                start = time.perf_counter()
                pairs = ours("raflora", cast, weights, ranks)
                seconds = time.perf_counter() - start
            with RouteCounter() as once:
                start = time.perf_counter()
                single = one_pass("raflora", cast, weights, ranks)
                once_seconds = time.perf_counter() - start
            rows.append({
                "case": label, "m": size_, "sum_rank": sum(ranks), "dtype": dtype,
                "route": routes.route,
                "seconds": seconds, "rel_diff_vs_QR_float64": max_rel_diff(
                    top_pair(pairs, ranks), ref, ranks),
                "one_pass_route": once.route, "one_pass_seconds": once_seconds,
                "one_pass_rel_diff_vs_QR_float64": max_rel_diff(
                    top_pair(single, ranks), ref, ranks),
            })  # fmt: skip
    return rows


def llama(threads: int, quick: bool, layers: int, device: str = "cpu") -> dict[str, Any]:
    """A LLaMA-7B-shaped adapter (7 projections × layers), K = 20, float32 factors (what clients
    send). One layer's client factors are generated and reused for every layer: each module's
    inputs (tens of MB) are far larger than the CPU caches, so reuse does not flatter the timing.
    ``device="cuda"``: the factors are torch tensors on the GPU (timed with synchronisation)."""
    torch.set_num_threads(threads)
    shrink = 32 if quick else 1
    K = 20
    per_module: dict[str, dict[str, list[float]]] = {}
    data = {}
    for name, (m, n) in LLAMA_7B.items():
        factors, weights, ranks = clients(m // shrink, n // shrink, K, "float32", seed=11)
        if device != "cpu":
            factors = [(torch.from_numpy(B).to(device), torch.from_numpy(A).to(device))
                       for B, A in factors]  # fmt: skip
        data[name] = (factors, weights, ranks)
    for method in METHODS:  # warm-up (on the device: kernels, cuSOLVER handles)
        ours(method, *data["q_proj"])
        one_pass(method, *data["q_proj"])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    totals = dict.fromkeys(METHODS, 0.0)
    one_pass_totals = dict.fromkeys(METHODS, 0.0)
    with RouteCounter() as routes:
        for _ in range(layers):
            for name, (factors, weights, ranks) in data.items():
                for method in METHODS:
                    for fn, sums in ((ours, totals), (one_pass, one_pass_totals)):
                        sync()
                        start = time.perf_counter()
                        fn(method, factors, weights, ranks)
                        sync()
                        seconds = time.perf_counter() - start
                        sums[method] += seconds
                        if fn is ours:
                            per_module.setdefault(name, {}).setdefault(method, []).append(seconds)
    ranks = data["q_proj"][2]
    return {
        "layers": layers, "K": K, "sum_rank": sum(ranks), "dtype": "float32", "device": device,
        "seconds": totals, "one_pass_seconds": one_pass_totals, "fallbacks": routes.fallbacks,
        "module_median_seconds": {
            name: {method: median(v) for method, v in d.items()} for name, d in per_module.items()
        },
    }  # fmt: skip


def median_seconds(fn, args: tuple, repeats: int) -> float:
    """Median wall time of ``repeats`` calls ``fn(*args)`` after one untimed warm-up call (which
    also pages in the inputs)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return median(times)


def server_module_step(method: str, factors, weights):
    """One module of ``aggregate_round`` in adapter mode: aggregate, then ``decompose`` (the
    stacked factors with their first r_max = 64 triplets and every significant value)."""
    return decompose(*aggregate(method, factors, weights), top=max(RANK_SET))


def server_module_step_compress(method: str, factors, weights):
    """The server's previous step: aggregate, then ``compress`` (the thin SVD of every
    significant direction, by ``significant_svd``'s Cholesky route)."""
    return compress(*aggregate(method, factors, weights))


def server_step_diff(method: str, factors, weights) -> float:
    """How far the current step's state is from the previous one's: the larger of the max
    relative difference of the significant values and of the rank-r_max products (dense)."""
    new = server_module_step(method, factors, weights)
    old = server_module_step_compress(method, factors, weights)
    values = np.abs(new.S.astype(np.float64) - old.S).max() / old.S[0]
    top = max(RANK_SET)
    products = [np.asarray(x, np.float64) for x in (*new.factors(top), *old.factors(top))]
    ref = products[2] @ products[3]
    return float(max(values, np.abs(products[0] @ products[1] - ref).max() / np.abs(ref).max()))


def server_module_step_householder(method: str, factors, weights):
    """The same with the server's previous ``compress``: Householder-QR ``factored_svd`` of
    every direction in float64, then the same threshold and float32 cast (the baseline)."""
    B, A = aggregate(method, factors, weights)
    U, S, Vt = factored_svd(B.astype(np.float64), A.astype(np.float64))
    keep = int(np.sum(max(B.shape[0], A.shape[1]) * np.finfo(np.float32).eps * S[0] < S))
    return U[:, :keep].astype(np.float32), S[:keep].astype(np.float32), Vt[:keep].astype(np.float32)


def server_step(threads: int, quick: bool, repeats: int = 3) -> dict[str, Any]:
    """What the Flower server itself runs per module and round (``aggregate_round``, adapter
    mode): ``aggregate`` the clients' float32 factors, then ``decompose`` (float64, kept in
    float32): the stacked factors (evaluation, export), their first 64 triplets (payloads, the
    carried tail) and every significant singular value (diagnostics); beside it the steps it
    replaced, ``compress`` (thin SVD of every significant direction, Cholesky route) and the
    Householder-QR ``compress`` before it. One LLaMA-7B layer (7 modules), K = 20, medians of
    ``repeats`` calls after a warm-up; the whole adapter is 32 × that layer."""
    torch.set_num_threads(threads)
    shrink = 32 if quick else 1
    out: dict[str, Any] = {"K": 20, "layers": 32, "modules": {}, "max_diff": 0.0}
    for name, (m, n) in LLAMA_7B.items():
        factors, weights, _ = clients(m // shrink, n // shrink, 20, "float32", seed=11)
        out["modules"][name] = {
            f"{method}{suffix}": median_seconds(step, (method, factors, weights), repeats)
            for method in METHODS
            for suffix, step in SERVER_STEPS
        }
        for method in METHODS:
            diff = server_step_diff(method, factors, weights)
            out["max_diff"] = max(out["max_diff"], diff)
    for method in METHODS:
        for suffix, _ in SERVER_STEPS:
            out[f"{method}{suffix}_adapter_seconds"] = 32 * sum(
                r[method + suffix] for r in out["modules"].values()
            )
        current = out[f"{method}_adapter_seconds"]
        out[f"{method}_speedup"] = out[f"{method}_compress_adapter_seconds"] / current
        out[f"{method}_speedup_householder"] = (
            out[f"{method}_householder_adapter_seconds"] / current
        )
    return out


SERVER_STEPS = (
    ("", server_module_step),
    ("_compress", server_module_step_compress),
    ("_householder", server_module_step_householder),
)


def merge_module_step(previous, factors, weights):
    """One module of ``aggregate_round`` in merge mode (FLoRA) after the first round: the
    round's singular values alone (``compressed_values``, for the diagnostics), then the
    ``compress`` of D_t = D_{t-1} + ΔW_t, the merged update the server keeps."""
    agg = aggregate("flora", factors, weights)
    return compressed_values(*agg), compress(*stack(previous.factors(), agg))


def merge_module_step_two_svds(previous, factors, weights):
    """The same with the previous diagnostics: a full ``compress`` of ΔW_t for its S (baseline)."""
    agg = aggregate("flora", factors, weights)
    return compress(*agg).S, compress(*stack(previous.factors(), agg))


def merge_step(threads: int, quick: bool, repeats: int) -> dict[str, Any]:
    """The server's step in merge mode (FLoRA), second round (D_1 from other clients of the
    same ranks, so D_1 + ΔW_2 has rank 2 Σr): one LLaMA-7B layer, K = 20, medians of
    ``repeats`` calls after a warm-up; checks that both give the same values and update."""
    torch.set_num_threads(threads)
    shrink = 32 if quick else 1
    out: dict[str, Any] = {"K": 20, "layers": 32, "modules": {}, "max_value_diff": 0.0}
    steps = {"flora_merge": merge_module_step, "flora_merge_two_svds": merge_module_step_two_svds}
    for name, (m, n) in LLAMA_7B.items():
        first, w1, _ = clients(m // shrink, n // shrink, 20, "float32", seed=12)
        factors, weights, _ = clients(m // shrink, n // shrink, 20, "float32", seed=11)
        previous = compress(*aggregate("flora", first, w1))
        args = (previous, factors, weights)
        out["modules"][name] = {
            label: median_seconds(step, args, repeats) for label, step in steps.items()
        }
        (new_S, new), (old_S, old) = merge_module_step(*args), merge_module_step_two_svds(*args)
        assert new_S.shape == old_S.shape and np.array_equal(new.S, old.S)
        diff = float(np.abs(new_S - old_S).max() / old_S[0])
        out["max_value_diff"] = max(out["max_value_diff"], diff)
    for label in steps:
        out[f"{label}_adapter_seconds"] = 32 * sum(r[label] for r in out["modules"].values())
    two_svds = out["flora_merge_two_svds_adapter_seconds"]
    out["speedup"] = two_svds / out["flora_merge_adapter_seconds"]
    return out


def slope(xs, ts) -> float:
    """Exponent p of t ∝ x^p (least squares in log-log)."""
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def scaling(threads: int, quick: bool) -> dict[str, Any]:
    """Ours (raflora, float32) against K, Σ r_k and m + n; one factor varied at a time."""
    torch.set_num_threads(threads)
    size = 128 if quick else 4096
    repeats = 1 if quick else 3
    series: dict[str, list[dict[str, Any]]] = {"K": [], "sum_rank": [], "m_plus_n": []}

    def timed(factors, weights, ranks) -> float:
        return median_seconds(ours, ("raflora", factors, weights, ranks), repeats)

    for K in (4, 8) if quick else (5, 10, 20, 40, 80):
        factors, weights, ranks = clients(size, size, K, "float32")
        seconds = timed(factors, weights, ranks)
        series["K"].append({"x": K, "sum_rank": sum(ranks), "seconds": seconds})
    rng = np.random.default_rng(5)
    for r in (4, 8) if quick else (4, 8, 16, 32, 64):  # K = 20 clients, all of rank r
        m = n = size
        factors = [
            (rng.standard_normal((m, r), np.float32), rng.standard_normal((r, n), np.float32))
            for _ in range(20)
        ]
        seconds = timed(factors, [1.0] * 20, [r] * 20)
        series["sum_rank"].append({"x": 20 * r, "sum_rank": 20 * r, "seconds": seconds})
    for size_ in (96, 128) if quick else (1024, 2048, 4096, 8192, 16384):
        factors, weights, ranks = clients(size_, size_, 20, "float32")
        seconds = timed(factors, weights, ranks)
        series["m_plus_n"].append({"x": 2 * size_, "sum_rank": sum(ranks), "seconds": seconds})
    return {
        key: {"points": pts, "slope": slope([p["x"] for p in pts], [p["seconds"] for p in pts])}
        for key, pts in series.items()
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, in-process, seconds")
    parser.add_argument("--threads", type=int, help="torch threads (default: all; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of ours per worker")
    parser.add_argument("--layers", type=int, default=32, help="LLaMA layers")
    parser.add_argument("--sections", default="grid,robustness,llama,server,merge,scaling")
    parser.add_argument(
        "--cells",
        choices=["all", "goal"],
        default="all",
        help="goal: only the 4096×4096, K = 20 cells of the grid",
    )
    parser.add_argument("--llama-device", default="cpu", help="cpu, or cuda for an extra row")
    parser.add_argument("--cpus", help="pin this process and its workers to these CPUs: 0,1")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_allocate.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.cpus:
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
    sections = args.sections.split(",")
    args.threads = args.threads or (1 if args.quick else torch.get_num_threads())
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.cells == "goal" and not args.quick:
        grid = [c for c in grid if c[:3] == (4096, 4096, 20)]
    info = machine() | {"threads": args.threads, "quick": args.quick}
    console.print(f"bench_allocate on {info}")
    details: dict[str, Any] = {"machine": info, "goals": GOAL}
    summary: dict[str, Any] = {"quick": args.quick}
    started = time.perf_counter()

    if "grid" in sections:
        rows = []
        for cell in grid:
            rows += grid_cell(cell, args.threads, 2 if args.quick else args.repeats, not args.quick)
        details["grid"] = rows
        table(
            "aggregate + allocate (ours) vs dense ΔW + full SVD (baseline); medians",
            ["m×n", "K", "Σr", "dtype", "method", "ours", "dense", "speed-up", "ours peak",
             "dense peak", "mem ratio", "rel diff", "vs", "route"],
            [[f"{r['m']}×{r['n']}", r["K"], r["sum_rank"], r["dtype"], r["method"],
              fmt_seconds(r["ours_seconds"]), fmt_seconds(r["dense_seconds"]),
              f"{r['speedup']:.0f}×" if r["dense_runs"] else "–", fmt_bytes(r["ours_peak_bytes"]),
              fmt_bytes(r["dense_peak_bytes"]),
              f"{r['memory_ratio']:.1f}×" if r["dense_runs"] else "–", f"{r['rel_diff']:.1e}",
              r["rel_diff_vs"], r["ours_route"]] for r in rows],
        )  # fmt: skip
        table(
            "aggregate_allocate (one pass, no stack) vs the same dense baseline; medians",
            ["m×n", "K", "Σr", "dtype", "method", "one pass", "speed-up", "peak", "mem ratio",
             "rel diff", "route"],
            [[f"{r['m']}×{r['n']}", r["K"], r["sum_rank"], r["dtype"], r["method"],
              fmt_seconds(r["one_pass_seconds"]),
              f"{r['one_pass_speedup']:.0f}×" if r["dense_runs"] else "–",
              fmt_bytes(r["one_pass_peak_bytes"]),
              f"{r['one_pass_memory_ratio']:.1f}×" if r["dense_runs"] else "–",
              f"{r['one_pass_rel_diff']:.1e}", r["one_pass_route"]] for r in rows],
        )  # fmt: skip
        # The goal cell (4096², K = 20); a --quick run reports its own small cells instead.
        goal = {d: (4096, 4096, 20) for d in DTYPES}
        if args.quick:
            goal = {d: next(c[:3] for c in grid if c[3] == d) for d in DTYPES}
        f64, f32 = (
            [r for r in rows if r["dtype"] == d and r["dense_runs"]
             and (r["m"], r["n"], r["K"]) == goal[d]]
            for d in DTYPES
        )  # fmt: skip
        summary |= {
            "goal_cell": "{}x{} K={}".format(*goal["float64"]),
            "speedup_4096_K20": min(r["speedup"] for r in f64),
            "memory_ratio_4096_K20": min(r["memory_ratio"] for r in f64),
            "rel_diff_4096_K20_float64": max(r["rel_diff"] for r in f64),
            "rel_diff_4096_K20_float32": max(r["rel_diff"] for r in f32),
            "speedup_4096_K20_float32": min(r["speedup"] for r in f32),
            "memory_ratio_4096_K20_float32": min(r["memory_ratio"] for r in f32),
            "speedup_4096_K20_one_pass": min(r["one_pass_speedup"] for r in f64),
            "memory_ratio_4096_K20_one_pass": min(r["one_pass_memory_ratio"] for r in f64),
            "speedup_4096_K20_float32_one_pass": min(r["one_pass_speedup"] for r in f32),
            "memory_ratio_4096_K20_float32_one_pass": min(r["one_pass_memory_ratio"] for r in f32),
            "max_rel_diff_float64": max(
                max(r["rel_diff"], r["one_pass_rel_diff"]) for r in rows if r["dtype"] == "float64"
            ),
            "max_rel_diff_float32": max(
                max(r["rel_diff"], r["one_pass_rel_diff"]) for r in rows if r["dtype"] == "float32"
            ),
        }
        summary["correct"] = bool(
            summary["max_rel_diff_float64"] <= GOAL["float64"]
            and summary["max_rel_diff_float32"] <= GOAL["float32"]
        )
    if "robustness" in sections:
        rows = robustness(args.threads, args.quick)
        details["robustness"] = rows
        table(
            "allocate's route and accuracy on harder inputs (raflora, K clients)",
            ["case", "m=n", "Σr", "dtype", "route", "time", "rel diff vs QR float64",
             "one pass: route", "time", "rel diff"],
            [[r["case"], r["m"], r["sum_rank"], r["dtype"], r["route"], fmt_seconds(r["seconds"]),
              f"{r['rel_diff_vs_QR_float64']:.1e}", r["one_pass_route"],
              fmt_seconds(r["one_pass_seconds"]), f"{r['one_pass_rel_diff_vs_QR_float64']:.1e}"]
             for r in rows],
        )  # fmt: skip
        summary["robust_correct"] = all(
            max(r["rel_diff_vs_QR_float64"], r["one_pass_rel_diff_vs_QR_float64"])
            <= GOAL[r["dtype"]]
            for r in rows
        )
    if "llama" in sections:
        result = llama(args.threads, args.quick, 1 if args.quick else args.layers)
        if args.llama_device != "cpu":
            try:
                gpu = llama(args.threads, args.quick, result["layers"], args.llama_device)
                result["gpu"] = gpu | {"name": torch.cuda.get_device_name()}
            except Exception as error:  # an extra: keep the CPU results
                result["gpu_error"] = repr(error)
        details["llama7b"] = result
        table(
            f"LLaMA-7B-shaped adapter: {result['layers']} layers × 7 modules, K = 20 "
            f"(Σr = {result['sum_rank']}), float32, ours only",
            ["module", *[f"{m} (median/module)" for m in METHODS]],
            [[name, *[fmt_seconds(v[m]) for m in METHODS]]
             for name, v in result["module_median_seconds"].items()]
            + [["whole adapter", *[fmt_seconds(result["seconds"][m]) for m in METHODS]]]
            + [["whole adapter, one pass",
                *[fmt_seconds(result["one_pass_seconds"][m]) for m in METHODS]]]
            + [[f"whole adapter on {g['name']}", *[fmt_seconds(g["seconds"][m]) for m in METHODS]]
               for g in ([result["gpu"]] if "gpu" in result else [])],
        )  # fmt: skip
        summary["llama7b_seconds"] = result["seconds"]["raflora"]
        summary["llama7b_seconds_flexlora"] = result["seconds"]["flexlora"]
        summary["llama7b_seconds_one_pass"] = result["one_pass_seconds"]["raflora"]
        if "gpu" in result:
            summary["llama7b_seconds_gpu"] = result["gpu"]["seconds"]["raflora"]
    if "server" in sections:
        result = server_step(args.threads, args.quick, 1 if args.quick else 3)
        details["server_step"] = result
        columns = [f"{m}{s}" for m in METHODS for s, _ in SERVER_STEPS]
        table(
            "the server's own step per round: aggregate + decompose (stacked factors, top 64 "
            "triplets, all significant values; float64) vs the previous compress (thin SVD of "
            "every significant direction) and the Householder-QR compress before it, K = 20 "
            f"(whole adapter = 32 × one layer); max relative difference {result['max_diff']:.1e}",
            ["module", *[c.replace("_householder", " (Householder)").replace("_compress",
                                                                            " (compress)")
                         for c in columns]],
            [[name, *[fmt_seconds(row[c]) for c in columns]]
             for name, row in result["modules"].items()]
            + [["whole adapter",
                *[fmt_seconds(result[f"{c}_adapter_seconds"]) for c in columns]]],
        )  # fmt: skip
        summary["server_step_adapter_seconds"] = result["raflora_adapter_seconds"]
        summary["server_step_speedup"] = result["raflora_speedup"]
        summary["server_step_speedup_householder"] = result["raflora_speedup_householder"]
        summary["server_step_max_diff"] = result["max_diff"]
    if "merge" in sections:
        merge = merge_step(args.threads, args.quick, 1 if args.quick else 3)
        details["server_merge_step"] = merge
        labels = ["flora_merge", "flora_merge_two_svds"]
        table(
            "merge mode (FLoRA), second round: the round's singular values alone + compress of "
            "D_1 + ΔW_2, vs a full compress of ΔW_2 for its singular values (the previous step); "
            f"max difference in the values {merge['max_value_diff']:.1e} · σ_1",
            ["module", "flora (values only)", "flora (two SVDs)"],
            [[name, *[fmt_seconds(row[c]) for c in labels]]
             for name, row in merge["modules"].items()]
            + [["whole adapter", *[fmt_seconds(merge[f"{c}_adapter_seconds"]) for c in labels]]],
        )  # fmt: skip
        summary["server_merge_step_adapter_seconds"] = merge["flora_merge_adapter_seconds"]
        summary["server_merge_step_speedup"] = merge["speedup"]
        summary["server_merge_value_diff"] = merge["max_value_diff"]
    if "scaling" in sections:
        result = scaling(args.threads, args.quick)
        details["scaling"] = result
        for key, label in [("K", "K"), ("sum_rank", "Σ r_k (K = 20)"), ("m_plus_n", "m + n")]:
            pts = result[key]
            table(
                f"ours (raflora, float32) vs {label}: fitted exponent {pts['slope']:.2f}",
                [label, "Σr", "time", "time / x"],
                [[p["x"], p["sum_rank"], fmt_seconds(p["seconds"]),
                  f"{p['seconds'] / p['x'] * 1e6:.1f} µs"] for p in pts["points"]],
            )  # fmt: skip
        summary |= {f"slope_vs_{key}": result[key]["slope"] for key in result}
    summary["wall_seconds"] = time.perf_counter() - started
    emit(summary, output_path("bench_allocate", args.out, args.quick), details)


if __name__ == "__main__":
    main()
