"""Environment wrappers that log each step's metrics, aligned with that step's activations.

The row logged for step ``t`` holds the observation the policy saw at ``t`` (so it lines up with
the activations of the forward on it), the action taken, the reward it earned, and the
terminated/truncated flags; then the step counter moves to ``t + 1``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

__all__ = ["StepInfo", "StepLogger", "wrap_env", "sb3_end_flags", "MAX_OBS_COLUMNS"]

log = logging.getLogger(__name__)

MAX_OBS_COLUMNS = 256  # larger observations (images) are not logged unless named


@dataclass(frozen=True)
class StepInfo:
    """What a user metric callable sees for one env at one step."""

    obs: Any
    action: Any
    reward: float
    terminated: bool
    truncated: bool
    info: Mapping[str, Any]
    index: int


def _space_columns(space: Any, prefix: str, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = list(names)
        size = int(np.prod(space.shape)) if getattr(space, "shape", None) else None
        if size is not None and size != len(names):
            raise ValueError(f"{prefix}_names has {len(names)} names but the {prefix} space has {size} components")
        return names
    if isinstance(space, gymnasium.spaces.Discrete):
        return [prefix]
    shape, dtype = getattr(space, "shape", None), getattr(space, "dtype", None)
    if not shape or dtype is None or not np.issubdtype(dtype, np.number):
        return []
    size = int(np.prod(shape))
    if size > MAX_OBS_COLUMNS:
        return []
    return [prefix] if size == 1 and prefix == "action" else [f"{prefix}_{i}" for i in range(size)]


def _values(x: Any) -> list:
    """A step's observation or action as a flat list of numbers."""
    if type(x) is np.ndarray:
        if x.ndim == 1:
            return x.tolist()
        return [x.item()] if x.ndim == 0 else x.reshape(-1).tolist()
    if isinstance(x, (int, float, bool, np.number)):
        return [x]
    return np.asarray(x, dtype=np.float64).reshape(-1).tolist()


def _values_legacy(x: Any) -> list:
    """:func:`_values` before issue 19, for the legacy capture path only (see agent_side.attachment)."""
    if type(x) is np.ndarray:
        return x.reshape(-1).tolist()
    if isinstance(x, (int, float, bool, np.number)):
        return [x]
    return np.asarray(x, dtype=np.float64).reshape(-1).tolist()


class StepLogger:
    """Turns step results into metric rows (plain lists) and episode records.

    The row for step ``t`` holds the observation the policy acted on at ``t``; then the
    handle's step moves on. While no monitor is connected, rows are not built at all (the step counts
    as unwatched).
    """

    def __init__(
        self,
        handle: Any,
        n_envs: int,
        observation_space: Any,
        action_space: Any,
        *,
        obs_names: Sequence[str] | None = None,
        metrics: Mapping[str, Callable[[StepInfo], float]] | None = None,
    ) -> None:
        self.handle = handle
        self.n_envs = n_envs
        self.obs_cols = _space_columns(observation_space, "obs", obs_names)
        self.act_cols = _space_columns(action_space, "action", None)
        self.metrics = dict(metrics or {})
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise TypeError(f"metric {name!r} is not callable")
        self.names = (*self.obs_cols, *self.act_cols, "reward", "terminated", "truncated", *self.metrics)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"metric names collide: {self.names}")
        self.ep_return = [0.0] * n_envs
        self.ep_length = [0] * n_envs
        self._legacy = bool(getattr(handle, "_legacy", False))
        self._values = _values_legacy if self._legacy else _values
        self._rows: Any = None  # the handle's MetricRows for these names, once a row was logged

    def log_one(self, i: int, obs: Any, action: Any, reward: float, terminated: bool, truncated: bool, info: Mapping) -> None:
        """Env ``i``'s step result; call :meth:`done` after all envs of the step are logged."""
        h = self.handle
        reward = float(reward)
        if h.connected:
            try:
                values = self._values
                row = values(obs) if self.obs_cols else []
                if self.act_cols:
                    row += values(action)
                row += (reward, float(terminated), float(truncated))
                if self.metrics:
                    si = StepInfo(obs, action, reward, bool(terminated), bool(truncated), info, i)
                    row += [float(fn(si)) for fn in self.metrics.values()]
                if self._legacy:
                    if len(row) != len(self.names):
                        raise ValueError(f"a step row has {len(row)} values for {len(self.names)} metric names")
                    h.log_row(self.names, row, index=i)
                else:
                    rows = self._rows
                    if rows is None:
                        rows = self._rows = h.metric_rows(self.names)
                    rows.add(row, h.step, i)  # checks the row's width
            except Exception:  # a user metric or an odd observation must not break env.step
                h._failed("step metrics")
        # else: nothing is built, and the step is counted unwatched by advance()
        self.ep_return[i] += reward
        self.ep_length[i] += 1
        if terminated or truncated:
            h.end_episode(i, self.ep_return[i], self.ep_length[i], bool(terminated), bool(truncated))
            self.ep_return[i] = 0.0
            self.ep_length[i] = 0

    def log(self, obs: Any, actions: Any, rewards: Any, terminated: Any, truncated: Any, infos: Sequence[Mapping]) -> None:
        """A batched step of all ``n_envs`` envs (arrays with a leading env dimension)."""
        obs = np.asarray(obs) if self.obs_cols else None  # dict/tuple observations are not logged
        actions = np.asarray(actions) if self.act_cols else None
        rewards, terminated, truncated = (
            np.asarray(rewards).reshape(-1),
            np.asarray(terminated).reshape(-1),
            np.asarray(truncated).reshape(-1),
        )
        for i in range(self.n_envs):
            self.log_one(
                i,
                None if obs is None else obs[i],
                None if actions is None else actions[i] if actions.ndim else actions,
                rewards[i],
                terminated[i],
                truncated[i],
                infos[i] if i < len(infos) else {},
            )
        self.handle.advance()

    def done(self) -> None:
        self.handle.advance()

    def reset_env(self, i: int | None = None) -> None:
        for j in range(self.n_envs) if i is None else (i,):
            self.ep_return[j] = 0.0
            self.ep_length[j] = 0


