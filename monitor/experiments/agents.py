"""Agents for the offline experiments, and the demo's CartPole PPO policy.

An agent is ``(module, make_env, act)`` (see :mod:`monitor.transcoders.splice`): the torch module
the taps live in, a function making a fresh gymnasium env, and ``act(obs) -> action``. A factory
may return a fourth element, ``reset()``, which starts a stateful policy afresh (an LSTM's hidden
state back to zeros): :func:`as_agent` calls it at the start of every episode, before the env's
own ``reset``, in every experiment (probe, sweep, return recovered).

On the command line ``--agent`` (or ``--policy``) is ``demo`` or ``package.module:factory``, a
function of no arguments returning the triple (or the four). The demo policy is cached in the
data directory as safetensors (no pickle), so only the first ``make demo`` trains it (about a
minute on two cores).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.transcoders.splice import Agent

__all__ = [
    "AgentError",
    "CARTPOLE_OBS",
    "DEMO_TAPS",
    "EXPECTED",
    "TRAIN_STEPS",
    "as_agent",
    "demo_policy",
    "load_agent",
    "make_ppo",
]

log = logging.getLogger(__name__)

CARTPOLE_OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]
DEMO_TAPS = ["mlp_extractor.policy_net.0:in", "mlp_extractor.policy_net.1:out"]
TRAIN_STEPS = 40_000
EXPECTED = "a tuple (module, make_env, act) or (module, make_env, act, reset)"


class AgentError(ValueError):
    """An agent that cannot be loaded or used as given; the message is one line saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # a factory's multi-line message stays one line


class _ResetsPolicy:
    """The env ``make_env`` made, whose ``reset`` first calls the policy's ``reset()``; every
    other attribute is the env's own."""

    def __init__(self, env: Any, reset_policy: Callable[[], Any]) -> None:
        self.env = env
        self._reset_policy = reset_policy

    def reset(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_policy()
        return self.env.reset(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def _what(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(x).__name__ for x in obj)})"
    return type(obj).__name__


def as_agent(obj: Any, *, where: str = "an agent") -> Agent:
    """``obj`` checked as an agent: ``(module, make_env, act)`` or ``(module, make_env, act, reset)``.

    ``module`` is the torch module the taps live in (None where nothing is tapped), ``make_env()``
    makes a fresh env, ``act(obs)`` chooses an action, and the optional ``reset()`` starts the
    policy afresh. The result is always the triple: with a ``reset`` its ``make_env`` makes envs
    whose ``reset(...)`` calls the policy's ``reset()`` first, so every episode of every experiment
    (these runners and :func:`monitor.transcoders.splice.return_recovered` alike) starts a
    recurrent policy from its initial state::

        state = {}
        def act(obs): ...                   # reads and updates state["h"]
        def make():
            return lstm, lambda: gym.make("CartPole-v1"), act, state.clear

    A wrong shape or a part that is not callable is an :class:`AgentError` saying what is expected.
    """
    import torch

    if not isinstance(obj, (tuple, list)) or len(obj) not in (3, 4):
        raise AgentError(f"{where} must be {EXPECTED}, got {_what(obj)}")
    module, make_env, act, reset = (*obj, None) if len(obj) == 3 else obj
    if module is not None and not isinstance(module, torch.nn.Module):
        raise AgentError(f"{where} must be {EXPECTED}: its module is {_what(module)}, not a torch.nn.Module")
    for name, part in (("make_env", make_env), ("act", act)) + ((("reset", reset),) if reset is not None else ()):
        if not callable(part):
            raise AgentError(f"{where} must be {EXPECTED}: its {name} is {_what(part)}, not callable")
    if reset is None:
        return module, make_env, act
    return module, lambda: _ResetsPolicy(make_env(), reset), act


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
    """``demo`` or ``package.module:factory``: the factory called with no arguments, its result
    checked by :func:`as_agent` (so a fourth element ``reset()`` runs at each episode start).

    Anything that goes wrong, an import, a missing name, whatever the factory raises, or a result
    of the wrong shape, is an :class:`AgentError` of one line, the factory's own message included.
    """
    if spec == "demo":
        model = demo_policy(data_dir)
        import gymnasium as gym

        return model.policy, lambda: gym.make("CartPole-v1"), lambda obs: model.predict(obs, deterministic=True)[0]
    mod_name, _, fn = spec.partition(":")
    if not mod_name or not fn:
        raise AgentError(f"must be 'demo' or 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # a factory module that fails on import fails in any way it likes
        raise AgentError(f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, fn, None)
    if factory is None:
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(fn, names, n=3)
        raise AgentError(f"{mod_name!r} has no {fn!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if not callable(factory):
        raise AgentError(f"{spec} is {_what(factory)}, not a factory function")
    try:
        made = factory()
    except Exception as e:
        raise AgentError(f"the factory {spec} raised {type(e).__name__}: {e}") from e
    return as_agent(made, where=f"the factory {spec}'s result")
