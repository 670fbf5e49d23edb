"""Local training and evaluation on tiny models: determinism, what changes, the metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raflora.math.methods.hetlora import tail_regularizer
from raflora.training.data import ChoiceExample, ImageExample, TextExample, encode_examples
from raflora.training.factors import get_dense_trainables, get_factors, live_factors
from raflora.training.local import choice_scores, continuation_logprobs, evaluate, train_local
from raflora.training.models import build_lora_model, default_target_modules, load_base_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

WORDS = {0: "awful boring dull", 1: "great superb lovely"}
CUES = {0: "sunny sun", 1: "moonlit moon"}


def bert_lora(folder: Path, rank: int = 4):
    base, tokenizer = load_base_model(str(folder), "classification", num_labels=2)
    return build_lora_model(base, rank, 2.0 * rank, ["query", "value"]), tokenizer


def sentiment(tokenizer, n: int = 48):
    examples = [TextExample(f"{WORDS[i % 2]} film number {i}", i % 2) for i in range(n)]
    return encode_examples(examples, tokenizer=tokenizer, max_length=16)


def llama_lora(folder: Path, rank: int = 4):
    base, tokenizer = load_base_model(str(folder), "causal-lm")
    return build_lora_model(base, rank, 2.0 * rank, default_target_modules(base)), tokenizer


def questions(n: int = 12) -> list[ChoiceExample]:
    return [
        ChoiceExample(f"Question: {CUES[i % 2]} {i}?\n A. sun\n B. moon\nAnswer:", (" A", " B"),
                      i % 2, task="even" if i % 3 else "odd")
        for i in range(n)
    ]  # fmt: skip


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_is_deterministic_and_touches_only_trainables(tiny_bert_dir: Path) -> None:
    model, tokenizer = bert_lora(tiny_bert_dir)
    data = sentiment(tokenizer)
    before = snapshot(model)
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    result = train_local(model, data, steps=4, batch_size=8, lr=1e-2, seed=3)
    assert torch.rand(1) == expected_next  # caller's RNG untouched
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name
    assert not model.training
    assert result["steps"] == 4 and result["num_examples"] == 32
    assert result["num_distinct_examples"] == 48 and result["seconds"] > 0
    twin, _ = bert_lora(tiny_bert_dir)
    repeat = train_local(twin, data, steps=4, batch_size=8, lr=1e-2, seed=3)
    assert {**repeat, "seconds": 0} == {**result, "seconds": 0}
    for name, (B, A) in get_factors(model).items():
        assert torch.equal(get_factors(twin)[name][0], B) and torch.equal(
            get_factors(twin)[name][1], A
        )
    other, _ = bert_lora(tiny_bert_dir)
    train_local(other, data, steps=4, batch_size=8, lr=1e-2, seed=4)
    assert not torch.equal(get_dense_trainables(other)["classifier.weight"],
                           get_dense_trainables(model)["classifier.weight"])  # fmt: skip


def test_classifier_learns_and_evaluate_matches_a_manual_count(tiny_bert_dir: Path) -> None:
    model, tokenizer = bert_lora(tiny_bert_dir)
    data = sentiment(tokenizer)
    start = evaluate(model, data, batch_size=20)
    result = train_local(model, data, epochs=8, batch_size=16, lr=3e-2, seed=0)
    end = evaluate(model, data, batch_size=7)
    assert result["steps"] == 24 and result["num_examples"] == 8 * 48
    assert end["loss"] < 0.6 * start["loss"] and end["accuracy"] >= 0.9
    batch = data.collate([data[i] for i in range(len(data))])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    assert end["accuracy"] == float((logits.argmax(-1) == labels).float().mean())
    loss = torch.nn.functional.cross_entropy(logits, labels)
    assert end["loss"] == pytest.approx(float(loss), rel=1e-5) and end["num_examples"] == 48


def test_ready_batches_and_bad_arguments(tiny_bert_dir: Path) -> None:
    model, tokenizer = bert_lora(tiny_bert_dir)
    data = sentiment(tokenizer, n=10)
    batches = [data.collate([data[i] for i in range(0, 6)]), data.collate([data[6], data[7]])]
    result = train_local(model, batches, epochs=2, batch_size=99, lr=1e-3, seed=0)
    assert (result["steps"], result["num_examples"], result["num_distinct_examples"]) == (4, 16, 8)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        train_local(model, data, steps=2, epochs=1, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        train_local(model, data, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [], batch_size=4)
    with pytest.raises(ValueError, match="no training data"):
        train_local(model, [], epochs=1, batch_size=4, lr=1e-3, seed=0)


def test_regularizer_is_added_to_the_loss(tiny_bert_dir: Path) -> None:
    def tail_norm(model) -> torch.Tensor:
        return 50.0 * sum(tail_regularizer(B, A, 0.5) for B, A in live_factors(model).values())

    plain, tokenizer = bert_lora(tiny_bert_dir)
    regular, _ = bert_lora(tiny_bert_dir)
    data = sentiment(tokenizer)
    train_local(plain, data, steps=10, batch_size=8, lr=1e-2, seed=0)
    result = train_local(regular, data, steps=10, batch_size=8, lr=1e-2, seed=0,
                         regularizer=tail_norm)  # fmt: skip
    assert result["regularizer"] > 0
    with torch.no_grad():
        assert float(tail_norm(regular)) < 0.5 * float(tail_norm(plain))


def naive_logprob(model, prompt: list[int], choice: list[int]) -> float:
    """Σ log p(choice | prompt) from one unpadded full forward: the independent reference."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt + choice])).logits[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(choice))


