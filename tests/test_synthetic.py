"""The synthetic experiment: outputs, determinism, partial participation, collapse claims."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest

from raflora.math import available_methods
from raflora.synthetic import SyntheticConfig, run, sample_clients, summarize

METRIC_KEYS = {
    "round",
    "rel_error",
    "top_rmin_energy",
    "target_top_rmin_energy",
    "partition_energy",
    "effective_rank",
}
SMALL = SyntheticConfig(m=16, n=12, target_rank=6, ranks=(1, 2, 2, 6), rounds=4, local_steps=3)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return run(SyntheticConfig(), out, progress=False), out


def test_default_run_shows_collapse_and_raflora_avoids_it(default_run):
    """The issue's acceptance claim on the default configuration."""
    results, _ = default_run
    target = results["raflora"]["target_top_rmin_energy"]
    assert 0.15 < target < 0.3  # most of the target's energy lies beyond r_min
    for method in ["flexlora", "zeropad"]:
        assert results[method]["top_rmin_energy"][-1] > target + 0.3, method
        assert results[method]["rel_error"][-1] > 0.5, method
    assert abs(results["raflora"]["top_rmin_energy"][-1] - target) < 0.05
    assert results["raflora"]["rel_error"][-1] < 0.05


def test_collapse_follows_the_predicted_retention(default_run):
    """FlexLoRA keeps direction i with weight c_i, so directions held by one client in ten
    (c = 0.1) carry almost nothing; raFLoRA's partitions match the target's shares."""
    results, out = default_run
    info = json.loads((out / "run.json").read_text())
    assert info["predicted_retention"][-1] == pytest.approx(0.1)
    target = info["target"]["partition_energy"]
    assert results["flexlora"]["partition_energy"][-1][3] < 0.1 * target[3]
    assert results["raflora"]["partition_energy"][-1] == pytest.approx(target, abs=0.02)


def test_default_outputs(default_run):
    results, out = default_run
    assert "fedit" not in results  # the default ranks differ
    assert set(results) == set(available_methods()) - {"fedit"}
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    for metrics in saved.values():
        assert set(metrics) == METRIC_KEYS
        assert metrics["round"] == list(range(1, 41))
        assert len(metrics["partition_energy"]) == 40
        assert all(len(row) == 5 for row in metrics["partition_energy"])  # 4 partitions + rest
    info = json.loads((out / "run.json").read_text())
    assert SyntheticConfig(**info["config"]) == SyntheticConfig()  # reloadable
    assert {"raflora", "numpy", "torch", "python"} <= set(info["versions"])
    assert "fedit" in info["skipped"]
    assert info["partition_bounds"] == [2, 4, 8, 16]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) * 40
    assert {"method", "round", "rel_error", "top_rmin_energy", "energy_9-16"} <= set(rows[0])
    for name in ["partition_energy.png", "rel_error.png"]:
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_numbers():
    assert run(SMALL, None, progress=False) == run(SMALL, None, progress=False)
    other = run(dataclasses.replace(SMALL, seed=1), None, progress=False)
    assert other["raflora"]["rel_error"] != run(SMALL, None, progress=False)["raflora"]["rel_error"]


def test_partial_participation(tmp_path):
    config = dataclasses.replace(SMALL, fraction=0.5, methods=("raflora", "flexlora"))
    rounds = [sample_clients(config, t) for t in range(1, 5)]
    assert all(len(c) == 2 and c == sorted(c) for c in rounds)
    assert len({tuple(c) for c in rounds}) > 1
    results = run(config, tmp_path, progress=False)
    assert set(results) == {"raflora", "flexlora"}
    assert all(len(r["rel_error"]) == 4 for r in results.values())


def test_carry_over_keeps_unsampled_directions():
    """Rounds where the rank-6 client is not sampled must not wipe directions 3–6."""
    base = dataclasses.replace(SMALL, fraction=0.5, rounds=12, methods=("raflora",))
    sampled_top = [max(base.ranks[k] for k in sample_clients(base, t)) for t in range(2, 13)]
    assert min(sampled_top) < 6  # the scenario happens with this seed
    kept = run(base, None, progress=False)["raflora"]
    lost = run(dataclasses.replace(base, carry_over=False), None, progress=False)["raflora"]
    for t, top in enumerate(sampled_top, start=2):
        if top < 6:  # directions 3–6 (partition index 2) survive only with carry-over
            assert kept["partition_energy"][t - 1][2] > 0.02
            assert lost["partition_energy"][t - 1][2] < 1e-3


