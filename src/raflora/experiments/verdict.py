"""The paper's claims judged from a suite's paired runs: reproduced / not reproduced / undecided.

Every judgement is a set of paired comparisons (same seed: same data split, client ranks, LoRA
initialisation and client sampling), each a 95% t-interval of per-seed differences oriented so
that a positive difference supports the claim (`stats.paired_difference`). A claim is

- **reproduced** when every comparison's CI lies above 0,
- **not reproduced** when at least one comparison's CI lies below 0 (the data contradict it),
- **undecided** otherwise (some CI contains 0: not resolved at this number of seeds),
- **not assessed** when the suite has no runs to compare (e.g. one rank configuration only).

The comparisons are per setting (rank configuration · Dirichlet α · fraction per round) and per
comparator, uncorrected for multiplicity: with many comparisons a claim is "reproduced" only if
all of them agree, which is conservative. The claims (seed paper, arXiv 2602.13486):

- collapse: rank-agnostic aggregation concentrates the global update's energy in the top r_min
  directions and raFLoRA prevents it — top-r_min energy of the methods whose aggregation the
  theory predicts to suppress (``Method.retention == "c_i"``: FlexLoRA) minus raFLoRA's, in every
  heterogeneous rank configuration;
- accuracy: raFLoRA improves final test accuracy over the heterogeneous-rank baselines —
  raFLoRA minus each baseline, every setting;

(The "score" compared for accuracy, sensitivity and headroom is the suite's ``metric``: final
test accuracy, or minus the final test loss, so that higher is better either way.)
- sensitivity: raFLoRA is less sensitive to the rank configuration — per seed, the spread
  (max − min) of the final score over the rank configurations, baseline minus raFLoRA;
- participation: fewer clients per round worsen the suppression — a c_i method's top-r_min
  energy at the smallest fraction minus at full participation (same seed and rank configuration);
- communication: raFLoRA sends no more than the baselines — bytes per round of each baseline
  divided by raFLoRA's, minus 1 (≥ 0 supports; bytes are deterministic, so equal counts support).

Baselines are the suite's heterogeneous-rank methods other than raFLoRA (and its variants), the
homogeneous references fedit@r_max / fedit@r_min and the controls in `CONTROLS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raflora.experiments.stats import Interval, direction, mean_ci, paired_difference

REFERENCE = "raflora"
CONTROLS = frozenset({"flexlora_nm"})  # ablations of this project, not published baselines
HEADROOM = ("fedit@r_max", "fedit@r_min")
OUTCOMES = ("better", "undecided", "worse")
Setting = tuple  # (rank configuration, α or None, fraction)
Data = Mapping[Setting, Mapping[str, Mapping[int, Mapping[str, Any]]]]


@dataclass(frozen=True)
class Roles:
    """What each method label of a suite is for the verdict."""

    baselines: tuple[str, ...]  # heterogeneous-rank methods raFLoRA is compared with
    suppressing: tuple[str, ...]  # baselines whose aggregation predicts c_i suppression
    rank_configs: Mapping[str, Sequence[int]]
    metric: str = "accuracy"  # the suite's: what "score" (higher is better) is

    @property
    def score_text(self) -> str:
        return "final test accuracy" if self.metric == "accuracy" else "−(final test loss)"

    @property
    def score_format(self) -> str:
        """Accuracies to 3 decimals; losses (e.g. a distillation MSE of 1e-4) to 3 digits."""
        return ".3f" if self.metric == "accuracy" else ".3g"

    def heterogeneous(self, setting: Setting) -> bool:
        return len(set(self.rank_configs[setting[0]])) > 1


def roles_of(suite: Any) -> Roles:
    """Baselines and suppressing methods among a `Suite`'s labels (registry-driven)."""
    baselines, suppressing = [], []
    for label in suite.labels():
        variant = suite.variant(label)
        method = suite.method_of(label)
        # the method under test, and references that cannot run heterogeneous ranks
        if variant.ranks != "config" or variant.method == REFERENCE or method.equal_ranks:
            continue
        if label in CONTROLS or variant.method in CONTROLS:
            continue
        baselines.append(label)
        if method.retention == "c_i":
            suppressing.append(label)
    return Roles(tuple(baselines), tuple(suppressing), dict(suite.rank_configs), suite.suite.metric)


@dataclass(frozen=True)
class Comparison:
    """One paired comparison; ``diff`` is oriented so that > 0 supports the claim."""

    where: str
    other: str
    diff: Interval
    exact: str | None = None  # the outcome of an exact (noise-free) comparison

    @property
    def outcome(self) -> str:
        return self.exact or direction(self.diff)


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    verdict: str
    numbers: str
    comparisons: tuple[Comparison, ...] = ()


