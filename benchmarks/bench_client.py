"""A client's local training round vs a bare PEFT + torch loop on the same model (issue 6, item 2).

    .venv/bin/python benchmarks/bench_client.py            # full run: ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_client.py --quick    # smoke run: seconds, nothing saved

Ours: `raflora.federation.client.train_round` exactly as the ClientApp calls it each round: take the
process's rank-r PEFT model (built once per base and rank, see `reused_round_model`), load the
received factors and head (`set_factors`, scaling divided out), `train_local` for S AdamW steps,
read the folded factors and head back (`get_factors`). Bare: written here without raflora's training
code: `get_peft_model` on a copy of the same base with the same LoRA config, built once outside the
timing, then S steps of forward, `loss.backward()`, gradient clipping at the same norm,
`AdamW.step()`, over the same batches in the same order (the order `train_local` draws: a seeded
`randperm` per epoch, collated in the loop by both). Same model, rank, batch, learning rate and
torch thread count.

Overhead = ours round / bare S steps − 1, the median over repetitions of back-to-back pairs, so
everything ours does per round (model setup, factor conversion) counts against it; "step
overhead" compares only the training steps (`train_local`'s own time). A third side, "rebuilt",
is ours as it was before the client kept its model between rounds (`build_round_model`: copy the
base and `get_peft_model` every round). The three alternate, after one warm-up each.
Both run single-threaded (the simulation's default, ``train.threads = 1``) in this one thread,
so besides wall time the script reports each side's CPU time (``time.thread_time``): on a
shared, overloaded machine wall time also counts waiting for a core, CPU time does not.
Throughput counts examples and real (non-padding) tokens per second of the bare loop and ours.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, console, emit, fmt_seconds, machine, median, output_path, table
from raflora.config import load_config
from raflora.federation import client, task
from raflora.training import get_dense_trainables, get_factors

MODELS = {  # name → (config overrides on examples/tiny.toml, local steps S)
    "minilm": (["model.max_length=64", "train.batch_size=16", "data.train_size=600"], 10),
    "smollm2-135m": (
        [
            "model.path=smollm2-135m",
            "model.task=causal-lm",
            "model.max_length=96",
            "data.name=arc_easy",
            "data.train_size=300",
            "data.test_size=20",
            "train.batch_size=8",
        ],
        4,
    ),
}
GOAL_OVERHEAD = 0.05


def context(
    name: str, rank: int, threads: int, quick: bool, path: str | None = None
) -> tuple[Any, int]:
    """The client context of partition 0 (base model, tokenizer, encoded local data)."""
    overrides, steps = MODELS[name]
    if path:  # another model folder of the same kind (the smoke test's tiny BERT)
        overrides = [*overrides, f"model.path={path}"]
    overrides = [
        *overrides,
        "clients.num_clients=1",
        f"clients.ranks=[{rank}]",
        "data.local_val_fraction=0.0",
        "data.partition=iid",
        f"train.threads={threads}",
    ]
    if quick:
        overrides += ["model.max_length=16", "data.train_size=64", "train.batch_size=4"]
        steps = 2
    overrides.append(f"train.local_steps={steps}")
    config = load_config(ROOT / "examples" / "tiny.toml", overrides)
    return client.client_context(config.to_json(), 0), steps


def received(ctx: Any, rank: int) -> tuple[dict, dict]:
    """What the server sends in round ≥ 2: rank-r factors of every module and the head."""
    model = task.lora_model(ctx.config, ctx.base, rank, seed=1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.02)  # a trained-looking adapter (lora_B nonzero)
    lora = {k: (B.numpy(), A.numpy()) for k, (B, A) in get_factors(model).items()}
    dense = {k: t.numpy() for k, t in get_dense_trainables(model).items()}
    return lora, dense


def batches(data: Any, batch_size: int, seed: int):
    """train_local's batch order: a seeded permutation per epoch, collated on the fly."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield data.collate([data[i] for i in order[start : start + batch_size]])


def choice_nll(model: Any, batch: dict) -> torch.Tensor:
    """Mean NLL of the gold continuation tokens of a left-padded batch (only the last K + 1
    positions go through the LM head)."""
    ids, mask, cont = batch["input_ids"], batch["attention_mask"], batch["cont_len"]
    K = int(cont.max())
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=K + 1,
    )
    logits = out.logits[:, -(K + 1) : -1].float()  # (B, K, V)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -K:, None])[..., 0]  # (B, K)
    scored = torch.arange(K) >= (K - cont)[:, None]
    return -(logp * scored).sum() / cont.sum()


