"""Central (non-federated) headroom probe for the planted-rank *distillation* task on MiniLM.

The teacher is MiniLM with a rank-ρ update ``γ ‖W‖_F · U Vᵀ / √ρ`` planted in every
query/value projection and the student's own initial C-class head; a student LoRA of each rank
in ``--ranks`` regresses on the teacher's logits (mean squared error, AdamW, batch 16, the
optimiser restarted every quarter like rounds) with the head trainable or frozen
(``--freeze_head``, as ``model.train_head = false``). Printed after each quarter: agreement with
the teacher's argmax and the relative test MSE ``‖z − z_T‖² / ‖z_T − mean z_T‖²``. The
federated task is ``data.name = "planted:...,readout=head,targets=logits"``; this script is
what chose its settings (docs/results.md, "Headroom search"; outputs in
benchmarks/results/probe_headroom.jsonl). One probe takes 5–20 minutes on a free CPU core::

    PYTHONPATH=src python benchmarks/probe_distill.py --gamma 0.6 --lr 1e-3 --freeze_head
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from raflora.training.data.planted import planted_update
from raflora.training.data.shipped import rotten_tomatoes
from raflora.training.models import build_lora_model, freeze_heads, load_base_model


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rho", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--ranks", default="2,16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ntrain", type=int, default=2400)
    p.add_argument("--ntest", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze_head", action="store_true")
    p.add_argument("--out", default=None, help="append the JSON report to this file")
    return p.parse_args()


def main() -> None:
    a = arguments()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    base, tok = load_base_model("minilm", "classification", num_labels=a.classes, seed=a.seed)
    train, test, *_ = rotten_tomatoes(0, 0.2)
    texts = sorted({e.text for e in train + test})
    pick = np.random.default_rng(a.seed).choice(len(texts), a.ntrain + a.ntest, replace=False)
    texts = [texts[i] for i in pick]
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(10_000 + a.seed)
    for name, module in sorted(teacher.named_modules()):
        if name.endswith(("query", "value")) and isinstance(module, torch.nn.Linear):
            module.weight.data += planted_update(module.weight, a.rho, a.gamma, generator)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def logits_of(model: torch.nn.Module, start: int, stop: int) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat(
                [
                    model(
                        input_ids=enc["input_ids"][s : min(s + 128, stop)],
                        attention_mask=enc["attention_mask"][s : min(s + 128, stop)],
                    ).logits
                    for s in range(start, stop, 128)
                ]
            )

    target = logits_of(teacher, 0, len(texts))
    train_t, test_t = target[: a.ntrain], target[a.ntrain :]

    def scores(model: torch.nn.Module) -> list[float]:
        z = logits_of(model, a.ntrain, len(texts))
        agree = float((z.argmax(1) == test_t.argmax(1)).float().mean())
        rel = float(((z - test_t) ** 2).mean() / ((test_t - test_t.mean(0)) ** 2).mean())
        return [round(agree, 3), round(rel, 3)]

    report = {"args": vars(a), "base": scores(base), "students": {}}
    start = time.perf_counter()
    for rank in map(int, a.ranks.split(",")):
        model = build_lora_model(copy.deepcopy(base), rank, 16.0, ["query", "value"], seed=a.seed)
        if a.freeze_head:
            freeze_heads(model)
        params = [p for p in model.parameters() if p.requires_grad]
        batches = torch.Generator().manual_seed(a.seed)
        history = []
        for _ in range(4):
            optimizer = torch.optim.AdamW(params, lr=a.lr)
            model.train()
            for _ in range(a.steps // 4):
                b = torch.randint(0, a.ntrain, (16,), generator=batches)
                z = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b])
                loss = ((z.logits - train_t[b]) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            history.append(scores(model))
        report["students"][rank] = history
        print(f"rank {rank}: {history} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(report))
    if a.out:
        with open(a.out, "a") as handle:
            handle.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
