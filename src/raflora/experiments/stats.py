"""Confidence intervals over seeds: Student's t quantile, mean ± t·s/√n, paired differences.

No SciPy: the t distribution's CDF is the regularised incomplete beta function
``F(t; ν) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½)`` for t ≥ 0 (Abramowitz & Stegun 26.7.1), evaluated
with the continued fraction of Numerical Recipes (``betacf``, modified Lentz), and the quantile
is found by bisection on that CDF (to ~1e-12). tests/test_experiments_stats.py checks the
quantiles against printed t tables (e.g. t_{0.975, 4} = 2.776).

A paired difference pairs two methods' values of the same seed (same data split, client ranks,
LoRA initialisation and client sampling) and takes the CI of the per-seed differences; it is
tighter than comparing the two unpaired CIs whenever seeds move both methods the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

LEVEL = 0.95
Direction = Literal["better", "worse", "undecided"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), x < (a+1)/(a+b+2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1] (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t distribution: degrees of freedom must be > 0 (got {df})")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (e.g. p = 0.975)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile: p must lie in (0, 1) (got {p})")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with the half-width of its confidence interval (NaN for n = 1)."""

    mean: float
    half: float
    n: int

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (never for n = 1)."""
        return not math.isnan(self.half) and (self.lo > 0 or self.hi < 0)

    def text(self, fmt: str = ".3f", signed: bool = False) -> str:
        """``0.712 [0.680, 0.744]`` (or the mean alone for one seed)."""
        sign = "+" if signed else ""
        mean = format(self.mean, sign + fmt)
        if math.isnan(self.half):
            return mean
        return f"{mean} [{format(self.lo, sign + fmt)}, {format(self.hi, sign + fmt)}]"


def _numbers(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_ci(values: Iterable[float | None], level: float = LEVEL) -> Interval | None:
    """Mean and t-interval half-width ``t_{(1+level)/2, n−1} · s / √n`` (s: sample std, ddof
    1) of the values that are numbers; None when there are none."""
    clean = _numbers(values)
    n = len(clean)
    if n == 0:
        return None
    mean = math.fsum(clean) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in clean) / (n - 1))
    return Interval(mean, t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n), n)


def paired_difference(
    a: Mapping[int, float | None], b: Mapping[int, float | None], level: float = LEVEL
) -> Interval | None:
    """CI of a − b over the seeds both have a number for (``{seed: value}`` each)."""
    seeds = sorted(s for s in set(a) & set(b) if _numbers([a[s]]) and _numbers([b[s]]))
    return mean_ci([float(a[s]) - float(b[s]) for s in seeds], level)  # type: ignore[arg-type]


def direction(diff: Interval | None, higher_is_better: bool = True) -> Direction:
    """``better`` / ``worse`` when the CI of a difference excludes 0, else ``undecided``."""
    if diff is None or not diff.excludes_zero():
        return "undecided"
    return "better" if (diff.lo > 0) == higher_is_better else "worse"
