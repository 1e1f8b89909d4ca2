"""Confidence intervals across seeds: mean +- t(0.975, n-1) s / sqrt(n), and the same on paired differences.

No SciPy needed: the Student-t quantile is found by bisection on the t
distribution function, which is written with the regularised incomplete beta
function (continued fraction, evaluated with Lentz's method). Accurate to
about 1e-12, which the tests check against SciPy's ``t.ppf`` when SciPy is
installed and against printed table values otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1, a, b > 0."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``scipy.stats.t.ppf(p, df)``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided Student-t confidence interval (None bounds when n < 2)."""

    mean: float
    n: int
    std: Optional[float]  # sample standard deviation (n - 1 in the denominator)
    half_width: Optional[float]
    confidence: float = 0.95

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width

    def excludes_zero(self) -> Optional[bool]:
        """True when the interval lies strictly on one side of zero; None when there is no interval."""
        if self.half_width is None:
            return None
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": self.n, "std": self.std, "half_width": self.half_width,
                "low": self.low, "high": self.high, "confidence": self.confidence}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean +- t((1 + confidence) / 2, n - 1) * s / sqrt(n)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, n, None, None, confidence)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, n, std, half, confidence)


def paired_interval(baseline: Mapping[int, float], other: Mapping[int, float], confidence: float = 0.95) -> Interval:
    """Interval of ``other - baseline`` computed on the per-seed differences (seeds present in both)."""
    seeds = sorted(set(baseline) & set(other))
    if not seeds:
        raise ValueError("no seed is present in both arms")
    return mean_interval([other[s] - baseline[s] for s in seeds], confidence)
