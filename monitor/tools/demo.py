"""The demo agent: a small stable-baselines3 PPO policy on CartPole, attached to the monitor.

The trained policy is cached in the data directory as safetensors (no pickle), so only the
first ``make demo`` trains (about a minute on two cores).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from monitor.experiments.agents import CARTPOLE_OBS, DEMO_TAPS, demo_policy, make_ppo

__all__ = ["CARTPOLE_OBS", "DEMO_TAPS", "DEMO_RUN", "make_ppo", "demo_policy", "run_agent"]  # the policy: experiments.agents

log = logging.getLogger(__name__)

DEMO_RUN = "cartpole-demo"


def run_agent(
    model: Any,
    tap: Any,
    *,
    steps: int | None,
    on_tick: Callable[[int, list[float]], None] | None = None,
    tick_s: float = 2.0,
    seed: int = 0,
) -> list[float]:
    """Run the policy on CartPole for ``steps`` steps (forever if None); returns episode returns."""
    import gymnasium as gym

    env = tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=seed)
    returns: list[float] = []
    ep_ret = 0.0
    next_tick = time.monotonic() + tick_s
    n = 0
    while steps is None or n < steps:
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = env.step(action)
        ep_ret += float(reward)
        n += 1
        if terminated or truncated:
            returns.append(ep_ret)
            ep_ret = 0.0
            obs, _ = env.reset()
        if on_tick is not None and time.monotonic() >= next_tick:
            next_tick = time.monotonic() + tick_s
            on_tick(n, returns)
    env.close()
    return returns