def combine(outcomes: Sequence[str]) -> str:
    """All supporting → reproduced; any contradicting → not reproduced; else undecided."""
    if not outcomes:
        return "not assessed"
    if all(o == "better" for o in outcomes):
        return "reproduced"
    if any(o == "worse" for o in outcomes):
        return "not reproduced"
    return "undecided"


def where(setting: Setting) -> str:
    rank_config, alpha, fraction = setting
    alpha_text = "" if alpha is None else f", α {alpha:g}"
    return f"{rank_config}{alpha_text}, f {fraction:g}"


def _values(seeds: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, float | None]:
    return {seed: metrics.get(key) for seed, metrics in seeds.items()}


def _paired(
    data: Data, setting: Setting, a: str, b: str, key: str, scale: float = 1.0
) -> Interval | None:
    """scale · (a − b) of ``key`` over the seeds both labels have in ``setting``."""
    by_method = data.get(setting, {})
    if a not in by_method or b not in by_method:
        return None
    diff = paired_difference(_values(by_method[a], key), _values(by_method[b], key))
    if diff is None:
        return None
    return Interval(scale * diff.mean, abs(scale) * diff.half, diff.n)


def _numbers(comparisons: Sequence[Comparison], fmt: str, what: str) -> str:
    """Short text: each comparison when few, else counts and per-comparator ranges."""
    if not comparisons:
        return "–"
    if len(comparisons) <= 3:
        return "; ".join(
            f"{what} {c.other} ({c.where}): {c.diff.text(fmt, signed=True)}, n={c.diff.n}"
            for c in comparisons
        )
    counts = {o: sum(c.outcome == o for c in comparisons) for o in OUTCOMES}
    parts = [
        f"{counts['better']} supporting / {counts['undecided']} undecided / "
        f"{counts['worse']} contradicting of {len(comparisons)} paired comparisons"
    ]
    for other in dict.fromkeys(c.other for c in comparisons):
        mine = [c for c in comparisons if c.other == other]
        lo = min(c.diff.mean for c in mine)
        hi = max(c.diff.mean for c in mine)
        span = format(lo, "+" + fmt) if lo == hi else f"{lo:+{fmt}}…{hi:+{fmt}}"
        tally = "/".join(str(sum(c.outcome == o for c in mine)) for o in OUTCOMES)
        parts.append(f"{what} {other}: {span} ({tally})")
    return "; ".join(parts)


def _claim(
    name: str, statement: str, comparisons: list[Comparison], fmt: str, what: str, missing: str
) -> Claim:
    verdict = combine([c.outcome for c in comparisons])
    numbers = _numbers(comparisons, fmt, what) if comparisons else missing
    return Claim(name, statement, verdict, numbers, tuple(comparisons))


def collapse(data: Data, roles: Roles) -> Claim:
    found = [
        Comparison(where(s), other, diff)
        for s in data
        if roles.heterogeneous(s)
        for other in roles.suppressing
        if (diff := _paired(data, s, other, REFERENCE, "top_rmin_energy")) is not None
    ]
    return _claim(
        "collapse",
        "top-r_min energy share of the final global update: c_i baseline − raFLoRA > 0",
        found,
        ".3f",
        "Δ energy",
        "no heterogeneous setting with raflora and a c_i method (flexlora)",
    )


def accuracy(data: Data, roles: Roles) -> Claim:
    found = [
        Comparison(where(s), other, diff)
        for s in data
        for other in roles.baselines
        if (diff := _paired(data, s, REFERENCE, other, "score")) is not None
    ]
    return _claim(
        "accuracy",
        f"{roles.score_text}: raFLoRA − baseline > 0",
        found,
        roles.score_format,
        "raflora −",
        "no setting with raflora and a heterogeneous baseline",
    )


def _spreads(data: Data, group: Sequence[Setting], label: str, seeds: set[int]) -> dict[int, float]:
    """Per seed: max − min of the score over the settings of ``group``."""
    out = {}
    for seed in seeds:
        values = [data[s][label][seed].get("score") for s in group]
        if all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
            out[seed] = max(values) - min(values)
    return out


