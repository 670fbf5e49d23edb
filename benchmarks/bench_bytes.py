"""Bytes on the wire per round for every registered method, measured, against each paper's formula.

    .venv/bin/python benchmarks/bench_bytes.py            # the demo config: ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_bytes.py --quick    # the tiny config, nothing saved

Each method runs 2 rounds of examples/demo.toml (MiniLM, 8 clients of ranks 2, 4, 8, 16; FedIT,
which needs one rank, with every client at rank 8) in this process: the real server loop, strategy
and ClientApp handlers over `raflora.experiments.inprocess.InProcessGrid` (every message through
Flower's protobuf serialisation), with ``train.local_steps = 1``, a small test set and no client
evaluation, since only the train messages are counted. Bytes are the strategy's own counts
(``bytes_sent``, ``bytes_received`` in metrics.json): Flower's `ArrayRecord.count_bytes` of every
train message's arrays, i.e. per array its float32 data, its npy header and its key's length.

Formula, per round t and module (m, n), over the K sampled clients with allocated ranks r_k and
replied ranks r'_k (r'_k = r_k except after HetLoRA's self-pruning): up Σ_k r'_k (m + n) floats;
down nothing in round 1 (no global update yet), then Σ_k r_k (m + n) (the rank-r_k truncation or
slices of the kept update; FedIT's (B̄, Ā)), or for FLoRA K copies of the previous round's stack,
K Σ_k r'_k (m + n); FedEx-LoRA adds to each client's slices the previous round's residual,
factored, (Σ_k r'_k + r'_max)(m + n), or with ``residual_wire = "dense"`` (a variant measured
as well, under ``variants``) m n; plus the dense head (classifier) both ways, every round.
Bytes = 4 per float + the framing of each array (npy header + key). ``formula_*`` are computed
here from the run's module shapes and ranks (read back from its checkpoints), not from raflora's
byte counting.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, console, emit, machine, output_path, table
from raflora.config import Config, load_config
from raflora.federation import messages as msg
from raflora.federation import task
from raflora.federation.checkpoint import load_checkpoint
from raflora.math import available_methods

# What the paper's server sends a client each round after the first: "rank", the client's own
# rank's worth of factors (truncation, slices or FedIT's averaged factors); "stack", the
# previous round's stacked factors Σ_k r_k columns (FLoRA).
DOWNLINK = {
    "fedit": "rank",
    "zeropad": "rank",
    "zeropad_svd": "rank",
    "hetlora": "rank",
    "hetlora_svd": "rank",
    "rblora": "rank",
    "rblora_svd": "rank",
    "flexlora": "rank",
    "flexlora_nm": "rank",
    "flora": "stack",
    "raflora": "rank",
    "fedex": "rank+residual",  # slices of the averaged factors + the round's factored residual
    "ffa_lora": "b_only",  # B alone, both ways (A is the shared seeded one)
    "florist": "merged",  # the round's thresholded factors, of a rank the threshold decides
}
EQUAL_RANK = 8  # FedIT's one rank on the demo config (the others: 2, 4, 8, 16)
DEMO = ROOT / "examples" / "demo.toml"
TINY = ROOT / "examples" / "tiny.toml"
FAST = ["train.local_steps=1", "federation.evaluate_clients=false", "federation.rounds=2"]
# method options measured besides each method's defaults: (method, overrides)
VARIANTS = [("fedex", ("federation.options.residual_wire=dense",))]


def demo_config(method: str, base: Path = DEMO, *overrides: str) -> Config:
    """``base`` for ``method``, 2 rounds, 1 local step, a small test set."""
    ranks = [f"clients.ranks=[{EQUAL_RANK}]"] if method == "fedit" else []
    extra = ["data.test_size=32"] if base == DEMO else []
    return load_config(
        base, [f"federation.method={method}", f"run.name=bytes-{method}", *FAST, *extra, *ranks,
               *overrides]
    )  # fmt: skip


def array_bytes(key: str, shape: tuple[int, ...]) -> int:
    """What `count_bytes` counts for one float32 array: 4 per float + its npy header + key."""
    header = len(Array(np.zeros((0,) * len(shape), np.float32)).data)  # npy v1: 128 bytes
    return 4 * math.prod(shape) + header + len(key)


def factor_bytes(
    shapes: dict[str, tuple[int, int]], rank: int | dict[str, int], b: str, a: str
) -> int:
    """One client's factors of one rank (or a rank per module) for every module, keys
    ``<module><b>``/``<module><a>``."""
    ranks = rank if isinstance(rank, dict) else dict.fromkeys(shapes, rank)
    return sum(
        array_bytes(name + b, (m, ranks[name])) + array_bytes(name + a, (ranks[name], n))
        for name, (m, n) in shapes.items()
    )


def b_bytes(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """One client's B factors alone (a frozen-A method's message)."""
    return sum(array_bytes(name + msg.LORA_B, (m, rank)) for name, (m, _) in shapes.items())


def formula(
    method: str,
    shapes: dict[str, tuple[int, int]],
    dense: dict[str, tuple[int, ...]],
    sent_ranks: list[dict[int, int]],
    replied_ranks: list[dict[int, int]],
    merged_ranks: list[dict[str, int]] | None = None,
    dense_residual: bool = False,
) -> list[dict[str, int]]:
    """Per round t: the bytes the paper's protocol sends down and up (see the docstring), for the
    clients sampled in t with ``sent_ranks[t]`` allocated and ``replied_ranks[t]`` replied;
    ``merged_ranks[t]``: per module, the rank of what round t merged (FLoRIST's threshold
    decides it); ``dense_residual``: FedEx-LoRA's residual travels as one m×n array."""
    head = sum(array_bytes(msg.DENSE + name, shape) for name, shape in dense.items())
    rule = DOWNLINK[method]
    out = []
    for t, (sent, replied) in enumerate(zip(sent_ranks, replied_ranks, strict=True)):
        if rule == "b_only":
            up = sum(b_bytes(shapes, r) + head for r in replied.values())
        else:
            up = sum(
                factor_bytes(shapes, r, msg.LORA_B, msg.LORA_A) + head for r in replied.values()
            )
        # round t (1-based t + 1) receives the factors round t merged, keyed "@t"
        merged_b, merged_a = f"{msg.MERGED_B}@{t}", f"{msg.MERGED_A}@{t}"
        if t == 0:
            down = head * len(sent)
        elif rule in ("stack", "merged"):
            stack = sum(replied_ranks[t - 1].values()) if rule == "stack" else merged_ranks[t - 1]
            down = len(sent) * (factor_bytes(shapes, stack, merged_b, merged_a) + head)
        elif rule == "b_only":
            down = sum(b_bytes(shapes, r) + head for r in sent.values())
        else:
            down = sum(
                factor_bytes(shapes, r, msg.LORA_B, msg.LORA_A) + head for r in sent.values()
            )
            if rule == "rank+residual" and dense_residual:  # ΔW_res, m × n
                key = f"{msg.MERGED_D}@{t}"
                down += len(sent) * sum(array_bytes(name + key, mn) for name, mn in shapes.items())
            elif rule == "rank+residual":  # [p_k B_k …, −B̄]: Σ r_k + r_max columns
                previous = replied_ranks[t - 1].values()
                residual = sum(previous) + max(previous)
                down += len(sent) * factor_bytes(shapes, residual, merged_b, merged_a)
        out.append({"sent": down, "received": up})
    return out


