"""rl_interrogate's protocol, steps 2-3, on an agent ``(module, make_env, act)``: polarity inversion
and single-direction ablation (step 1, the probes, is in :mod:`monitor.experiments.probes`, step 4,
the minimal subspace, in :mod:`monitor.experiments.subspace`, whose names are exported here too).

Every effect comes with its uncertainty: per-episode returns, the Welch interval of the difference
from the clean policy on the same episode seeds (:func:`monitor.stats.intervals.diff_ci`), and the
number of episodes; the probe's R² is a mean ± sd over folds; an ablation is judged against the
distribution of several random-direction controls, not one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from agent_side.steer import ablate, add
from monitor.experiments.agents import as_agent
from monitor.experiments.episodes import returns_summary, run_episodes, summarize
from monitor.experiments.plots import plot_ablation_curve
from monitor.experiments.probes import FOLDS, collect, cross_validate
from monitor.experiments.subspace import PCA, greedy_subspace, pca, projected
from monitor.stats.intervals import diff_ci
from monitor.transcoders.splice import Agent

__all__ = [
    "ABLATIONS",
    "polarity_inversion",
    "ablation_effect",
    "ablated",
    "PCA",
    "pca",
    "projected",
    "greedy_subspace",
    "plot_ablation_curve",
]

log = logging.getLogger(__name__)

ABLATIONS = ("zero", "mean")
RANDOM_DIRECTIONS = 8


def polarity_inversion(
    agent: Agent,
    tap: str,
    *,
    obs_index: int,
    metric_name: str = "",
    episodes: int = 20,
    seed: int = 0,
    min_drop: float = 0.1,
    folds: int = FOLDS,
    level: float = 0.95,
) -> dict[str, Any]:
    """Probe the tap for ``obs[obs_index]``, then let the policy see that sensor negated.

    A tap that encodes the sensor the policy reads now carries the negated value, so the probe's
    R² against the true value (``r2_inverted``) collapses, typically below zero, while its R²
    against the negated value (``r2_vs_negated``) stays high. An R² that holds means the tap
    tracks the quantity some other way (other sensors, memory), not through this input.

    The probe is ridge, cross-validated over ``folds`` contiguous blocks of the normal rollouts:
    ``r2_normal`` is the mean held-out R² (``r2_normal_sd`` its sd, ``r2_normal_folds`` each), and
    the same fold probes judged on the inverted rollouts give ``r2_inverted`` and
    ``r2_vs_negated`` with their sds. ``dropped``: the mean fell by more than ``min_drop``.
    ``normal`` and ``inverted`` summarize the returns (``returns`` per episode, ``ci``), ``diff``
    is inverted minus normal with its Welch interval; both ran ``episodes`` episodes on the same seeds.
    """
    normal = collect(agent, tap, episodes=episodes, seed=seed)
    cv = cross_validate(normal.X, normal.obs[:, obs_index], kind="ridge", folds=folds, seed=seed)

    def negate(obs: Any) -> Any:
        o = np.array(obs, copy=True)
        o.reshape(-1)[obs_index] *= -1
        return o

    inverted = collect(agent, tap, episodes=episodes, seed=seed, obs_transform=negate)
    true = inverted.obs[:, obs_index]
    r2_inv, r2_neg = cv.r2_on(inverted.X, true), cv.r2_on(inverted.X, -true)
    sd = lambda r: float(np.std(r, ddof=1)) if len(r) > 1 else float("nan")  # noqa: E731
    res = {
        "metric": metric_name or f"obs[{obs_index}]",
        "tap": tap,
        "episodes": episodes,
        "folds": folds,
        "level": level,
        "r2_normal": cv.r2_mean,
        "r2_normal_sd": cv.r2_sd,
        "r2_normal_folds": [float(r) for r in cv.r2_test],
        "r2_inverted": float(np.mean(r2_inv)),
        "r2_inverted_sd": sd(r2_inv),
        "r2_inverted_folds": [float(r) for r in r2_inv],
        "r2_vs_negated": float(np.mean(r2_neg)),
        "r2_vs_negated_sd": sd(r2_neg),
        "return_normal": float(normal.returns.mean()),
        "return_inverted": float(inverted.returns.mean()),
        "normal": returns_summary(normal.returns, level=level),
        "inverted": returns_summary(inverted.returns, level=level),
        "diff": diff_ci(normal.returns, inverted.returns, level=level),
    }
    res["dropped"] = bool(res["r2_normal"] - res["r2_inverted"] > min_drop)
    return res


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not norm > 0:
        raise ValueError("the direction to ablate is zero")
    return v / norm


@contextlib.contextmanager
def ablated(root: torch.nn.Module, tap: str, direction: np.ndarray, *, value: float = 0.0) -> Iterator[None]:
    """Within the block the tap's component along ``u = direction/|direction|`` is ``value``:
    ``x' = x + (value - x·u) u``. ``value`` 0 is zero-ablation (the direction projected out),
    the mean of ``x·u`` over recorded rows is mean-ablation. Widths are checked at every forward
    (:class:`agent_side.steer.SteerError`)."""
    u = _unit(direction)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ablate(root, tap, u))
        if value != 0.0:
            stack.enter_context(add(root, tap, u, float(value)))
        yield


def _controls(deltas: Sequence[float], effect: float) -> dict[str, Any]:
    """The random-direction controls' differences from clean, as a distribution, and where the
    probe direction's difference falls in it."""
    d = np.asarray(deltas, dtype=np.float64)
    return {
        "n": int(d.size),
        "deltas": [float(x) for x in d],
        "mean": float(d.mean()),
        "sd": float(d.std(ddof=1)) if d.size > 1 else None,
        "min": float(d.min()),
        "max": float(d.max()),
        # the chance that a random direction hurts at least as much, counting the probe's own
        "p_empirical": float((1 + np.sum(d <= effect)) / (1 + d.size)),
    }