def sensitivity(data: Data, roles: Roles) -> Claim:
    found = []
    for alpha, fraction in dict.fromkeys((s[1], s[2]) for s in data):
        for other in roles.baselines:
            group = [
                s
                for s in data
                if (s[1], s[2]) == (alpha, fraction) and REFERENCE in data[s] and other in data[s]
            ]
            if len(group) < 2:
                continue
            seeds = set.intersection(
                *(set(data[s][REFERENCE]) & set(data[s][other]) for s in group)
            )
            diff = paired_difference(
                _spreads(data, group, other, seeds), _spreads(data, group, REFERENCE, seeds)
            )
            if diff is not None:
                configs = "/".join(s[0] for s in group)
                text = where((configs, alpha, fraction))
                found.append(Comparison(text, other, diff))
    return _claim(
        "sensitivity",
        f"spread (max − min) of {roles.score_text} over rank configurations: "
        "baseline − raFLoRA > 0",
        found,
        roles.score_format,
        "Δ spread",
        "fewer than two rank configurations with raflora and a baseline",
    )


def participation(data: Data, roles: Roles) -> Claim:
    found = []
    for rank_config, alpha in dict.fromkeys((s[0], s[1]) for s in data):
        fractions = sorted(f for (rc, a, f) in data if (rc, a) == (rank_config, alpha))
        if len(fractions) < 2 or fractions[-1] != 1.0 or not roles.heterogeneous((rank_config,)):
            continue
        low, full = (rank_config, alpha, fractions[0]), (rank_config, alpha, 1.0)
        for other in roles.suppressing:
            if other not in data[low] or other not in data[full]:
                continue
            diff = paired_difference(
                _values(data[low][other], "top_rmin_energy"),
                _values(data[full][other], "top_rmin_energy"),
            )
            if diff is not None:
                text = f"{where(low)} vs f 1"
                found.append(Comparison(text, other, diff))
    return _claim(
        "participation",
        "top-r_min energy of a c_i method: smallest fraction − full participation > 0",
        found,
        ".3f",
        "Δ energy of",
        "no c_i method (flexlora) at full and partial participation",
    )


def communication(data: Data, roles: Roles) -> Claim:
    found = []
    for setting, by_method in data.items():
        if REFERENCE not in by_method:
            continue
        mine = _values(by_method[REFERENCE], "bytes_per_round")
        for other in roles.baselines:
            if other not in by_method:
                continue
            theirs = _values(by_method[other], "bytes_per_round")
            ratios = [
                theirs[s] / mine[s] - 1.0  # type: ignore[operator]
                for s in sorted(set(mine) & set(theirs))
                if mine[s] and theirs[s] is not None
            ]
            got = mean_ci(ratios)
            if got is None:
                continue
            # byte counts are exact, not noisy: equal counts support "no more than"
            outcome = (
                "better"
                if min(ratios) >= -1e-9
                else "worse"
                if max(ratios) < -1e-9
                else "undecided"
            )
            found.append(Comparison(where(setting), other, got, outcome))
    return _claim(
        "communication",
        "bytes per round: baseline / raFLoRA − 1 ≥ 0 (exact counts, no CI needed)",
        found,
        ".3f",
        "bytes ratio − 1,",
        "no setting with raflora and a baseline",
    )


CLAIMS: tuple[Callable[[Data, Roles], Claim], ...] = (
    collapse,
    accuracy,
    sensitivity,
    participation,
    communication,
)


def claims(data: Data, roles: Roles) -> list[Claim]:
    """Every claim's verdict, in the order of `CLAIMS`."""
    return [judge(data, roles) for judge in CLAIMS]


@dataclass(frozen=True)
class Headroom:
    """fedit@r_max − fedit@r_min score in one (α, fraction, r_max, r_min) setting."""

    where: str
    r_max: Interval | None
    r_min: Interval | None
    diff: Interval | None

    @property
    def flag(self) -> str:
        """``yes`` when the CI of the paired difference lies above 0, else ``no``."""
        if self.diff is None or not self.diff.excludes_zero():
            return "no (CI contains 0)" if self.diff is not None and self.diff.n > 1 else "no"
        return "yes" if self.diff.lo > 0 else "no (r_min better)"


def headroom(data: Data, roles: Roles) -> list[Headroom]:
    """The headroom check per distinct (α, fraction, r_max, r_min); shared runs count once."""
    out, seen = [], set()
    high, low = HEADROOM
    for setting, by_method in data.items():
        if high not in by_method or low not in by_method:
            continue
        ranks = roles.rank_configs[setting[0]]
        key = (setting[1], setting[2], max(ranks), min(ranks))
        if key in seen:
            continue
        seen.add(key)
        alpha = "" if setting[1] is None else f"α {setting[1]:g}, "
        text = f"r {max(ranks)} vs {min(ranks)}, {alpha}f {setting[2]:g}"
        finals = {m: _values(by_method[m], "score") for m in HEADROOM}
        out.append(
            Headroom(
                text,
                mean_ci(finals[high].values()),
                mean_ci(finals[low].values()),
                paired_difference(finals[high], finals[low]),
            )
        )
    return out
