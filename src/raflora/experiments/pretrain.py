"""Central pretraining of a base model before federated LoRA fine-tuning (the vision suite).

No pretrained vision model ships (../shared/ASSETS.md), and LoRA on a randomly initialised
ViT learns little. So the suite first trains all weights of ``vit-tiny`` centrally on some
classes (e.g. MNIST digits 0–4) and saves it as a local model folder; the federated runs then
fine-tune LoRA adapters on all ten digits starting from it.

Images of the federated runs' test splits (for every seed of the suite) are never used for
pretraining, so the server's test accuracy is measured on images the backbone has not seen.
The federated clients' training data does overlap the pretraining images of the pretraining
classes; the report says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from raflora.experiments.suite import PretrainSection

log = logging.getLogger("raflora")
INFO = "pretrain.json"


def _key(example: Any) -> str:
    return hashlib.sha1(np.ascontiguousarray(example.pixels).tobytes()).hexdigest()


def pretraining_examples(spec: PretrainSection, exclude_test_of: list[int]) -> tuple[list, list]:
    """(train, held-out) examples of ``spec.labels``, none in a test split of the given seeds."""
    from raflora.training import load_task_data
    from raflora.training.data.types import subsample

    task = "image-classification"
    held_out = set()
    for seed in exclude_test_of:
        held_out |= {_key(ex) for ex in load_task_data(spec.data, task=task, seed=seed).test}
    data = load_task_data(spec.data, task=task, seed=spec.seed)
    labels = set(spec.labels) or set(range(data.num_labels))
    pool = [ex for ex in data.train + data.test if ex.label in labels]
    train = [ex for ex in pool if _key(ex) not in held_out]
    test = [ex for ex in pool if _key(ex) in held_out]  # for a sanity score only
    return subsample(train, spec.train_size or None, spec.seed), test


def pretrain(spec: PretrainSection, out: Path, *, exclude_test_of: list[int]) -> Path:
    """Train ``spec.model`` (all weights) on the pretraining data and save it to ``out``;
    reuse ``out`` when it was made by the same spec."""
    import torch

    from raflora.training import encode_examples, evaluate, load_base_model, train_local
    from raflora.training.models import write_atomically

    wanted = {"spec": spec.model_dump(mode="json"), "exclude_test_of": sorted(exclude_test_of)}
    info = out / INFO
    if info.is_file() and json.loads(info.read_text()).get("made_by") == wanted:
        return out
    if out.exists():
        raise FileExistsError(f"{out} holds another pretrained model; remove it or use --out")
    train, held_out = pretraining_examples(spec, exclude_test_of)
    model, _ = load_base_model(spec.model, "image-classification", seed=spec.seed)
    config = model.config
    encode = dict(image_size=config.image_size, num_channels=config.num_channels)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # threads that wait on each other crawl on a busy machine
        log.info("pretraining %s on %d images (%d steps)", spec.model, len(train), spec.steps)
        stats = train_local(
            model.train(),
            encode_examples(train, **encode),
            steps=spec.steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            seed=spec.seed,
        )
        scores = evaluate(model, encode_examples(held_out, **encode), batch_size=256)
    finally:
        torch.set_num_threads(threads)
    record = {
        "made_by": wanted,
        "train_examples": len(train),
        "train_loss": stats["train_loss"],
        "seconds": stats["seconds"],
        "held_out_accuracy": scores["accuracy"],
        "held_out_examples": len(held_out),
    }
    log.info("pretrained: held-out accuracy on its classes %.3f", scores["accuracy"])

    def write(folder: Path) -> None:
        model.eval().save_pretrained(folder)
        (folder / INFO).write_text(json.dumps(record, indent=1))

    write_atomically(out, write)
    return out