def bare_model(ctx: Any, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = ctx.config.model
    base = copy.deepcopy(ctx.base)
    heads = [n for n in ("classifier", "score") if n in dict(base.named_children())]
    kind = type(base).__name__
    lora = LoraConfig(
        r=rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=task.target_modules(ctx.config, ctx.base),
        lora_dropout=cfg.lora_dropout,
        modules_to_save=heads or None,
        task_type="SEQ_CLS" if kind.endswith("SequenceClassification") else "CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def bare_steps(model: Any, data: Any, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    stream = batches(data, batch_size, seed)
    model.train()
    examples = tokens = 0
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        batch = next(stream)
        loss = choice_nll(model, batch) if "cont_len" in batch else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        examples += len(batch["input_ids"])
        tokens += int(batch["attention_mask"].sum())
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.thread_time() - cpu,
        "examples": examples,
        "tokens": tokens,
    }


def ours_round(ctx: Any, rank: int, lora: dict, dense: dict, server_round: int) -> dict:
    start, cpu = time.perf_counter(), time.thread_time()
    _, _, metrics = client.train_round(ctx, server_round, rank, lora, {}, dense)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.thread_time() - cpu,
        "train_seconds": metrics["train-seconds"],
    }


@contextmanager
def fresh_models():
    """train_round as before the model reuse: a new PEFT copy of the base every round."""
    reused = client.round_model
    client.round_model = client.build_round_model
    try:
        yield
    finally:
        client.round_model = reused


def paired(a: list[dict], b: list[dict], key: str) -> float:
    """Median over repetitions of a_i / b_i − 1 (each pair ran back to back)."""
    return median([x[key] / y[key] - 1 for x, y in zip(a, b, strict=True)])


