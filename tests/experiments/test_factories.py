"""The agent factory contract: ``(module, make_env, act)`` or with a fourth ``reset()`` run at every
episode start, and every way a factory goes wrong is one line naming it."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from agents import lstm_cartpole

from monitor.experiments.agents import EXPECTED, AgentError, as_agent, load_agent
from monitor.experiments.episodes import run_episodes
from monitor.experiments.probes import collect, first_step
from monitor.transcoders.splice import mean_return


def _load(name: str, tmp_path: Path) -> tuple:
    return load_agent(f"agents.lstm_cartpole:{name}", data_dir=tmp_path)


def test_reset_runs_at_the_start_of_every_episode_before_the_envs_reset() -> None:
    calls: list[str] = []

    class Env(gym.Wrapper):
        def reset(self, **kw):
            calls.append("env.reset")
            return super().reset(**kw)

    agent = as_agent((None, lambda: Env(gym.make("CartPole-v1")), lambda obs: 0, lambda: calls.append("policy.reset")))
    assert len(agent) == 3  # every consumer of the triple keeps working
    runs = run_episodes(agent, episodes=3, seed=0)
    assert calls == ["policy.reset", "env.reset"] * 3 and len(runs) == 3
    triple = (None, lambda: gym.make("CartPole-v1"), lambda obs: 0)
    assert as_agent(triple) == triple  # no reset: the agent as it was


@pytest.mark.timeout(60)
def test_an_lstm_policy_starts_every_episode_afresh_with_reset(tmp_path: Path) -> None:
    fresh = [r.episode_return for r in run_episodes(_load("make", tmp_path), episodes=4, seed=0)]
    alone = [run_episodes(_load("make", tmp_path), episodes=1, seed=i)[0].episode_return for i in range(4)]
    assert fresh == alone and min(fresh) > 100.0  # each episode as if it ran on its own
    carried = [r.episode_return for r in run_episodes(_load("make_no_reset", tmp_path), episodes=4, seed=0)]
    assert carried[0] == fresh[0] and max(carried[1:]) < 20.0  # without reset the counter carries over
    # the probes' rollouts and splice's return recovered see the same fresh episodes
    agent = _load("make", tmp_path)
    ro = collect(agent, lstm_cartpole.TAP, episodes=3, seed=0)
    assert ro.returns.tolist() == fresh[:3] and ro.X.shape == (sum(fresh[:3]), 3)
    starts = np.flatnonzero(np.diff(ro.episode, prepend=-1))
    np.testing.assert_allclose(ro.X[starts, 0], np.tanh(lstm_cartpole.STEP), rtol=1e-5)  # the counter restarts
    assert mean_return(agent[1], agent[2], 3, seed=0) == np.mean(fresh[:3])
    obs, rows = first_step(agent, lstm_cartpole.TAP, seed=0)
    assert obs.shape == (4,) and rows.shape == (1, 3)
    assert run_episodes(agent, episodes=1, seed=0)[0].episode_return == fresh[0]  # the check step left no trace


def test_factory_errors_are_one_line_with_the_factorys_message(tmp_path: Path) -> None:
    def error(spec: str) -> str:
        with pytest.raises(AgentError) as e:
            load_agent(spec, data_dir=tmp_path)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = error("agents.bad_factories:raises")
    assert "RuntimeError" in msg and "no checkpoint at /nowhere/policy.pt (train one first)" in msg
    assert EXPECTED in error("agents.bad_factories:bare_module") and "got Linear" in error("agents.bad_factories:bare_module")
    assert "a tuple of 2 (Linear, function)" in error("agents.bad_factories:pair")
    assert "its make_env is str, not callable" in error("agents.bad_factories:env_name")
    assert "not a factory function" in error("agents.bad_factories:NOT_A_FUNCTION")
    assert "has no 'rasies'; did you mean raises?" in error("agents.bad_factories:rasies")
    assert "KeyError" in error("agents.raises_on_import:make") and "checkpoint" in error("agents.raises_on_import:make")
    assert "No module named" in error("agents.no_such_module:make")
    assert "package.module:factory" in error("agents.bad_factories")
    assert isinstance(AgentError("x"), ValueError)  # the train and judge commands' ValueError catch covers it
    with pytest.raises(AgentError, match="torch.nn.Module"):
        as_agent(("policy.pt", lambda: None, lambda obs: 0))
    with pytest.raises(AgentError, match="its reset is int"):
        as_agent((torch.nn.Linear(4, 2), lambda: None, lambda obs: 0, 3))
