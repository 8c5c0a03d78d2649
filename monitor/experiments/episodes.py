"""Episodes on an agent ``(module, make_env, act)`` and what the experiments say about them: one
runner for the sweeps and the interrogation, and one summary (per-episode returns, their mean
with a Student-t interval, how the episodes ended)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monitor.experiments import failure_modes
from monitor.experiments.agents import as_agent
from monitor.stats.intervals import mean_ci
from monitor.transcoders.splice import Agent

__all__ = ["EpisodeResult", "run_episodes", "env_id_of", "returns_summary", "summarize", "finite_or_none"]


@dataclass(frozen=True)
class EpisodeResult:
    seed: int
    episode_return: float
    length: int
    mode: str  # how it ended, by the env's classifier in monitor.experiments.failure_modes


def env_id_of(env: Any) -> str | None:
    """The env's registered id (``env.spec.id``), or None."""
    spec = getattr(env, "spec", None)
    return getattr(spec, "id", None)


@torch.no_grad()
def run_episodes(
    agent: Agent, *, episodes: int, seed: int = 0, env_id: str | None = None, progress: bool = False, max_steps: int | None = None
) -> list[EpisodeResult]:
    """Run ``episodes`` episodes, episode ``i`` reset with seed ``seed + i``.

    Torch's RNG is also seeded per episode (and restored afterwards), so a sampling ``act`` repeats
    too; an agent's ``reset()`` (see :func:`~monitor.experiments.agents.as_agent`) runs before each
    episode. ``env_id`` picks the failure-mode classifier (default: the env's ``spec.id``);
    ``max_steps`` cuts an episode (counted as truncated) for envs without a time limit.
    """
    from tqdm import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    _, make_env, act = as_agent(agent)
    env = make_env()
    env_id = env_id or env_id_of(env)
    classify = failure_modes.classifier_for(env_id) or failure_modes.fallback
    out: list[EpisodeResult] = []
    try:
        with torch.random.fork_rng(devices=[]):
            for ep in tqdm(range(episodes), desc=f"episodes {env_id}", disable=not progress, leave=False):
                torch.manual_seed(seed + ep)
                obs, info = env.reset(seed=seed + ep)
                ret, steps, term, trunc = 0.0, 0, False, False
                while not (term or trunc):
                    obs, reward, term, trunc, info = env.step(act(obs))
                    ret += float(reward)
                    steps += 1
                    if max_steps is not None and steps >= max_steps:
                        trunc = True
                out.append(EpisodeResult(seed + ep, ret, steps, classify(obs, bool(term), bool(trunc), info, env)))
    finally:
        env.close()
    return out


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None where it is NaN or infinite (JSON has no NaN)."""
    return float(x) if math.isfinite(x) else None


def returns_summary(returns: Sequence[float], *, level: float = 0.95) -> dict[str, Any]:
    """``n``, ``mean``, ``ci`` (the Student-t interval at ``level``; None ends for one episode),
    ``std`` and the per-episode ``returns``."""
    rets = [float(r) for r in returns]
    m, lo, hi = mean_ci(rets, level=level)
    return {
        "n": len(rets),
        "mean": m,
        "ci": [finite_or_none(lo), finite_or_none(hi)],
        "std": float(np.std(rets, ddof=1)) if len(rets) > 1 else None,
        "returns": rets,
    }


def summarize(runs: Sequence[EpisodeResult], *, level: float = 0.95) -> dict[str, Any]:
    """:func:`returns_summary` of the runs plus ``failures`` (a count per mode), and per episode
    ``lengths`` and ``modes``."""
    return {
        **returns_summary([r.episode_return for r in runs], level=level),
        "failures": dict(Counter(r.mode for r in runs)),
        "lengths": [r.length for r in runs],
        "modes": [r.mode for r in runs],
    }