def test_fedit_runs_with_equal_ranks_and_progress_bar():
    config = dataclasses.replace(SMALL, ranks=(2, 2, 2), rounds=2, methods=("fedit", "raflora"))
    results = run(config, None, progress=True)
    assert set(results) == {"fedit", "raflora"}
    # equal ranks: raflora aggregates like flexlora, and fedit averages B and A separately
    assert results["fedit"]["rel_error"] != results["raflora"]["rel_error"]


def test_merge_mode_flexlora_equals_flora():
    """flora and flexlora aggregate to the same product, so in merge mode they coincide."""
    config = dataclasses.replace(SMALL, methods=("flora", "flexlora"), apply="merge")
    results = run(config, None, progress=False)
    assert results["flora"]["rel_error"] == pytest.approx(results["flexlora"]["rel_error"])


def test_summarize(default_run):
    text = summarize(default_run[0])
    assert "raflora" in text and "flexlora" in text and "rel. error" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # columns aligned, whatever the names
    long = summarize({"flexlora_no_merge": default_run[0]["raflora"]}).splitlines()
    assert long[2].startswith("flexlora_no_merge ") and len(long[0]) == len(long[2])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"ranks": ()}, "ranks"),
        ({"ranks": (2, 0)}, r"ranks\[1\]"),
        ({"ranks": (2, 100)}, r"ranks\[1\]"),
        ({"target_rank": 65}, "target_rank"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"lr": -1.0}, "lr"),
        ({"rounds": 0}, "rounds"),
        ({"spectrum": "steep"}, "spectrum"),
        ({"carry_over": "some"}, "carry_over"),
        ({"methods": ("nope",)}, "methods"),
        ({"apply": "fold"}, "apply"),
        ({"sizes": (1.0, 2.0)}, "sizes"),
        ({"decay": 0.0}, "decay"),
        ({"non_iid": -0.1}, "non_iid"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(changes, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**changes)


def test_config_accepts_lists():
    config = SyntheticConfig(ranks=[2, 4], methods=["raflora"], sizes=[1, 3])
    assert config.ranks == (2, 4) and config.sizes == (1.0, 3.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_collapse_claims_hold_for_other_seeds(seed):
    results = run(SyntheticConfig(seed=seed), None, progress=False)
    target = results["raflora"]["target_top_rmin_energy"]
    for method in ["flexlora", "zeropad"]:
        assert results[method]["top_rmin_energy"][-1] > target + 0.3
    assert abs(results["raflora"]["top_rmin_energy"][-1] - target) < 0.05
    assert results["raflora"]["rel_error"][-1] < 0.05


@pytest.mark.slow
def test_partial_participation_needs_carry_over():
    """Half the clients per round: raflora converges only when it keeps the directions that no
    sampled client holds; without that it loses them like rblora."""
    config = SyntheticConfig(fraction=0.5, methods=("raflora", "flexlora"))
    kept = run(config, None, progress=False)
    lost = run(dataclasses.replace(config, carry_over=False), None, progress=False)
    target = kept["raflora"]["target_top_rmin_energy"]
    assert abs(kept["raflora"]["top_rmin_energy"][-1] - target) < 0.05
    assert kept["raflora"]["rel_error"][-1] < 0.1 < 0.3 < lost["raflora"]["rel_error"][-1]
    assert kept["flexlora"]["top_rmin_energy"][-1] > target + 0.3


def test_fedex_global_model_is_the_exact_mean_of_the_clients_models(tmp_path):
    """Round 1 starts every method from the same LoRA init, so the clients train the same
    factors: FedEx-LoRA's W + residual + B̄ Ā is their exact mean, FlexLoRA's Σ p_k B_k A_k;
    zero-padding's B̄ Ā alone is not. Later rounds differ (FedEx restarts from slices)."""
    config = dataclasses.replace(SMALL, methods=("fedex", "flexlora", "zeropad"))
    results = run(config, tmp_path, progress=False)
    first = {m: results[m]["rel_error"][0] for m in config.methods}
    assert first["fedex"] == pytest.approx(first["flexlora"], rel=1e-9)
    assert abs(first["zeropad"] - first["flexlora"]) > 1e-3
    assert results["fedex"]["rel_error"][1:] != results["flexlora"]["rel_error"][1:]
    notes = json.loads((tmp_path / "run.json").read_text())["notes"]
    assert "residual" in notes["fedex"] and "flexlora" not in notes
