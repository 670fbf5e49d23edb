"""The planted-rank teacher task: spec parsing, the planted update's rank and norm, balanced
labels, determinism and caching, on the tiny BERT (hidden 32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raflora.training import load_task_data
from raflora.training.data import planted
from raflora.training.data.planted import balanced_argmax, parse_spec, planted_update

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_spec_parsing_and_errors() -> None:
    spec = parse_spec("planted:rank=8, classes=4,scale=0.5,labels=diff")
    got = (spec.rank, spec.classes, spec.scale, spec.labels, spec.size)
    assert got == (8, 4, 0.5, "diff", 3000)
    assert parse_spec(spec.name) == spec  # the canonical name round-trips
    for name, message in [
        ("planted:classes=4", "needs rank="),
        ("planted:rank=4,colour=red", "'colour=red' is not key=value with a known key"),
        ("planted:rank=two", "rank must be"),
        ("planted:rank=4,labels=soft", "labels must be 'full' or 'diff'"),
        ("planted:rank=0,classes=1", "rank must be >= 1 (got 0); classes must be >= 2"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_spec(name)


def test_planted_update_has_rank_rho_equal_singular_values_and_relative_norm() -> None:
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    delta = planted_update(weight, 6, 0.3, torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(delta.double())
    assert torch.allclose(s[:6], torch.full((6,), 0.3 * weight.norm().item() / 6**0.5).double())
    assert s[6:].max() < 1e-5 * s[0]
    assert delta.norm().item() == pytest.approx(0.3 * weight.norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="exceeds the module's size 48×40"):
        planted_update(weight, 41, 0.3, torch.Generator())


def test_balanced_argmax_evens_out_a_skewed_readout() -> None:
    logits = np.random.default_rng(0).standard_normal((900, 3)) + np.array([2.0, 0.0, -1.0])
    assert np.bincount(logits.argmax(1), minlength=3).min() < 100  # skewed without offsets
    labels = balanced_argmax(logits)
    assert np.bincount(labels, minlength=3).min() > 0.8 * 300


def test_planted_task_is_deterministic_cached_and_depends_on_rho(
    tiny_bert_dir: Path, raflora_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    name = f"planted:rank=2,classes=4,size=160,model={tiny_bert_dir},max_length=16"
    # Execute
    data = load_task_data(name, task="classification", seed=0)
    again = load_task_data(name, task="classification", seed=1)  # from the cache
    higher = load_task_data(name.replace("rank=2", "rank=16"), task="classification", seed=0)
    # Assert
    assert data.num_labels == 4 and data.kind == "classification"
    assert len(data.train) + len(data.test) == 160 and 28 <= len(data.test) <= 36  # per class
    assert np.bincount(data.labels("train"), minlength=4).min() >= 0.7 * len(data.train) / 4
    assert len(list((raflora_cache / "planted").glob("*.json"))) == 2
    label_of = {ex.text: ex.label for ex in data.train + data.test}
    assert {ex.text: ex.label for ex in again.train + again.test} == label_of  # same task
    assert {ex.text for ex in again.test} != {ex.text for ex in data.test}  # another split
    other = {ex.text: ex.label for ex in higher.train + higher.test}
    assert other.keys() == label_of.keys() and other != label_of  # another teacher
    # the cache answers without loading a model
    monkeypatch.setattr(planted, "teacher_outputs", lambda *a: pytest.fail("recomputed"))
    assert load_task_data(name, task="classification", seed=0).train == data.train


def test_head_readout_labels_follow_the_run_seeds_initial_head(
    tiny_bert_dir: Path, raflora_cache: Path
) -> None:
    name = f"planted:rank=4,classes=3,size=120,readout=head,model={tiny_bert_dir},max_length=16"
    first = load_task_data(name, task="classification", seed=0)
    second = load_task_data(name, task="classification", seed=1)
    assert len(list((raflora_cache / "planted").glob("*.json"))) == 2  # one per run seed
    labels = [{ex.text: ex.label for ex in d.train + d.test} for d in (first, second)]
    assert labels[0].keys() == labels[1].keys() and labels[0] != labels[1]  # another head
    assert np.bincount(list(labels[1].values()), minlength=3).min() >= 0.7 * 120 / 3
    with pytest.raises(ValueError, match="readout must be 'random' or 'head'"):
        parse_spec("planted:rank=4,readout=mlp")


def test_logit_targets_are_the_teachers_own_logits(
    tiny_bert_dir: Path, raflora_cache: Path
) -> None:
    """targets=logits, readout=head: with a vanishing planted update the targets are the base
    model's own logits (a forward pass of the student's initial model, computed here), and each
    label is their argmax."""
    from raflora.training.models import load_base_model

    name = (
        f"planted:rank=4,classes=5,size=60,readout=head,targets=logits,scale=1e-9,"
        f"model={tiny_bert_dir},max_length=16"
    )
    data = load_task_data(name, task="classification", seed=3)
    examples = data.train + data.test
    base, tokenizer = load_base_model(str(tiny_bert_dir), "classification", num_labels=5, seed=3)
    base.eval()
    batch = tokenizer(
        [ex.text for ex in examples], padding=True, truncation=True, max_length=16,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = base(**batch).logits.double().numpy()
    targets = np.array([ex.target for ex in examples])
    assert targets.shape == (60, 5)
    np.testing.assert_allclose(targets, expected, rtol=1e-4, atol=1e-6)
    assert [ex.label for ex in examples] == targets.argmax(1).tolist()
    assert "agreement with the teacher" in data.description
    with pytest.raises(ValueError, match="targets=logits regresses on the teacher's own logits"):
        parse_spec("planted:rank=4,targets=logits,labels=diff")
    with pytest.raises(ValueError, match="targets must be 'labels' or 'logits'"):
        parse_spec("planted:rank=4,targets=soft")


def test_logit_targets_train_by_mean_squared_error(tiny_bert_dir: Path) -> None:
    """batch_loss on a batch with targets is mean_{b,c}(logits − targets)², by hand."""
    from raflora.training.data import TextExample, encode_examples
    from raflora.training.local import batch_loss, evaluate
    from raflora.training.models import load_base_model

    base, tokenizer = load_base_model(str(tiny_bert_dir), "classification", num_labels=3, seed=0)
    base.eval()
    rows = [(0.5, -1.0, 2.0), (1.5, 0.0, -0.5)]
    examples = [
        TextExample("a fine film", 2, target=rows[0]),
        TextExample("dull", 0, target=rows[1]),
    ]
    data = encode_examples(examples, tokenizer=tokenizer, max_length=16)
    batch = data.collate([data[0], data[1]])
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = batch_loss(base, batch)
    by_hand = ((logits.double() - torch.tensor(rows).double()) ** 2).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    assert "targets" in batch  # the loss reads, never removes, the targets
    scores = evaluate(base, data, batch_size=2)
    assert scores["loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert scores["accuracy"] == ((logits.argmax(1) == torch.tensor([2, 0])).float().mean())
    with pytest.raises(ValueError, match="mix logit targets and plain labels"):
        encode_examples([examples[0], TextExample("x", 1)], tokenizer=tokenizer, max_length=16)
