"""A user's agent script: a torch policy on a 2-env vector CartPole, the env wrapper's metrics and a
metric of its own logged with ``tap.log()``. Prints its counters as JSON."""

import argparse
import json
import sys

import gymnasium as gym
import torch
from torch import nn

import agent_side
from monitor.tools.demo import CARTPOLE_OBS

p = argparse.ArgumentParser()
p.add_argument("--endpoint", required=True)
p.add_argument("--run", default="logged")
p.add_argument("--steps", type=int, default=600)
a = p.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
with agent_side.attach(policy, ["0:in"], run=a.run, endpoint=a.endpoint) as tap:
    if not tap.wait_for_monitor(20):
        sys.exit("no monitor")
    env = tap.wrap(gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=0)
    for _ in range(a.steps):
        with torch.no_grad():
            logits = policy(torch.as_tensor(obs, dtype=torch.float32))
        tap.log(angle_x3=3.0 * float(obs[0, 2]) + 1.0)  # env 0's pole angle, the user's own metric
        obs, *_ = env.step(logits.argmax(-1).numpy())
    tap.flush()
    counters = tap.counters()
print(json.dumps({"done": True, **counters}), flush=True)