class MetricsWrapper(gymnasium.Wrapper):
    """Single-env wrapper: one metric row per step."""

    def __init__(self, env: gymnasium.Env, handle: Any, *, obs_names: Sequence[str] | None, metrics: Mapping | None) -> None:
        super().__init__(env)
        self.logger = StepLogger(handle, 1, env.observation_space, env.action_space, obs_names=obs_names, metrics=metrics)
        self._obs: Any = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._obs = obs
        self.logger.reset_env()
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.logger.log_one(0, self._obs, action, reward, terminated, truncated, info)
        self.logger.handle.advance()
        self._obs = obs
        return obs, reward, terminated, truncated, info


class VectorMetricsWrapper(gymnasium.vector.VectorWrapper):
    """Gymnasium vector-env wrapper: one metric row per env per step.

    With the default next-step autoreset, the step after an env finished only resets it; that
    step's row is still logged, but it does not count toward the new episode's return and length.
    """

    def __init__(self, env: Any, handle: Any, *, obs_names: Sequence[str] | None, metrics: Mapping | None) -> None:
        super().__init__(env)
        self.logger = StepLogger(
            handle, env.num_envs, env.single_observation_space, env.single_action_space, obs_names=obs_names, metrics=metrics
        )
        self._obs: Any = None
        self._resetting = np.zeros(env.num_envs, dtype=bool)
        mode = env.metadata.get("autoreset_mode", "NextStep")
        self._next_step_reset = "next" in str(getattr(mode, "value", mode)).lower().replace("_", "")

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._obs = obs
        self._resetting[:] = False
        self.logger.reset_env()
        return obs, info

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict]:
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        n = self.num_envs
        per_env = [
            {k: v[i] for k, v in infos.items() if not k.startswith("_") and isinstance(v, np.ndarray) and len(v) == n}
            for i in range(n)
        ]
        self.logger.log(self._obs, actions, rewards, terminated, truncated, per_env)
        if self._next_step_reset:  # that step only reset the envs that had finished
            for i in np.nonzero(self._resetting)[0]:
                self.logger.reset_env(int(i))
            self._resetting = np.asarray(terminated, dtype=bool) | np.asarray(truncated, dtype=bool)
        self._obs = obs
        return obs, rewards, terminated, truncated, infos


def sb3_end_flags(dones: Any, infos: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """(terminated, truncated) from an SB3 VecEnv's ``dones`` and its TimeLimit infos."""
    dones = np.asarray(dones, dtype=bool).reshape(-1)
    truncated = (
        np.array([bool(i.get("TimeLimit.truncated", False)) for i in infos], dtype=bool) if len(infos) else np.zeros_like(dones)
    )
    return dones & ~truncated, truncated


def _sb3_vec_wrapper(env: Any, handle: Any, *, obs_names: Sequence[str] | None, metrics: Mapping | None) -> Any:
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class SB3VecMetricsWrapper(VecEnvWrapper):
        """stable-baselines3 VecEnv wrapper: one metric row per env per step (SB3 resets envs itself)."""

        def __init__(self, venv: Any) -> None:
            super().__init__(venv)
            self.logger = StepLogger(
                handle, venv.num_envs, venv.observation_space, venv.action_space, obs_names=obs_names, metrics=metrics
            )
            self._obs: Any = None
            self._actions: Any = None

        def reset(self) -> Any:
            obs = self.venv.reset()
            self._obs = obs
            self.logger.reset_env()
            return obs

        def step_async(self, actions: Any) -> None:
            self._actions = actions
            self.venv.step_async(actions)

        def step_wait(self) -> Any:
            obs, rewards, dones, infos = self.venv.step_wait()
            terminated, truncated = sb3_end_flags(dones, infos)
            self.logger.log(self._obs, self._actions, rewards, terminated, truncated, infos)
            self._obs = obs
            return obs, rewards, dones, infos

    return SB3VecMetricsWrapper(env)


def wrap_env(handle: Any, env: Any, *, obs_names: Sequence[str] | None = None, metrics: Mapping | None = None) -> Any:
    if isinstance(env, gymnasium.vector.VectorEnv):
        return VectorMetricsWrapper(env, handle, obs_names=obs_names, metrics=metrics)
    if hasattr(env, "step_async") and hasattr(env, "step_wait") and hasattr(env, "num_envs"):
        return _sb3_vec_wrapper(env, handle, obs_names=obs_names, metrics=metrics)
    if isinstance(env, gymnasium.Env):
        return MetricsWrapper(env, handle, obs_names=obs_names, metrics=metrics)
    raise TypeError(f"cannot wrap {type(env).__name__}: expected a gymnasium Env, a gymnasium vector env or an SB3 VecEnv")
