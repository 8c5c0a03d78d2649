"""A steerable CartPole agent for the control tests: a fixed 4-16-2 MLP whose hidden units 0 and 1
are relu(+-(pole_angle + angle_vel)), so its argmax action balances the pole (and so alternates);
latent 0 of :func:`make_transcoder` points along hidden unit 0, so adding it pushes every action to 1.

Prints one JSON line per step ({"step", "action"}) and its counters at the end; stops after
--steps or when --stop-file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]
TAP = "1:out"


@torch.no_grad()
def make_policy() -> nn.Sequential:
    torch.manual_seed(0)
    pol = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    pol[0].weight.mul_(0.1)
    pol[0].weight[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    pol[0].weight[1] = -pol[0].weight[0]
    pol[0].bias.zero_()
    pol[2].weight.zero_()
    pol[2].bias.zero_()
    pol[2].weight[1, 0] = 1.0  # logit of "push right" = relu(angle + angle_vel)
    pol[2].weight[0, 1] = 1.0  # logit of "push left" = relu(-(angle + angle_vel))
    return pol.eval()


@torch.no_grad()
def make_transcoder():  # noqa: ANN201 - keeps monitor out of the agent's imports until asked
    from monitor.transcoders.model import Transcoder

    torch.manual_seed(1)
    tc = Transcoder(16, 3, 16)
    tc.W_dec[0] = torch.zeros(16)
    tc.W_dec[0, 0] = 1.0
    return tc.eval()


def act(pol: nn.Module, obs) -> int:  # noqa: ANN001
    with torch.no_grad():
        return int(pol(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax())


def main() -> None:
    import gymnasium as gym

    import agent_side

    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--run", default="steerable")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--sleep-ms", type=float, default=10.0)
    p.add_argument("--allow-control", action="store_true")
    p.add_argument("--stop-file")
    a = p.parse_args()

    torch.set_num_threads(1)
    pol = make_policy()
    with agent_side.attach(pol, [TAP], run=a.run, endpoint=a.endpoint, allow_control=a.allow_control) as tap:
        if not tap.wait_for_monitor(20):
            sys.exit("no monitor")
        env = tap.wrap(gym.make("CartPole-v1"), obs_names=OBS)
        obs, _ = env.reset(seed=0)
        for _ in range(a.steps):
            if a.stop_file and os.path.exists(a.stop_file):
                break
            step, action = tap.step, act(pol, obs)
            print(json.dumps({"step": step, "action": action}), flush=True)
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset()
            time.sleep(a.sleep_ms / 1000)
        tap.flush()
    print(json.dumps({"done": True, **tap.counters()}), flush=True)


if __name__ == "__main__":
    main()
