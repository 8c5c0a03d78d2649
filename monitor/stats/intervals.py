"""Intervals without scipy: a mean's t interval and the Welch interval of a difference of means,
with the Student t quantile and tail they need (tested against scipy in tests/experiments/test_sweep.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["mean_ci", "diff_ci", "t_ppf", "t_pvalue"]


# Student t without scipy: two-sided tail = regularized incomplete beta I_x(df/2, 1/2), x = df/(df+t^2).
def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic with ``df`` (possibly fractional) degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(df / 2.0, 0.5, df / (df + t * t)))


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom, by bisection."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    tail = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_pvalue(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_pvalue(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2.0


def mean_ci(values: Iterable[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the Student-t interval of the mean; lo/hi are NaN for a single value."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = t_ppf(0.5 + level / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def diff_ci(baseline: Sequence[float], treated: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """``mean(treated) - mean(baseline)`` with a Welch interval, degrees of freedom and two-sided p.

    With no spread in either group (a deterministic env and policy) the interval collapses to the
    difference and p is 0 or 1; with fewer than two values on a side, interval and p are None.
    """
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(treated, dtype=np.float64)
    diff = float(b.mean() - a.mean())
    out: dict[str, Any] = {"mean": diff, "ci": [None, None], "df": None, "p_value": None, "excludes_zero": None, "level": level}
    if a.size < 2 or b.size < 2:
        return out
    va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        out.update(ci=[diff, diff], p_value=float(diff == 0.0), excludes_zero=diff != 0.0)
        return out
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_ppf(0.5 + level / 2.0, df) * se
    lo, hi = diff - half, diff + half
    out.update(ci=[lo, hi], df=df, p_value=t_pvalue(diff / se, df), excludes_zero=lo > 0.0 or hi < 0.0)
    return out
