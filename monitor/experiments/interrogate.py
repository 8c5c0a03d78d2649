"""rl_interrogate's protocol, steps 2-4, on an agent ``(module, make_env, act)`` (steps 1, the
probes, are in :mod:`monitor.experiments.probes`): polarity inversion, single-direction ablation, and the
smallest PCA subspace of a tap that keeps the return."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_side.steer import ablate
from agent_side.taps import as_rows, parse_tap, resolve, tensor_hook
from monitor.experiments.probes import _pyplot, _save, collect, fit_probe, r2_score
from monitor.transcoders.splice import Agent, mean_return

__all__ = ["polarity_inversion", "ablation_effect", "PCA", "pca", "projected", "greedy_subspace", "plot_ablation_curve"]

log = logging.getLogger(__name__)


def polarity_inversion(
    agent: Agent, tap: str, *, obs_index: int, metric_name: str = "", episodes: int = 5, seed: int = 0, min_drop: float = 0.1
) -> dict[str, Any]:
    """Probe the tap for ``obs[obs_index]``, then let the policy see that sensor negated.

    A tap that encodes the sensor the policy reads now carries the negated value, so the probe's
    R² against the true value (``r2_inverted``) collapses, typically below zero, while its R²
    against the negated value (``r2_vs_negated``) stays high. An R² that holds means the tap
    tracks the quantity some other way (other sensors, memory), not through this input.
    """
    normal = collect(agent, tap, episodes=episodes, seed=seed)
    probe = fit_probe(normal.X, normal.obs[:, obs_index], kind="ridge", seed=seed)

    def negate(obs: Any) -> Any:
        o = np.array(obs, copy=True)
        o.reshape(-1)[obs_index] *= -1
        return o

    inverted = collect(agent, tap, episodes=episodes, seed=seed, obs_transform=negate)
    pred, true = probe.predict(inverted.X), inverted.obs[:, obs_index]
    r2_inv = r2_score(true, pred)
    return {
        "metric": metric_name or f"obs[{obs_index}]",
        "tap": tap,
        "episodes": episodes,
        "r2_normal": probe.r2_test,
        "r2_inverted": r2_inv,
        "r2_vs_negated": r2_score(-true, pred),
        "dropped": bool(probe.r2_test - r2_inv > min_drop),
        "return_normal": float(normal.returns.mean()),
        "return_inverted": float(inverted.returns.mean()),
    }


def ablation_effect(agent: Agent, tap: str, direction: np.ndarray, *, episodes: int = 5, seed: int = 0) -> dict[str, Any]:
    """Mean return clean, with ``direction`` projected out of the tap, and with a random direction
    of the same norm projected out instead (the control), over the same episode seeds."""
    root, make_env, act = agent
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    rand = np.random.default_rng(seed).standard_normal(d.size)
    rand *= np.linalg.norm(d) / np.linalg.norm(rand)
    clean = mean_return(make_env, act, episodes, seed=seed)
    with ablate(root, tap, torch.as_tensor(d, dtype=torch.float32)):
        ablated = mean_return(make_env, act, episodes, seed=seed)
    with ablate(root, tap, torch.as_tensor(rand, dtype=torch.float32)):
        control = mean_return(make_env, act, episodes, seed=seed)
    return {
        "tap": tap,
        "episodes": episodes,
        "return_clean": clean,
        "return_ablated": ablated,
        "delta": ablated - clean,
        "return_random": control,
        "delta_random": control - clean,
    }


@dataclass
class PCA:
    """``components`` [k, d] are unit rows, largest variance first; ratios are of the total variance."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    def project(self, X: np.ndarray, k: int) -> np.ndarray:
        """``mean + (X - mean) P^T P`` with ``P`` the top ``k`` components."""
        P = self.components[:k]
        return self.mean + (np.asarray(X) - self.mean) @ P.T @ P


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
def projected(root: torch.nn.Module, tap: str, p: PCA, k: int) -> Iterator[None]:
    """Within the block the tap carries its projection onto the top ``k`` components of ``p``."""
    spec = parse_tap(tap)
    mean = torch.as_tensor(p.mean, dtype=torch.float32)
    P = torch.as_tensor(p.components[:k], dtype=torch.float32)

    def project(t: torch.Tensor) -> torch.Tensor:
        rows, _ = as_rows(t)
        x = rows.float() - mean
        return (mean + x @ P.T @ P).reshape(t.shape).to(t.dtype)

    handle = tensor_hook(resolve(root, spec), spec.site, project)
    try:
        yield
    finally:
        handle.remove()


def greedy_subspace(
    agent: Agent, tap: str, X: np.ndarray, *, keep: float = 0.95, episodes: int = 5, seed: int = 0, max_k: int | None = None
) -> dict[str, Any]:
    """The smallest ``k`` whose top-``k`` PCA projection of the tap (PCA of ``X``, rows of that tap)
    keeps the mean return within ``keep`` of clean (``>= keep * clean`` for a positive return).

    Components are added in variance order, so this is greedy and stops at the first ``k`` that
    passes; ``k`` is None when none up to ``max_k`` does. ``curve`` holds ``(k, return)``.
    """
    root, make_env, act = agent
    p = pca(X)
    clean = mean_return(make_env, act, episodes, seed=seed)
    bar = clean - (1.0 - keep) * abs(clean)
    curve: list[tuple[int, float]] = []
    found = None
    for k in range(1, len(p.components[:max_k]) + 1):
        with projected(root, tap, p, k):
            ret = mean_return(make_env, act, episodes, seed=seed)
        curve.append((k, ret))
        log.info("subspace k=%d: return %.1f (clean %.1f)", k, ret, clean)
        if ret >= bar:
            found = k
            break
    return {
        "tap": tap,
        "k": found,
        "keep": keep,
        "return_clean": clean,
        "curve": curve,
        "explained_variance": float(p.explained_variance_ratio[:found].sum()) if found else None,
    }


def plot_ablation_curve(
    curve: Sequence[tuple[int, float]],
    path: Path | str,
    *,
    clean: float | None = None,
    keep: float | None = None,
    title: str = "return vs PCA subspace size",
) -> Path:
    """Return against subspace size ``k``, with the clean return and the ``keep`` bar when given."""
    plt = _pyplot()

    ks, rets = zip(*curve, strict=True) if curve else ((), ())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, rets, marker="o", label="projected")
    if clean is not None:
        ax.axhline(clean, color="k", linestyle="--", label="clean")
        if keep is not None:
            ax.axhline(clean - (1.0 - keep) * abs(clean), color="r", linestyle=":", label=f"keep {keep:.0%}")
    ax.set_xlabel("k (top PCA components kept)")
    ax.set_ylabel("mean return")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)