def measure(config: Config, run_dir: Path) -> dict[str, Any]:
    """Run ``config`` in this process; per round the counted and the formula's bytes."""
    from raflora.experiments.inprocess import InProcessGrid, task_identity
    from raflora.federation.server import FederatedRun

    start = time.perf_counter()
    with task_identity():
        FederatedRun(config, run_dir).main(InProcessGrid(config.clients.num_clients))
    return against_formula(config, run_dir, time.perf_counter() - start)


def against_formula(config: Config, run_dir: Path, seconds: float = 0.0) -> dict[str, Any]:
    """A finished run's bytes per round (metrics.json) next to the formula's, from the module
    shapes and ranks of its checkpoints (every client must have taken part in every round;
    used by `measure` and by the deployment tests)."""
    history = json.loads((run_dir / "metrics.json").read_text())[1:]
    folders = [run_dir / "checkpoints" / f"round_{r['round']:03d}" for r in history]
    states = [load_checkpoint(folder)[0] for folder in folders]
    update = states[-1].total_update()
    shapes = {name: (u.whole()[0].shape[0], u.whole()[1].shape[1]) for name, u in update.items()}
    dense = {name: tuple(np.shape(v)) for name, v in states[-1].dense.items()}
    configured = dict(enumerate(task.client_ranks(config)))
    if any(r["ok"] != len(configured) for r in history):
        raise RuntimeError(f"{config.federation.method}: a client failed or was not sampled")
    # every client takes part: allocated ranks are the previous state's, replied ranks its own
    sent = [configured] + [dict(state.ranks) for state in states[:-1]]
    replied = [dict(state.ranks) for state in states]
    last = states[-1].merged_rounds  # what each round merged (merge methods, FedEx's residual)
    merged_ranks = [
        {name: B.shape[1] for name, (B, _) in last.get(t, {}).items()}
        for t in range(1, len(states) + 1)
    ]
    method, options = task.method_options(config)
    expected = formula(
        config.federation.method, shapes, dense, sent, replied, merged_ranks,
        dense_residual=method.dense_merged(options),
    )  # fmt: skip
    rounds = [
        {
            "round": record["round"],
            "bytes_sent": record["bytes_sent"],
            "bytes_received": record["bytes_received"],
            "formula_sent": want["sent"],
            "formula_received": want["received"],
            "ranks_sent": [s[p] for p in sorted(s)],
            "ranks_received": [r[p] for p in sorted(r)],
        }
        for record, want, s, r in zip(history, expected, sent, replied, strict=True)
    ]
    return {
        "method": config.federation.method,
        "options": dict(config.federation.options),
        "seconds": seconds,
        "modules": len(shapes),
        "module_shapes": sorted(set(shapes.values())),
        "dense": dense,
        "rounds": rounds,
        "matches": all(
            r["bytes_sent"] == r["formula_sent"] and r["bytes_received"] == r["formula_received"]
            for r in rounds
        ),
    }


