"""The demo agent: a small stable-baselines3 PPO policy on CartPole, attached to the monitor.

The trained policy is cached in the data directory as safetensors (no pickle), so only the
first ``make demo`` trains (about a minute on two cores).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["CARTPOLE_OBS", "DEMO_TAPS", "DEMO_RUN", "make_ppo", "demo_policy", "run_agent"]

log = logging.getLogger(__name__)

CARTPOLE_OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]
DEMO_TAPS = ["mlp_extractor.policy_net.0:in", "mlp_extractor.policy_net.1:out"]
DEMO_RUN = "cartpole-demo"
TRAIN_STEPS = 40_000


def make_ppo(seed: int = 0) -> Any:
    """An untrained PPO MlpPolicy on CartPole-v1 (the same architecture the demo trains)."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", gym.make("CartPole-v1"), seed=seed, verbose=0, device="cpu")


def demo_policy(data_dir: Path, *, train_steps: int = TRAIN_STEPS, progress: Callable[[str], None] = log.info) -> Any:
    """The demo's PPO model: loaded from ``data_dir/demo`` or trained once and saved there."""
    from safetensors.torch import load_file, save_file

    model = make_ppo()
    cache = Path(data_dir) / "demo"
    weights, meta = cache / "ppo_cartpole.safetensors", cache / "ppo_cartpole.json"
    if weights.exists() and meta.exists() and json.loads(meta.read_text()).get("train_steps") == train_steps:
        model.policy.load_state_dict(load_file(str(weights)))
        return model
    progress(f"training the demo PPO policy on CartPole for {train_steps} steps (once; cached in {cache})")
    t0 = time.monotonic()
    model.learn(total_timesteps=train_steps)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.policy.state_dict().items()}, str(weights))
    meta.write_text(json.dumps({"train_steps": train_steps, "algo": "PPO", "env": "CartPole-v1", "train_s": time.monotonic() - t0}))
    return model


def run_agent(model: Any, tap: Any, *, steps: int | None, on_tick: Callable[[int, list[float]], None] | None = None,
              tick_s: float = 2.0, seed: int = 0) -> list[float]:
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
