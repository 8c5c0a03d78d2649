"""A recurrent CartPole agent with a known structure, for the factory's ``reset()``: a 4→3 LSTM
whose hidden unit 0 counts steps (its cell gains 0.01 a step, nothing forgets it), unit 1 is
tanh(tanh(theta + theta_dot / 2)) and unit 2 tanh(tanh(cart_pos)), both from the current step only.

``act`` balances the pole by the sign of unit 1 until unit 0 passes tanh(1), about 100 steps after
the state was last reset, then pushes left for good and the pole falls: an episode from a fresh
state lasts a little over 100 steps, one that inherits the last episode's state about 10.
:func:`make` returns ``(module, make_env, act, reset)``; :func:`make_no_reset` the same policy
without its ``reset``. The tap ``lstm:out`` streams the LSTM's output, one row of 3 per step.
"""

from __future__ import annotations

import math

import gymnasium as gym
import torch
from torch import nn

TAP = "lstm:out"
STEP = 0.01  # the counter's gain per step
GIVE_UP = math.tanh(1.0)  # unit 0 passes this after 1 / STEP steps


class LSTMPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3)
        big = 20.0  # saturates a gate: sigmoid(20) = 1 - 2e-9
        with torch.no_grad():
            for p in self.lstm.parameters():
                p.zero_()
            w, b = self.lstm.weight_ih_l0, self.lstm.bias_ih_l0  # gate rows: input, forget, cell, output
            b[0:3] = big  # every input gate open
            b[9:12] = big  # every output gate open
            b[3] = big  # unit 0 never forgets...
            b[6] = math.atanh(STEP)  # ...and adds STEP each step
            b[4:6] = -big  # units 1 and 2 forget everything each step...
            w[7] = torch.tensor([0.0, 0.0, 1.0, 0.5])  # ...and take theta + theta_dot / 2
            w[8] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # and cart_pos

    def forward(self, obs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
        return self.lstm(obs, state)


def _parts() -> tuple:
    policy = LSTMPolicy().eval()
    memory: dict[str, tuple | None] = {"state": None}

    @torch.no_grad()
    def act(obs) -> int:
        out, memory["state"] = policy(torch.as_tensor(obs, dtype=torch.float32).reshape(1, 1, 4), memory["state"])
        h = out[0, 0]
        return 0 if float(h[0]) > GIVE_UP else int(float(h[1]) > 0.0)

    def reset() -> None:
        memory["state"] = None

    return policy, lambda: gym.make("CartPole-v1"), act, reset


def make() -> tuple:
    return _parts()


def make_no_reset() -> tuple:
    return _parts()[:3]
