"""Quick, central (non-federated) headroom probe for a planted-rank teacher on MiniLM.

Plants a rank-ρ update ``γ ‖W‖_F · U Vᵀ / √ρ`` in every query/value projection, labels
``ntrain + ntest`` Rotten Tomatoes sentences by a balanced argmax of a read-out of the teacher's
pooled features (``--mode full``: teacher features; ``diff``: teacher − base; ``--head random``:
a Gaussian read-out, ``shared``: the student's own initial classifier), then reports

- the spectrum of the feature change, the class shares,
- a linear probe on the *base* features (what the trained head alone could reach),
- test accuracy of a student LoRA at each rank in ``--ranks`` after ``--steps`` AdamW steps
  (evaluated four times along the way; the optimiser restarts at each, like rounds).

Used for the headroom search of docs/results.md; one probe takes minutes on a free CPU core::

    PYTHONPATH=src python benchmarks/probe_headroom.py --rho 32 --gamma 0.3 --classes 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from raflora.training.data import TextExample, encode_examples
from raflora.training.data.planted import balanced_argmax, planted_update, pooled_features
from raflora.training.data.shipped import rotten_tomatoes
from raflora.training.local import evaluate, train_local
from raflora.training.models import build_lora_model, load_base_model


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rho", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--ntrain", type=int, default=1600)
    p.add_argument("--ntest", type=int, default=400)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ranks", default="2,16")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("full", "diff"), default="full")
    p.add_argument("--head", choices=("random", "shared"), default="random")
    p.add_argument("--maxlen", type=int, default=32)
    p.add_argument("--out", default=None, help="append the JSON report to this file (JSON lines)")
    return p.parse_args()


def linear_probe(x: np.ndarray, y: np.ndarray, ntrain: int, classes: int) -> float:
    """Test accuracy of softmax regression (500 full-batch Adam steps) on ``x``."""
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt[:ntrain]), yt[:ntrain]).backward()
        opt.step()
    return float((lin(xt[ntrain:]).argmax(1) == yt[ntrain:]).float().mean())


def main() -> None:
    a = arguments()
    torch.set_num_threads(1)
    start = time.perf_counter()
    base, tok = load_base_model("minilm", "classification", num_labels=a.classes, seed=a.seed)
    train, test, *_ = rotten_tomatoes(a.seed, 0.2)
    rng = np.random.default_rng(a.seed)
    texts = [train[i].text for i in rng.choice(len(train), a.ntrain, replace=False)]
    texts += [test[i].text for i in rng.choice(len(test), a.ntest, replace=False)]
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(10_000 + a.seed)
    for name, module in teacher.named_modules():
        if name.endswith(("attention.self.query", "attention.self.value")):
            module.weight.data += planted_update(module.weight, a.rho, a.gamma, generator)
    fb = pooled_features(base, tok, texts, a.maxlen)
    ft = pooled_features(teacher, tok, texts, a.maxlen)
    d = ft - fb if a.mode == "diff" else ft
    d = d - d[: a.ntrain].mean(0)
    change = np.linalg.svd(ft[: a.ntrain] - fb[: a.ntrain], compute_uv=False) ** 2
    change /= change.sum()
    if a.head == "random":
        readout = np.random.default_rng(20_000 + a.seed).standard_normal((d.shape[1], a.classes))
    else:
        readout = base.classifier.weight.detach().double().numpy().T
    y = balanced_argmax(d @ readout)
    report = {
        "args": vars(a),
        "change_effective_rank": float(np.exp(-(change * np.log(change + 1e-30)).sum())),
        "class_shares": np.round(np.bincount(y, minlength=a.classes) / len(y), 3).tolist(),
        "linear_probe_base": linear_probe(fb, y, a.ntrain, a.classes),
        "students": {},
    }
    print(json.dumps(report), flush=True)
    examples = [TextExample(t, int(label)) for t, label in zip(texts, y, strict=True)]
    train_set = encode_examples(examples[: a.ntrain], tokenizer=tok, max_length=a.maxlen)
    test_set = encode_examples(examples[a.ntrain :], tokenizer=tok, max_length=a.maxlen)
    for rank in map(int, a.ranks.split(",")):
        model = build_lora_model(
            copy.deepcopy(base), rank, a.alpha, ["query", "value"], rslora=a.rslora, seed=a.seed
        )
        accuracies = []
        for k in range(4):
            train_local(model, train_set, steps=a.steps // 4, batch_size=16, lr=a.lr, seed=k)
            model.eval()
            accuracies.append(round(evaluate(model, test_set, batch_size=64)["accuracy"], 3))
        report["students"][rank] = accuracies
        print(f"rank {rank}: {accuracies} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(report))
    if a.out:
        with open(a.out, "a") as handle:
            handle.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
