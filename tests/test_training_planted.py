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
    monkeypatch.setattr(planted, "teacher_labels", lambda *a: pytest.fail("recomputed"))
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