def ablation_effect(
    agent: Agent,
    tap: str,
    direction: np.ndarray,
    *,
    episodes: int = 20,
    seed: int = 0,
    X: np.ndarray | None = None,
    modes: Sequence[str] = ABLATIONS,
    random_directions: int = RANDOM_DIRECTIONS,
    level: float = 0.95,
) -> dict[str, Any]:
    """Returns clean, with ``direction`` ablated at the tap, and with random directions ablated
    instead (the controls), all over the same ``episodes`` episode seeds.

    ``modes``: ``zero`` sets the component along the direction to 0 (projects it out), ``mean``
    to its mean over the rows ``X`` of this tap (the clean policy's, recorded here when None).
    Each mode under ``ablations`` has a returns summary (``returns`` per episode, ``ci``, how the
    episodes ended), ``value`` (the component's value), ``diff`` (ablated minus clean with its
    Welch interval) and ``random``: ``random_directions`` uniformly random unit directions, each
    ablated the same way, summarized as a distribution of differences from clean (``deltas``,
    ``mean``, ``sd``, ``min``, ``max``) with ``p_empirical``, the fraction of them (the probe
    direction counted in) that hurt at least as much. ``return_clean``, ``return_ablated``,
    ``delta``, ``return_random`` and ``delta_random`` are the first mode's means.
    """
    if episodes < 1 or random_directions < 1:
        raise ValueError(f"need episodes >= 1 and random_directions >= 1, got {episodes} and {random_directions}")
    if not modes or any(m not in ABLATIONS for m in modes):
        raise ValueError(f"ablation modes must be some of {ABLATIONS}, got {list(modes)}")
    agent = as_agent(agent)
    root = agent[0]
    u = _unit(direction)
    if "mean" in modes and X is None:
        X = collect(agent, tap, episodes=episodes, seed=seed).X
    rng = np.random.default_rng(seed)
    controls = [_unit(rng.standard_normal(u.size)) for _ in range(random_directions)]
    clean = summarize(run_episodes(agent, episodes=episodes, seed=seed), level=level)

    def returns_with(v: np.ndarray, mode: str) -> tuple[list[Any], float]:
        value = 0.0 if mode == "zero" else float(np.mean(np.asarray(X, dtype=np.float64) @ v))
        with ablated(root, tap, v, value=value):
            return run_episodes(agent, episodes=episodes, seed=seed), value

    out: dict[str, Any] = {
        "tap": tap,
        "episodes": episodes,
        "level": level,
        "modes": list(modes),
        "random_directions": random_directions,
        "clean": clean,
        "ablations": {},
    }
    for mode in modes:
        runs, value = returns_with(u, mode)
        cell = {**summarize(runs, level=level), "value": value}
        cell["diff"] = diff_ci(clean["returns"], cell["returns"], level=level)
        deltas = [float(np.mean([r.episode_return for r in returns_with(c, mode)[0]])) - clean["mean"] for c in controls]
        cell["random"] = _controls(deltas, cell["diff"]["mean"])
        log.info(
            "%s-ablation at %s: return %.1f -> %.1f (random directions: %+.1f on average)",
            mode,
            tap,
            clean["mean"],
            cell["mean"],
            cell["random"]["mean"],
        )
        out["ablations"][mode] = cell
    first = out["ablations"][modes[0]]
    out.update(
        return_clean=clean["mean"],
        return_ablated=first["mean"],
        delta=first["diff"]["mean"],
        return_random=clean["mean"] + first["random"]["mean"],
        delta_random=first["random"]["mean"],
    )
    return out
