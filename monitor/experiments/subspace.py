"""rl_interrogate's step 4: the minimal sufficient subspace of a tap, PCA components selected
greedily by the return they keep.

The tap is replaced by its projection onto a set of principal components (through the mean of the
recorded rows) while the policy runs. :func:`greedy_subspace` grows the set one component at a
time, each step adding the candidate whose addition keeps the most return, until the return is
back within ``keep`` of clean; the curve in plain variance order is kept beside it, since a
direction the policy reads can carry less variance than units it ignores (variance order then
needs every component above it). Each point has its per-episode returns and interval, and the
minimal ``k`` a bootstrap interval over episodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agent_side.taps import as_rows, parse_tap, resolve, tensor_hook
from monitor.experiments.agents import as_agent
from monitor.experiments.episodes import returns_summary, run_episodes
from monitor.transcoders.splice import Agent

__all__ = ["PCA", "pca", "projected", "greedy_subspace", "minimal_k"]

log = logging.getLogger(__name__)

CANDIDATES = 16  # greedy chooses among this many top-variance components (each step tries each)
BOOTSTRAP = 2000


@dataclass
class PCA:
    """``components`` [k, d] are unit rows, largest variance first; ratios are of the total variance."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    def project(self, X: np.ndarray, k: int | Sequence[int]) -> np.ndarray:
        """``mean + (X - mean) P^T P`` with ``P`` the top ``k`` components, or those listed."""
        P = self.components[_picked(k)]
        return self.mean + (np.asarray(X) - self.mean) @ P.T @ P


def _picked(k: int | Sequence[int]) -> slice | list[int]:
    return slice(None, k) if isinstance(k, (int, np.integer)) else [int(i) for i in k]


def pca(X: np.ndarray, k: int | None = None) -> PCA:
    """Principal components of the rows of ``X`` by SVD (``k`` None keeps min(n, d))."""
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    var = s**2 / max(len(X) - 1, 1)
    total = var.sum()
    k = len(s) if k is None else min(k, len(s))
    ratio = var[:k] / total if total > 0 else np.zeros(k)
    return PCA(mean, vt[:k], var[:k], ratio)


@contextlib.contextmanager
def projected(root: torch.nn.Module, tap: str, p: PCA, k: int | Sequence[int]) -> Iterator[None]:
    """Within the block the tap carries its projection onto the top ``k`` components of ``p``
    (or onto the components listed)."""
    spec = parse_tap(tap)
    mean = torch.as_tensor(p.mean, dtype=torch.float32)
    P = torch.as_tensor(p.components[_picked(k)], dtype=torch.float32)

    def project(t: torch.Tensor) -> torch.Tensor:
        rows, _ = as_rows(t)
        x = rows.float() - mean
        return (mean + x @ P.T @ P).reshape(t.shape).to(t.dtype)

    handle = tensor_hook(resolve(root, spec), spec.site, project)
    try:
        yield
    finally:
        handle.remove()


def _bar(clean: float | np.ndarray, keep: float) -> Any:
    return clean - (1.0 - keep) * np.abs(clean)


def minimal_k(
    clean: Sequence[float], curve_returns: Sequence[Sequence[float]], *, keep: float, level: float = 0.95, seed: int = 0
) -> tuple[int | None, list[int | None]]:
    """The first ``k`` (1-based) whose mean return reaches ``keep`` of the clean mean, and a
    bootstrap interval of it: episodes resampled together (every condition ran the same seeds),
    the first passing ``k`` of each resample, its ``level`` percentile range. None where no point
    of the curve passes (an interval end of None: beyond the curve)."""
    c = np.asarray(clean, dtype=np.float64)
    R = np.asarray(curve_returns, dtype=np.float64).reshape(len(curve_returns), len(c))
    if not len(R):
        return None, [None, None]

    def first(means: np.ndarray, bar: np.ndarray) -> np.ndarray:
        ok = means >= bar  # [K, B]
        return np.where(ok.any(0), ok.argmax(0) + 1.0, np.inf)

    k = first(R.mean(1)[:, None], np.atleast_1d(_bar(c.mean(), keep)))[0]
    idx = np.random.default_rng(seed).integers(0, len(c), size=(BOOTSTRAP, len(c)))
    ks = first(R[:, idx].mean(-1), _bar(c[idx].mean(-1), keep))
    tail = (1.0 - level) / 2.0
    ends = [np.quantile(ks, tail, method="lower"), np.quantile(ks, 1.0 - tail, method="higher")]
    as_k = lambda v: None if not np.isfinite(v) else int(v)  # noqa: E731
    return as_k(k), [as_k(e) for e in ends]


def _point(k: int, comps: list[int], p: PCA, returns: Sequence[float], level: float) -> dict[str, Any]:
    return {
        "k": k,
        "component": comps[-1],
        "components": list(comps),
        "explained_variance": float(p.explained_variance_ratio[comps].sum()),
        **returns_summary(returns, level=level),
    }


