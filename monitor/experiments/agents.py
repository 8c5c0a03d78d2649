"""Agents for the offline experiments: ``(module, make_env, act)`` triples (see
:mod:`monitor.transcoders.splice`), and the demo's CartPole PPO policy.

On the command line ``--agent`` (or ``--policy``) is ``demo`` or ``package.module:factory``, a
function returning the triple. The demo policy is cached in the data directory as safetensors
(no pickle), so only the first ``make demo`` trains it (about a minute on two cores).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.transcoders.splice import Agent

__all__ = ["CARTPOLE_OBS", "DEMO_TAPS", "TRAIN_STEPS", "demo_policy", "load_agent", "make_ppo"]

log = logging.getLogger(__name__)

CARTPOLE_OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]
DEMO_TAPS = ["mlp_extractor.policy_net.0:in", "mlp_extractor.policy_net.1:out"]
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
    meta.write_text(
        json.dumps({"train_steps": train_steps, "algo": "PPO", "env": "CartPole-v1", "train_s": time.monotonic() - t0})
    )
    return model


def load_agent(spec: str, *, data_dir: Path) -> Agent:
    """``demo`` or ``package.module:factory``."""
    if spec == "demo":
        model = demo_policy(data_dir)
        import gymnasium as gym

        return model.policy, lambda: gym.make("CartPole-v1"), lambda obs: model.predict(obs, deterministic=True)[0]
    mod_name, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"--agent must be 'demo' or 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(mod_name), fn)()
