"""A user's agent script: SB3 PPO on CartPole with one attach call. Prints its counters as JSON."""

import argparse
import json
import sys
import time

import gymnasium as gym
import torch

import agent_side
from monitor.tools.demo import CARTPOLE_OBS, DEMO_TAPS, make_ppo

p = argparse.ArgumentParser()
p.add_argument("--endpoint", required=True)
p.add_argument("--run", default="cartpole-eval")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--sleep-ms", type=float, default=0.0)
p.add_argument("--wait-monitor-s", type=float, default=20.0)
p.add_argument("--spike-at", type=int, default=-1, help="at this step the policy sees cart_pos = 50 (a planted spike)")
a = p.parse_args()

torch.set_num_threads(1)
model = make_ppo(seed=1)
with agent_side.attach(model.policy, DEMO_TAPS, run=a.run, endpoint=a.endpoint) as tap:
    if a.wait_monitor_s and not tap.wait_for_monitor(a.wait_monitor_s):
        sys.exit("no monitor")
    env = tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=0)
    for i in range(a.steps):
        seen = obs.copy()
        if i == a.spike_at:
            seen[0] = 50.0
        action, _ = model.predict(seen, deterministic=False)
        obs, r, term, trunc, _ = env.step(action)
        if term or trunc:
            obs, _ = env.reset()
        if a.sleep_ms:
            time.sleep(a.sleep_ms / 1000)
        if i % 100 == 0:
            print(json.dumps({"progress": i, **tap.counters()}), flush=True)
    tap.flush()
    counters = tap.counters()
print(json.dumps({"done": True, **counters}), flush=True)