def _sure(point: dict[str, Any], bar: float) -> bool:
    """Whether a point keeps the return beyond doubt: its interval's lower end (its mean, with no
    interval) at or above the bar."""
    lo = point["ci"][0]
    return (point["mean"] if lo is None else lo) >= bar


def _curve(
    points: list[dict[str, Any]], clean: dict[str, Any], *, keep: float, level: float, seed: int, order: str
) -> dict[str, Any]:
    k, k_ci = minimal_k(clean["returns"], [pt["returns"] for pt in points], keep=keep, level=level, seed=seed)
    return {
        "order": order,
        "k": k,
        "k_ci": k_ci,
        "components": points[k - 1]["components"] if k else None,
        "explained_variance": points[k - 1]["explained_variance"] if k else None,
        "curve": [(pt["k"], pt["mean"]) for pt in points],
        "points": points,
    }


def greedy_subspace(
    agent: Agent,
    tap: str,
    X: np.ndarray,
    *,
    keep: float = 0.95,
    episodes: int = 20,
    seed: int = 0,
    max_k: int | None = None,
    candidates: int = CANDIDATES,
    level: float = 0.95,
    variance_order: bool = True,
) -> dict[str, Any]:
    """The fewest PCA components of the tap (PCA of ``X``, rows of that tap) whose projection keeps
    the mean return within ``keep`` of clean (``>= keep * clean`` for a positive return).

    Greedy by return: step ``k`` tries each remaining candidate (the top ``candidates`` components
    by variance, those with any) added to the ``k - 1`` chosen, over the same ``episodes`` episode
    seeds, and keeps the one with the highest mean return (ties to the larger variance). It stops
    once a point keeps the return beyond doubt (its interval's lower end at the bar) or at
    ``max_k`` (default: every candidate). The variance-ordered curve (top 1, top 2, ...) runs by
    the same rule beside it when ``variance_order``.

    Returns ``tap, keep, episodes, level, candidates, bar, clean`` (a returns summary), the greedy
    result at the top level, ``order: "return"``, ``k`` (None if no point passes), ``k_ci`` (see
    :func:`minimal_k`; conditional on the components greedy chose), ``components`` and
    ``explained_variance`` at ``k``, ``curve`` [(k, mean return)], ``points`` (per step: the
    component added, every candidate ``tried`` with its mean return, and a returns summary),
    ``return_clean``, and ``variance_order`` with the same fields for the variance order.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    agent = as_agent(agent)
    root = agent[0]
    p = pca(X)
    pool = [i for i in range(min(candidates, len(p.components))) if p.explained_variance[i] > 0]
    max_k = len(pool) if max_k is None else min(max_k, len(pool))
    clean = returns_summary([r.episode_return for r in run_episodes(agent, episodes=episodes, seed=seed)], level=level)
    bar = float(_bar(clean["mean"], keep))

    seen: dict[frozenset[int], list[float]] = {}  # the projection depends on the set, not its order

    def returns_with(comps: list[int]) -> list[float]:
        key = frozenset(comps)
        if key not in seen:
            with projected(root, tap, p, comps):
                seen[key] = [r.episode_return for r in run_episodes(agent, episodes=episodes, seed=seed)]
        return seen[key]

    chosen: list[int] = []
    points: list[dict[str, Any]] = []
    while len(chosen) < max_k:
        tried = {c: returns_with([*chosen, c]) for c in pool if c not in chosen}
        best = max(tried, key=lambda c: (float(np.mean(tried[c])), -c))
        chosen.append(best)
        pt = _point(len(chosen), chosen, p, tried[best], level)
        pt["tried"] = [[c, float(np.mean(r))] for c, r in tried.items()]
        points.append(pt)
        log.info("greedy subspace k=%d: + component %d, return %.1f (clean %.1f)", pt["k"], best, pt["mean"], clean["mean"])
        if _sure(pt, bar):
            break
    res = _curve(points, clean, keep=keep, level=level, seed=seed, order="return")
    if variance_order:
        vpoints: list[dict[str, Any]] = []
        for k in range(1, max_k + 1):
            vpoints.append(_point(k, pool[:k], p, returns_with(pool[:k]), level))
            log.info("variance-order subspace k=%d: return %.1f", k, vpoints[-1]["mean"])
            if _sure(vpoints[-1], bar):
                break
        res["variance_order"] = _curve(vpoints, clean, keep=keep, level=level, seed=seed, order="variance")
    return {
        "tap": tap,
        "keep": keep,
        "episodes": episodes,
        "level": level,
        "candidates": len(pool),
        "bar": bar,
        "clean": clean,
        "return_clean": clean["mean"],
        **res,
    }
