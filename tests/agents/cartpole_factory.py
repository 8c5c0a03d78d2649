"""An agent factory for `interlatent train --agent agents.cartpole_factory:make` in the tests."""

import gymnasium as gym

from monitor.tools.demo import make_ppo


def make():
    model = make_ppo(seed=3)
    return model.policy, lambda: gym.make("CartPole-v1"), lambda obs: model.predict(obs, deterministic=True)[0]
