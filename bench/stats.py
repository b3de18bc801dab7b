"""Statistics for RL benchmark tables: mean with a percentile-bootstrap 95% interval, interquartile mean.

Seeds are the unit of replication: every function takes one value per seed (or per run). With few seeds the
bootstrap interval is optimistic; the tables therefore also print n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% of the sorted values (a fraction of a value is weighted
    in at each end, as in Agarwal et al. 2021). Equals the mean for n <= 2."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return math.nan
    if n <= 2:
        return float(x.mean())
    lo, hi = 0.25 * n, 0.75 * n
    w = np.clip(np.minimum(np.arange(1, n + 1), hi) - np.maximum(np.arange(n), lo), 0.0, 1.0)
    return float((w * x).sum() / w.sum())


def bootstrap_ci(values: Sequence[float], stat=np.mean, n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over resamples of ``values`` (seeded: reproducible)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    if stat is np.mean:
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([stat(x[i]) for i in idx])
    a = (1.0 - level) / 2.0
    return float(np.quantile(boots, a)), float(np.quantile(boots, 1.0 - a))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, mean, its 95% bootstrap interval, IQM, min and max of one value per seed."""
    x = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    lo, hi = bootstrap_ci(x)
    return {"n": len(x), "mean": float(np.mean(x)) if x else math.nan, "ci_lo": lo, "ci_hi": hi, "iqm": iqm(x),
            "min": float(min(x)) if x else math.nan, "max": float(max(x)) if x else math.nan}


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]], n_boot: int = 2000):
    """Align curves of (x, y) points by index (the same evaluation schedule) and return x, the mean and the
    95% bootstrap band at each point, over the curves that reach it."""
    length = max((len(c) for c in curves), default=0)
    xs, mean, lo, hi = [], [], [], []
    for i in range(length):
        pts = [c[i] for c in curves if len(c) > i]
        ys = [p[1] for p in pts]
        xs.append(float(np.mean([p[0] for p in pts])))
        mean.append(float(np.mean(ys)))
        a, b = bootstrap_ci(ys, n_boot=n_boot)
        lo.append(a)
        hi.append(b)
    return np.array(xs), np.array(mean), np.array(lo), np.array(hi)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a success rate (k of n episodes): unlike the normal approximation it stays in
    [0, 1] and is not empty at 0 or n successes. (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends (the float sum leaves ~1e-17)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test on paired binary outcomes: ``b`` pairs where only the first succeeded,
    ``c`` where only the second did. Under the null each discordant pair goes either way with probability 1/2,
    so p = min(1, 2 P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2). 1.0 when there is no discordant pair."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def discordant(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int]:
    """(b, c) of paired outcomes: b = first succeeded and second failed, c = the reverse."""
    x, y = np.asarray(first, bool), np.asarray(second, bool)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes need the same length, got {x.shape} and {y.shape}")
    return int((x & ~y).sum()), int((~x & y).sum())


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): controls the family-wise error rate of the
    whole list of tests; nan entries are left out of the family and stay nan."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]
