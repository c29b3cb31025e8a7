"""Confidence bounds for the gate (and anyone else who needs one): pure, stdlib only.

Contract: the one home of tether's interval math.
- `wilson_interval(successes, n, confidence)`: the Wilson score interval of a binomial
  proportion (Wilson 1927; Agresti & Coull 1998 recommend it over the normal "Wald" interval,
  which collapses to a point at 0/n and n/n and undercovers at small n).
- `t_quantile(p, df)`: Student's t quantile (no scipy here: the regularized incomplete beta by
  its continued fraction, inverted by bisection; exact to ~1e-10).
- `mean_bound(values, confidence)`: the two-sided t interval of a mean (a paired difference).
- `sample_sd(values)`: the (n - 1) standard deviation.
- `clustered_stderr(groups)`: the standard error of a mean over samples that come in groups
  (a prompt's samples), each group one independent draw.
- `welch_bound(a, b, confidence)`: the t interval of mean(a) - mean(b) for two independent
  samples with unequal variances (Welch 1947, Welch-Satterthwaite degrees of freedom).
Every interval is two-sided at `confidence`; the gate reads its lower end, so a 0.95 interval
is a one-sided 97.5% bound, the conservative reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def normal_quantile(p: float) -> float:
    """Standard normal quantile (1.959964 for p = 0.975)."""
    return NormalDist().inv_cdf(p)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (lower, upper) for `successes` of `n` Bernoulli trials.

    centre = (p + z^2/2n) / (1 + z^2/n),  half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2),
    with p = successes/n and z the two-sided normal quantile. n = 0 carries no information:
    (0, 1).
    """
    _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = normal_quantile(0.5 + confidence / 2)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0/n and n/n the formula's end is 0 or 1 exactly; say so instead of 1e-17.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return lower, upper


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-14
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2)/2 for t >= 0."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p (bisection on `t_cdf`; 12.7062 for p=0.975, df=1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class MeanBound:
    """A mean (or a difference of means) with its two-sided t interval."""

    n: int
    """Units behind the estimate (paired: prompts; Welch: the smaller sample)."""
    estimate: float
    stderr: float
    df: float
    lower: float
    upper: float


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _bound(n: int, estimate: float, stderr: float, df: float, confidence: float) -> MeanBound:
    if n < 2 or not math.isfinite(df):
        # One unit says nothing about spread: the interval is unbounded.
        return MeanBound(n, estimate, math.inf, 0.0, -math.inf, math.inf)
    if stderr == 0.0:
        # No spread at all (every paired difference equal): the data pin the mean.
        return MeanBound(n, estimate, 0.0, df, estimate, estimate)
    q = t_quantile(0.5 + confidence / 2, df)
    return MeanBound(n, estimate, stderr, df, estimate - q * stderr, estimate + q * stderr)


def mean_bound(values: Sequence[float], confidence: float = 0.95) -> MeanBound:
    """Two-sided t interval of the mean of `values` (e.g. paired differences): mean ± t * s/sqrt(n)."""
    _check_confidence(confidence)
    n = len(values)
    if n == 0:
        return MeanBound(0, math.nan, math.inf, 0.0, -math.inf, math.inf)
    mean = sum(values) / n
    return _bound(n, mean, sample_sd(values) / math.sqrt(n), n - 1.0, confidence)


def welch_bound(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int,
                confidence: float = 0.95) -> MeanBound:
    """Two-sided Welch t interval of mean_a - mean_b from summary statistics.

    se = sqrt(sd_a^2/n_a + sd_b^2/n_b); df = se^4 / ((sd_a^2/n_a)^2/(n_a-1) + (sd_b^2/n_b)^2/(n_b-1)).
    """
    _check_confidence(confidence)
    n = min(n_a, n_b)
    if n < 2:
        return MeanBound(n, mean_a - mean_b if n else math.nan, math.inf, 0.0, -math.inf, math.inf)
    va, vb = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1)) if se > 0 else float(n_a + n_b - 2)
    return _bound(n, mean_a - mean_b, se, df, confidence)


def clustered_stderr(groups: Sequence[Sequence[float]]) -> float:
    """Standard error of the mean of all values, the groups (e.g. each prompt's samples) being
    the independent draws: sqrt(G/(G-1) * sum_g (sum_i (y_gi - ybar))^2) / N, the cluster-robust
    (CR1) variance of a mean. With one sample per group it is the familiar s/sqrt(N); samples of
    one prompt share its difficulty, so they count for less than as many separate prompts.
    NaN with fewer than two non-empty groups (no spread between draws to measure)."""
    rows = [list(g) for g in groups if len(g)]
    n = sum(len(g) for g in rows)
    if len(rows) < 2:
        return math.nan
    mean = sum(sum(g) for g in rows) / n
    between = sum(sum(v - mean for v in g) ** 2 for g in rows)
    return math.sqrt(len(rows) / (len(rows) - 1) * between) / n
