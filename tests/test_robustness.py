"""Robustness, measured (issue 22): 10 clients of which one is hostile, three ways (a ×100-scaled
update, an inflated num-examples, a sign-flipped update boosted ×10; `faults.mode`), with the
defences on and off.

The bounds come from the all-honest run of the same seed, as a user would set them from an
honest run's metrics.json: ``max_total_update_norm`` = 2 × the largest contribution of any
client in any round, ``max_num_examples`` = 2 × the largest client. With them, every hostile
reply is rejected and named, so the run is exactly the run in which that client fails every
round, and its accuracy stays within 0.02 of the all-honest run. Without them the same hostile
client visibly damages the run (the global update's norm) or takes the aggregation weight.

The default suite runs it in-process on the tiny BERT (seconds); the slow test on the shipped
MiniLM, where accuracy means something.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.runs import run_in_process, tiny_config, without_timing
from raflora.config import load_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")

HOSTILE = 2  # partition id of the hostile client (rank 8 in the cycle 2, 4, 8)
MODES = {  # fault mode → (strength, words in every rejection of the defended run)
    "scale": (100.0, "exceeds max_total_update_norm"),
    "inflate": (100.0, "above federation.max_num_examples"),
    "signflip": (10.0, "exceeds max_total_update_norm"),
}
# what differs between a defended run and the run in which the hostile client fails instead
REASONS = {"failed", "failures", "rejected", "rejections"}


def honest_bounds(history: list[dict]) -> list[str]:
    """The defences, set from an honest run's metrics.json."""
    contribution = max(c["total"] for r in history[1:] for c in r["contributions"].values())
    largest = max(n for r in history[1:] for n in r["client_examples"].values())
    return [
        f"federation.max_total_update_norm={2 * contribution}",
        f"federation.max_num_examples={2 * largest}",
    ]


def without_reasons(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in REASONS} for r in without_timing(history)]


def run(make_config, run_dir: Path, *overrides: str) -> list[dict]:
    """metrics.json of an in-process run of ``make_config(*overrides)``."""
    return run_in_process(make_config(*overrides), run_dir, finish=False)["history"]


def honest_run(make_config, run_dir: Path) -> list[dict]:
    """The all-honest run, its contributions recorded (a bound no reply reaches)."""
    honest = run(make_config, run_dir, "federation.max_total_update_norm=1e9")
    assert all(r["rejected"] == 0 and r["failed"] == 0 for r in honest[1:])
    return honest


def check_robustness(
    make_config, honest: list[dict], tmp_path: Path, mode: str
) -> tuple[list[dict], list[dict]]:
    """`make_config(*overrides)`: the run's config; `honest`: its all-honest run. Returns the
    defended and the undefended run (the module docstring says what is checked)."""
    defences = honest_bounds(honest)
    strength, says = MODES[mode]
    hostile = [f"faults.mode={mode}", f"faults.clients=[{HOSTILE}]", f"faults.strength={strength}"]

    defended = run(make_config, tmp_path / "on", *hostile, *defences)
    for record in defended[1:]:
        assert list(record["rejections"]) == [str(HOSTILE)], record["rejections"]
        assert says in record["rejections"][str(HOSTILE)]
        assert str(HOSTILE) not in record["client_examples"]
    failing = run(
        make_config, tmp_path / "failing", f"faults.clients=[{HOSTILE}]", "faults.mode=raise",
        *defences,
    )  # fmt: skip
    assert without_reasons(defended) == without_reasons(failing)
    assert abs(defended[-1]["server_accuracy"] - honest[-1]["server_accuracy"]) <= 0.02

    undefended = run(make_config, tmp_path / "off", *hostile)
    assert all(r["rejected"] == 0 for r in undefended[1:])
    last, reference = undefended[-1], honest[-1]
    if mode == "inflate":  # the hostile client takes the weight
        examples = last["client_examples"]
        assert examples[str(HOSTILE)] / sum(examples.values()) > 0.8
    else:  # the global update is pushed far from where honest clients take it
        assert last["norm"] > 1.5 * reference["norm"], (last["norm"], reference["norm"])
    return defended, undefended


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with 10 clients for 3 rounds, and its all-honest run."""

    def make_config(*overrides: str):
        return tiny_config(
            tiny_bert_dir,
            "clients.num_clients=10",
            "federation.rounds=3",
            "data.train_size=300",
            "data.test_size=200",
            *overrides,
        )

    return make_config, honest_run(make_config, tmp_path_factory.mktemp("honest"))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_hostile_client_of_ten_on_a_tiny_model(tiny, tmp_path, mode: str) -> None:
    check_robustness(*tiny, tmp_path, mode)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """examples/tiny.toml (the shipped MiniLM) with 10 clients and 3 rounds, its honest run."""
    from helpers.runs import TINY

    def make_config(*overrides: str):
        return load_config(
            TINY,
            [
                "clients.num_clients=10",
                "federation.rounds=3",
                "data.train_size=1000",
                "data.test_size=300",
                *overrides,
            ],
        )

    honest = honest_run(make_config, tmp_path_factory.mktemp("honest"))
    assert honest[-1]["server_accuracy"] > honest[0]["server_accuracy"] + 0.05  # it learns
    return make_config, honest


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_hostile_client_of_ten_on_minilm(minilm, tmp_path, mode: str) -> None:
    check_robustness(*minilm, tmp_path, mode)