def bench_model(
    name: str, rank: int, threads: int, repeats: int, quick: bool, path: str | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    ctx, steps = context(name, rank, threads, quick, path)
    load_seconds = time.perf_counter() - start
    train = ctx.config.train
    torch.set_num_threads(threads)
    lora, dense = received(ctx, rank)
    model = bare_model(ctx, rank)
    seed = task.derived_seed(ctx.config.run.seed, "client", 2, 0)  # train_round's seed, round 2
    # token count of the same batches, for throughput
    probe = batches(ctx.data.train, train.batch_size, seed)
    counted = [next(probe) for _ in range(steps)]
    examples = sum(len(b["input_ids"]) for b in counted)
    tokens = sum(int(b["attention_mask"].sum()) for b in counted)
    ours_round(ctx, rank, lora, dense, 2)  # warm-ups
    bare_steps(model, ctx.data.train, steps, train.batch_size, train.lr, seed)
    ours, fresh, bare = [], [], []
    for _ in range(repeats):  # ours, bare, fresh-model ours: back to back, same data
        ours.append(ours_round(ctx, rank, lora, dense, 2))
        bare.append(bare_steps(model, ctx.data.train, steps, train.batch_size, train.lr, seed))
        with fresh_models():
            fresh.append(ours_round(ctx, rank, lora, dense, 2))
        torch.set_num_threads(threads)
    t_round, t_train, t_bare, t_fresh = (
        median([r[key] for r in runs])
        for runs, key in [(ours, "seconds"), (ours, "train_seconds"), (bare, "seconds"),
                          (fresh, "seconds")]
    )  # fmt: skip
    c_round, c_bare, c_fresh = (median([r["cpu_seconds"] for r in x]) for x in (ours, bare, fresh))
    return {
        "model": name, "rank": rank, "steps": steps, "batch_size": train.batch_size,
        "max_length": ctx.config.model.max_length, "threads": threads, "repeats": repeats,
        "load_seconds": load_seconds, "examples_per_round": examples, "tokens_per_round": tokens,
        "ours_round_seconds": t_round, "ours_train_seconds": t_train, "bare_seconds": t_bare,
        "fresh_round_seconds": t_fresh,
        "ours_round_cpu_seconds": c_round, "bare_cpu_seconds": c_bare,
        "fresh_round_cpu_seconds": c_fresh,
        # paired medians: robust to the load drifting between repetitions
        "overhead": paired(ours, bare, "seconds"),
        "cpu_overhead": paired(ours, bare, "cpu_seconds"),
        "fresh_overhead": paired(fresh, bare, "seconds"),
        "fresh_cpu_overhead": paired(fresh, bare, "cpu_seconds"),
        "overhead_of_medians": t_round / t_bare - 1,
        "step_overhead": t_train / t_bare - 1,
        "per_round_extra_seconds": median([r["seconds"] - r["train_seconds"] for r in ours]),
        "fresh_per_round_extra_seconds": median(
            [r["seconds"] - r["train_seconds"] for r in fresh]),
        "bare_examples_per_second": examples / t_bare, "bare_tokens_per_second": tokens / t_bare,
        "ours_examples_per_second": examples / t_round, "ours_tokens_per_second": tokens / t_round,
        "ours_round_all": [r["seconds"] for r in ours], "bare_all": [r["seconds"] for r in bare],
        "fresh_round_all": [r["seconds"] for r in fresh],
        "ours_round_cpu_all": [r["cpu_seconds"] for r in ours],
        "bare_cpu_all": [r["cpu_seconds"] for r in bare],
        "fresh_round_cpu_all": [r["cpu_seconds"] for r in fresh],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM, 2 short steps")
    parser.add_argument("--models", default="minilm,smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the client default)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model-path", help="--quick: a local folder instead of MiniLM")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/bench_client.json)")
    args = parser.parse_args()
    names = ["minilm"] if args.quick else args.models.split(",")
    repeats = 2 if args.quick else args.repeats
    info = machine() | {"threads": args.threads, "quick": args.quick}
    console.print(f"bench_client on {info}")
    path = args.model_path if args.quick else None
    rows = [bench_model(name, args.rank, args.threads, repeats, args.quick, path) for name in names]
    table(
        f"client round (train_round) vs bare PEFT loop, rank {args.rank}, {repeats} repetitions "
        "(times: medians; overheads: medians of back-to-back pairs)",
        ["model", "S × batch", "bare steps", "ours round", "ours: extra/round", "overhead",
         "CPU overhead", "rebuilt model: round", "rebuilt: extra/round", "rebuilt: overhead",
         "rebuilt: CPU overhead", "ex/s", "tok/s"],
        [[r["model"], f"{r['steps']} × {r['batch_size']}", fmt_seconds(r["bare_seconds"]),
          fmt_seconds(r["ours_round_seconds"]), fmt_seconds(r["per_round_extra_seconds"]),
          f"{r['overhead']:+.1%}", f"{r['cpu_overhead']:+.1%}",
          fmt_seconds(r["fresh_round_seconds"]), fmt_seconds(r["fresh_per_round_extra_seconds"]),
          f"{r['fresh_overhead']:+.1%}", f"{r['fresh_cpu_overhead']:+.1%}",
          f"{r['ours_examples_per_second']:.1f}", f"{r['ours_tokens_per_second']:.0f}"]
         for r in rows],
    )  # fmt: skip
    summary: dict[str, Any] = {"quick": args.quick}
    for r in rows:
        key = r["model"].replace("-", "_")
        summary |= {
            f"overhead_{key}": r["overhead"],
            f"step_overhead_{key}": r["step_overhead"],
            f"cpu_overhead_{key}": r["cpu_overhead"],
            f"rebuilt_model_overhead_{key}": r["fresh_overhead"],
            f"rebuilt_model_cpu_overhead_{key}": r["fresh_cpu_overhead"],
            f"examples_per_second_{key}": r["ours_examples_per_second"],
            f"tokens_per_second_{key}": r["ours_tokens_per_second"],
        }
    summary["max_overhead"] = max(r["overhead"] for r in rows)
    summary["max_cpu_overhead"] = max(r["cpu_overhead"] for r in rows)
    summary["goal_met"] = bool(summary["max_overhead"] <= GOAL_OVERHEAD)
    summary["goal_met_cpu"] = bool(summary["max_cpu_overhead"] <= GOAL_OVERHEAD)
    out = output_path("bench_client", args.out, args.quick)
    emit(summary, out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
