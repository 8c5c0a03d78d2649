"""A stable-baselines3 callback: stream only rollout forwards while ``model.learn()`` runs.

SB3 runs the policy twice per sample: once to act during the rollout and again, with
gradients, during the update. The hooks are paused outside rollouts, so only acting forwards
are streamed, each aligned with that step's observations, actions and rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from agent_side.envwrap import StepLogger, sb3_end_flags

__all__ = ["make_callback"]


def make_callback(handle: Any, *, obs_names: Sequence[str] | None = None, metrics: Mapping[str, Callable] | None = None) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class InterlatentCallback(BaseCallback):
        def _on_training_start(self) -> None:
            env = self.training_env
            self.step_logger = StepLogger(
                handle, env.num_envs, env.observation_space, env.action_space, obs_names=obs_names, metrics=metrics
            )
            handle.paused = True

        def _on_rollout_start(self) -> None:
            handle.paused = False

        def _on_rollout_end(self) -> None:
            handle.paused = True
            handle.flush()

        def _on_step(self) -> bool:
            loc = self.locals
            # The observation the policy acted on: on-policy algorithms keep it as obs_tensor;
            # off-policy ones have not yet replaced _last_obs when callbacks run.
            obs = loc.get("obs_tensor")
            obs = obs.cpu().numpy() if isinstance(obs, torch.Tensor) else self.model._last_obs
            actions = loc.get("clipped_actions", loc.get("actions"))
            infos = loc.get("infos", [])
            terminated, truncated = sb3_end_flags(loc.get("dones"), infos)
            self.step_logger.log(obs, actions, loc.get("rewards"), terminated, truncated, infos)
            # On-policy rollouts end with a value forward on the last observation: not an acting step.
            if "n_rollout_steps" in loc and loc.get("n_steps", -2) + 1 >= loc["n_rollout_steps"]:
                handle.paused = True
            return True

        def _on_training_end(self) -> None:
            handle.paused = False
            handle.flush()

    return InterlatentCallback()
