"""Paired significance tests on per-query scores: is model B's gain over model A on a task more than noise?

Both tests pair the two models on the same queries (d_i = b_i - a_i, n queries) and are two-sided:

- paired t-test: t = mean(d) / (sd(d) / sqrt(n)), sd with n - 1 degrees of freedom, p = P(|T_{n-1}| >= |t|).
  scipy.stats.ttest_rel when scipy is installed, else the same p from the regularised incomplete beta function,
  p = I_{df / (df + t^2)}(df / 2, 1 / 2) (Numerical Recipes, 3rd ed., section 6.4). All d_i equal: p = 1 when they
  are all 0 (no difference), else 0 (a constant shift is not noise).
- paired bootstrap (Efron & Tibshirani 1993, section 16.4; as used for IR by Sakai, SIGIR 2006): resample the n
  query indices with replacement ``n_resamples`` times under a fixed seed, so the same inputs always give the same
  p; each resample's mean difference m*, shifted to the null hypothesis (mean 0), gives
  p = share of resamples with |m* - mean(d)| >= |mean(d)|.

IR metrics per query are bounded and often tied, so neither test is exact; with tens of queries or more both are
the customary check (Smucker, Allan & Carterette, CIKM 2007, find them in close agreement).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired test: {len(a)} scores vs {len(b)}; pair them on the same queries")
    if len(a) < 2:
        raise ValueError(f"paired test: needs at least 2 paired queries, got {len(a)}")
    return np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes ``betacf``."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T_df| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of b against a (module docstring)."""
    d = _diffs(a, b)
    sd, mean = float(d.std(ddof=1)), float(d.mean())
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal differences (up to float rounding): no spread to test against
        return 1.0 if abs(mean) <= 1e-12 else 0.0
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        t = mean / (sd / math.sqrt(len(d)))
        return t_two_sided_p(t, len(d) - 1)
    return float(ttest_rel(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)).pvalue)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> float:
    """Two-sided p of the paired bootstrap of b against a (module docstring); deterministic for a given seed."""
    d = _diffs(a, b)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # in blocks: n x 1000 indices at a time bounds the memory
        stop = min(start + 1000, n_resamples)
        means[start:stop] = d[rng.integers(0, len(d), size=(stop - start, len(d)))].mean(axis=1)
    observed = float(d.mean())
    return float(np.mean(np.abs(means - observed) >= abs(observed)))