def label(row: dict[str, Any]) -> str:
    """A measured row's method, with its options if any (``fedex_residual_wire=dense``)."""
    return row["method"] + "".join(f"_{k}={v}" for k, v in sorted(row["options"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="examples/tiny.toml, few examples")
    parser.add_argument("--methods", default=",".join(available_methods()))
    parser.add_argument("--model-path", help="--quick: a local model folder instead of MiniLM")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_bytes.json)")
    args = parser.parse_args()
    assert set(DOWNLINK) == set(available_methods()), "every method needs its DOWNLINK rule"
    methods = args.methods.split(",")
    base = TINY if args.quick else DEMO
    quick = [f"model.path={args.model_path}"] if args.model_path else []
    quick += (
        ["data.train_size=60", "data.test_size=16", "model.max_length=16"] if args.quick else []
    )
    console.print(f"bench_bytes on {machine()} ({base.name})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            config = demo_config(method, base, *quick)
            rows.append(measure(config, Path(tmp) / method))
            console.print(f"{method}: {rows[-1]['seconds']:.0f} s")
        variants = []
        for method, overrides in VARIANTS:
            if method in methods:
                config = demo_config(method, base, *quick, *overrides)
                variants.append(measure(config, Path(tmp) / f"{method}-variant"))
                console.print(f"{method} {' '.join(overrides)}: {variants[-1]['seconds']:.0f} s")
    table(
        f"bytes per round, measured ({base.name}, 2 rounds) = formula?",
        ["method", "round", "ranks sent", "ranks replied", "sent", "received", "sent+received",
         "= formula"],
        [[label(r), str(x["round"]), str(x["ranks_sent"]), str(x["ranks_received"]),
          f"{x['bytes_sent']:,}", f"{x['bytes_received']:,}",
          f"{x['bytes_sent'] + x['bytes_received']:,}", str(r["matches"])]
         for r in rows + variants for x in r["rounds"]],
    )  # fmt: skip
    everything = rows + variants
    summary: dict[str, Any] = {
        "quick": args.quick, "all_match": all(r["matches"] for r in everything)
    }  # fmt: skip
    for r in everything:
        for x in r["rounds"]:
            summary[f"bytes_round{x['round']}_{label(r)}"] = x["bytes_sent"] + x["bytes_received"]
    details = {"machine": machine(), "config": str(base.relative_to(ROOT)), "overrides": FAST,
               "methods": rows, "variants": variants}  # fmt: skip
    emit(summary, output_path("bench_bytes", args.out, args.quick), details)


if __name__ == "__main__":
    main()