def test_choice_scores_match_unpadded_single_sequences(tiny_llama_dir: Path) -> None:
    model, tokenizer = llama_lora(tiny_llama_dir)
    with torch.no_grad():  # a non-zero adapter, so LoRA is part of what is checked
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.1)
    examples = [
        *questions(3),  # one-token letters: one prompt forward per question
        ChoiceExample("Say:", (" hello there", " x"), 0),  # multi-token: one row per choice
        ChoiceExample("Then a much longer prompt:", (" ok", " fine", " y"), 2),
    ]
    data = encode_examples(examples, tokenizer=tokenizer, max_length=64)
    assert [data.single_token(q) for q in range(5)] == [True] * 3 + [False] * 2
    with torch.no_grad():
        scores = choice_scores(model, data, batch_size=2)
    for item, row in zip(data.items, scores, strict=True):
        for choice, (value, count) in zip(item["choices"], row, strict=True):
            assert count == len(choice)
            assert value == pytest.approx(naive_logprob(model, item["prompt"], choice), abs=1e-4)
    batch = data.collate([data[3], data[4]])  # training rows: the gold continuation
    with torch.no_grad():
        logp, count = continuation_logprobs(model, batch)
    assert count.tolist() == [len(data[3]["choices"][0]), len(data[4]["choices"][2])]
    assert float(logp[1]) == pytest.approx(scores[4][2][0], abs=1e-4)


def test_multiple_choice_training_and_metrics(tiny_llama_dir: Path) -> None:
    model, tokenizer = llama_lora(tiny_llama_dir)
    data = encode_examples(questions(), tokenizer=tokenizer, max_length=64)
    before = evaluate(model, data, batch_size=5)
    assert set(before) == {"loss", "accuracy", "accuracy_sum", "num_examples", "accuracy/even",
                           "accuracy/odd"}  # fmt: skip
    assert before["accuracy"] == before["accuracy_sum"]  # one-token continuations
    train_local(model, data, steps=60, batch_size=4, lr=1e-2, seed=0)
    after = evaluate(model, data, batch_size=5)
    # the tiny model's frozen tied embeddings keep logits near uniform (loss ≈ log 263), but the
    # gold letter's probability rises enough to win every question
    assert after["loss"] < before["loss"] - 0.3 and after["accuracy"] == 1.0
    with torch.no_grad():
        scores = np.array([[value for value, _ in row] for row in choice_scores(model, data, 4)])
    right = scores.argmax(-1) == np.array([ex.answer for ex in questions()])
    odd = np.array([ex.task == "odd" for ex in questions()])
    assert after["accuracy"] == pytest.approx(right.mean())
    assert after["accuracy/odd"] == pytest.approx(right[odd].mean())
    assert after["loss"] == pytest.approx(
        -scores[np.arange(12), [ex.answer for ex in questions()]].mean()
    )


def test_length_normalised_and_summed_accuracy_differ(tiny_llama_dir: Path) -> None:
    model, tokenizer = llama_lora(tiny_llama_dir)
    examples = [ChoiceExample(f"Pick {i}:", (" a", " a a a a a a a a"), 1) for i in range(6)]
    metrics = evaluate(model, encode_examples(examples, tokenizer=tokenizer), batch_size=4)
    assert metrics["accuracy_sum"] == 0.0  # a long continuation has a much lower sum
    assert "accuracy/" not in " ".join(metrics)


def test_vit_trains_on_images(tiny_vit_dir: Path) -> None:
    base, _ = load_base_model(str(tiny_vit_dir), "image-classification", num_labels=2)
    model = build_lora_model(base, 2, 4.0, default_target_modules(base))
    rng = np.random.default_rng(0)
    images = [ImageExample((rng.random((28, 28)) * 60 + 190 * (i % 2)).astype(np.uint8), i % 2)
              for i in range(24)]  # fmt: skip
    data = encode_examples(images, image_size=28, num_channels=1)
    start = evaluate(model, data, batch_size=8)
    train_local(model, data, steps=15, batch_size=8, lr=3e-2, seed=0)
    end = evaluate(model, data, batch_size=8)
    assert end["loss"] < start["loss"] and end["accuracy"] == 1.0
