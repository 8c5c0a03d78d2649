"""Which signal warns of a CartPole failure earlier and more precisely: a z-score on the raw
observation, or a hidden channel the monitor learned to watch?

1. A half-trained PPO policy (it still fails often) streams into a monitor; the monitor profiles
   the last k steps before each failure and suggests threshold rules.
2. A fresh run streams into a monitor with three rules: a z-score on the raw pole angle and
   angular velocity, a threshold on |pole angle|, and the best suggested hidden-channel rule.
3. `evaluate-alerts` scores each rule: precision, recall and median lead time in steps.

    .venv/bin/python examples/early_warning_cartpole.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import torch
import yaml

import agent_side
from monitor.store.embedded import EmbeddedRedis, free_port
from monitor.store.records import Store, connect
from monitor.tools.demo import CARTPOLE_OBS, DEMO_TAPS, demo_policy
from monitor.tools.services import Services


def stream(model, endpoint: str, run: str, steps: int, seed: int) -> None:
    with agent_side.attach(model.policy, DEMO_TAPS, run=run, endpoint=endpoint) as tap:
        tap.wait_for_monitor(10)
        env = tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
        obs, _ = env.reset(seed=seed)
        for _ in range(steps):
            action, _ = model.predict(obs, deterministic=False)
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=6000, help="a half-trained policy fails often enough to learn from")
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        model = demo_policy(data, train_steps=a.train_steps, progress=print)
        with EmbeddedRedis(data, persist=False, write_url=False) as url:
            store = Store(connect(url))
            ep = f"tcp://127.0.0.1:{free_port()}"
            with Services(data_dir=data, redis_url=url, endpoint=ep, log_dir=data):
                stream(model, ep, "learn", a.steps, seed=0)
            suggested = store.suggestions("learn")
            hidden = [s for s in suggested if s["rule"]["tap"] == DEMO_TAPS[1]][:1]
            print("suggested:", json.dumps(suggested[:3], indent=1))
            rules = {
                "rules": [
                    {"name": "raw-zscore", "kind": "zscore", "tap": DEMO_TAPS[0], "channels": [2, 3], "z": 2.5},
                    {
                        "name": "raw-pole-angle",
                        "kind": "threshold",
                        "tap": DEMO_TAPS[0],
                        "channels": [2],
                        "above": 0.12,
                        "below": -0.12,
                    },
                    *({**h["rule"], "name": "learned-hidden"} for h in hidden),
                ]
            }
            (data / "rules.yaml").write_text(yaml.safe_dump(rules))
            ep = f"tcp://127.0.0.1:{free_port()}"
            with Services(
                data_dir=data,
                redis_url=url,
                endpoint=ep,
                log_dir=data,
                extra_monitor_args=["--rules", str(data / "rules.yaml"), "--metrics-port", "-1"],
            ):
                stream(model, ep, "evaluate", a.steps, seed=1)
            out = subprocess.run(
                [sys.executable, "-m", "monitor", "evaluate-alerts", "--run", "evaluate", "--k", str(a.k), "--redis", url],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout)


if __name__ == "__main__":
    main()
