"""Confidence intervals (t quantiles against printed tables and closed forms), paired
differences, and the verdict on the paper's claims from hand-made per-seed metrics."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from raflora.experiments.stats import (
    Interval,
    betainc,
    direction,
    mean_ci,
    paired_difference,
    t_cdf,
    t_quantile,
)
from raflora.experiments.verdict import Roles, claims, combine, headroom

# --------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [  # two-sided 95 % / 99 % and one-sided 90 % / 95 % critical values, printed t tables
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 9, 2.262),
        (0.975, 30, 2.042),
        (0.975, 120, 1.980),
        (0.995, 4, 4.604),
        (0.95, 10, 1.812),
        (0.9, 5, 1.476),
    ],
)
def test_t_quantile_matches_printed_tables(p: float, df: int, table: float) -> None:
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), abs=1e-10)


def test_t_cdf_closed_forms_and_normal_limit() -> None:
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/π; df = 2: F(t) = 1/2 + t / (2 √(2 + t²))
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # normal quantile
    assert t_quantile(0.5, 3) == 0.0
    # the incomplete beta function: I_x(1, 1) = x, I_x(a, 1) = x^a, I_x(a, b) = 1 − I_{1−x}(b, a)
    assert betainc(1, 1, 0.3) == pytest.approx(0.3)
    assert betainc(2.5, 1, 0.6) == pytest.approx(0.6**2.5)
    assert betainc(2, 3, 0.8) == pytest.approx(1 - betainc(3, 2, 0.2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: t_quantile(1.0, 3), "p must lie in"),
        (lambda: t_quantile(0.975, 0), "degrees of freedom must be > 0"),
        (lambda: betainc(1, 1, 1.5), "x must lie in"),
    ],
)
def test_bad_arguments_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- intervals


def test_mean_ci_is_mean_plus_minus_t_s_over_root_n() -> None:
    got = mean_ci([1.0, 2.0, None, 3.0, 4.0, float("nan"), 5.0])
    assert got is not None and got.n == 5 and got.mean == pytest.approx(3.0)
    assert got.half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert (got.lo, got.hi) == pytest.approx((3 - got.half, 3 + got.half))
    assert got.text(".2f") == "3.00 [1.04, 4.96]"
    one = mean_ci([0.7])
    assert one is not None and math.isnan(one.half) and one.text() == "0.700"
    assert not one.excludes_zero()
    assert mean_ci([None]) is None


def test_paired_difference_pairs_by_seed_and_is_tighter_than_unpaired() -> None:
    # seed effects (0.1, 0.3, 0.5, 0.2) shared by both methods, a constant gap of 0.02 ± noise
    a = {0: 0.72, 1: 0.91, 2: 1.12, 3: 0.83, 7: 0.5}  # seed 7 has no partner: ignored
    b = {0: 0.70, 1: 0.90, 2: 1.10, 3: 0.80, 5: 0.3}
    diff = paired_difference(a, b)
    assert diff is not None and diff.n == 4
    by_hand = [0.02, 0.01, 0.02, 0.03]
    mean = sum(by_hand) / 4
    std = math.sqrt(sum((d - mean) ** 2 for d in by_hand) / 3)
    assert diff.mean == pytest.approx(mean)
    assert diff.half == pytest.approx(3.182446 * std / 2, rel=1e-6)  # t_{0.975, 3}
    assert direction(diff) == "better" and direction(diff, higher_is_better=False) == "worse"
    unpaired = mean_ci([a[s] for s in range(4)])
    assert unpaired is not None and unpaired.half > 10 * diff.half
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert direction(None) == "undecided"
    assert direction(Interval(0.01, 0.02, 5)) == "undecided"
    assert direction(Interval(-0.05, 0.02, 5)) == "worse"


# --------------------------------------------------------------------------- verdict

UNIFORM, SKEWED = ("uniform", None, 1.0), ("skewed", None, 1.0)
PARTIAL = ("uniform", None, 0.3)
ROLES = Roles(
    baselines=("flexlora", "zeropad"),
    suppressing=("flexlora",),
    rank_configs={"uniform": [2, 4, 8], "skewed": [2, 2, 8], "homogeneous": [4]},
)


def runs(values: dict[str, list[float]], **constant: float) -> dict[int, dict[str, float]]:
    """{seed: metrics} from per-seed value lists."""
    seeds = len(next(iter(values.values())))
    return {s: {k: v[s] for k, v in values.items()} | constant for s in range(seeds)}


def test_verdicts_follow_the_paired_comparisons() -> None:
    data = {
        UNIFORM: {
            "raflora": runs(
                {"score": [0.80, 0.70, 0.75], "top_rmin_energy": [0.5, 0.6, 0.55]},
                bytes_per_round=100.0,
            ),
            "flexlora": runs(
                {"score": [0.70, 0.62, 0.67], "top_rmin_energy": [0.9, 0.95, 0.93]},
                bytes_per_round=100.0,
            ),
            "zeropad": runs(
                {"score": [0.82, 0.66, 0.70], "top_rmin_energy": [0.9, 0.9, 0.9]},
                bytes_per_round=100.0,
            ),
            "fedit@r_max": runs({"score": [0.85, 0.80, 0.82]}),
            "fedit@r_min": runs({"score": [0.60, 0.58, 0.61]}),
        },
        SKEWED: {
            "raflora": runs({"score": [0.78, 0.69, 0.74]}, bytes_per_round=80.0),
            "flexlora": runs({"score": [0.60, 0.52, 0.57]}, bytes_per_round=80.0),
        },
        PARTIAL: {
            "flexlora": runs({"top_rmin_energy": [0.95, 0.99, 0.97]}),
        },
    }
    # Execute
    judged = {c.name: c for c in claims(data, ROLES)}
    # Assert
    assert judged["collapse"].verdict == "reproduced"  # flexlora − raflora energy: +0.4 each
    (only,) = judged["collapse"].comparisons
    assert only.diff.mean == pytest.approx((0.4 + 0.35 + 0.38) / 3)
    # raflora − flexlora: better in both settings; raflora − zeropad: (−0.02, 0.04, 0.05)
    accuracy = judged["accuracy"]
    assert accuracy.verdict == "undecided"
    assert [(c.where, c.other, c.outcome) for c in accuracy.comparisons] == [
        ("uniform, f 1", "flexlora", "better"),
        ("uniform, f 1", "zeropad", "undecided"),
        ("skewed, f 1", "flexlora", "better"),
    ]
    # spreads over {uniform, skewed}: flexlora (0.10, 0.10, 0.10), raflora (0.02, 0.01, 0.01)
    (spread,) = judged["sensitivity"].comparisons
    assert spread.diff.mean == pytest.approx((0.08 + 0.09 + 0.09) / 3)
    assert spread.outcome == "better" and judged["sensitivity"].verdict == "reproduced"
    # flexlora's energy at f 0.3 minus at f 1: (0.05, 0.04, 0.04)
    assert judged["participation"].verdict == "reproduced"
    assert judged["communication"].verdict == "reproduced"  # equal bytes support "no more"
    assert "n=3" in judged["collapse"].numbers and "+0.377" in judged["collapse"].numbers
    (room,) = headroom(data, ROLES)
    assert room.flag == "yes" and room.diff is not None
    assert room.diff.mean == pytest.approx((0.25 + 0.22 + 0.21) / 3)


def test_contradicted_missing_and_single_seed_claims() -> None:
    data = {
        UNIFORM: {
            "raflora": runs({"score": [0.6, 0.5, 0.55]}, bytes_per_round=120.0),
            "flexlora": runs({"score": [0.7, 0.62, 0.66]}, bytes_per_round=100.0),
            "fedit@r_max": runs({"score": [0.7]}),
            "fedit@r_min": runs({"score": [0.6]}),
        },
        ("homogeneous", None, 1.0): {"raflora": runs({"top_rmin_energy": [1.0]})},
    }
    judged = {c.name: c for c in claims(data, ROLES)}
    assert judged["accuracy"].verdict == "not reproduced"  # raflora worse in every seed
    assert judged["communication"].verdict == "not reproduced"  # raflora sends 20 % more
    for name in ("collapse", "sensitivity", "participation"):
        assert judged[name].verdict == "not assessed", name
        assert judged[name].numbers.startswith("no ") or "fewer" in judged[name].numbers
    (room,) = headroom(data, ROLES)
    assert room.flag == "no" and room.diff is not None and room.diff.n == 1


def test_combine() -> None:
    assert combine([]) == "not assessed"
    assert combine(["better", "better"]) == "reproduced"
    assert combine(["better", "undecided"]) == "undecided"
    assert combine(["better", "undecided", "worse"]) == "not reproduced"


def test_score_is_accuracy_or_minus_the_loss() -> None:
    """metric = loss compares −final_loss, so that higher is better for every statistic."""
    from raflora.experiments.results import RunResult, run_metrics, score

    summary = {"final_accuracy": 0.7, "final_loss": 0.25}
    assert score(summary) == 0.7 and score(summary, "loss") == -0.25
    assert score({"final_accuracy": None, "final_loss": None}, "loss") is None
    result = RunResult("r", summary, history=[])
    assert run_metrics(result, [2, 4], "loss")["score"] == -0.25
    # r_max's loss 0.2 vs r_min's 0.3 each seed: headroom of +0.1 in the score
    lossy = replace(ROLES, metric="loss")
    data = {
        UNIFORM: {
            "fedit@r_max": runs({"score": [-0.2, -0.21, -0.19]}),
            "fedit@r_min": runs({"score": [-0.3, -0.3, -0.31]}),
        }
    }
    (room,) = headroom(data, lossy)
    assert room.flag == "yes" and room.diff.mean == pytest.approx(0.1 + 0.01 / 3)
    assert lossy.score_text == "−(final test loss)" and ROLES.score_text == "final test accuracy"


def test_loss_scores_are_printed_to_three_significant_digits() -> None:
    lossy = replace(ROLES, metric="loss")
    assert lossy.score_format == ".3g" and ROLES.score_format == ".3f"
    assert Interval(-0.000412, 0.00002, 5).text(lossy.score_format) == (
        "-0.000412 [-0.000432, -0.000392]"
    )
