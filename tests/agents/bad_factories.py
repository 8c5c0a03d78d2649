"""Factories that go wrong in the ways users' do, for the one-line errors of `interlatent probe`
and `sweep`; :func:`acts_never` is a good agent whose ``act`` fails, so a check that passes it
ran before any step."""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import nn

NOT_A_FUNCTION = 42


def raises():
    raise RuntimeError("no checkpoint at /nowhere/policy.pt\n(train one first)")


def bare_module():
    return nn.Linear(4, 2)


def pair():
    return nn.Linear(4, 2), lambda: gym.make("CartPole-v1")


def env_name():
    return nn.Linear(4, 2), "CartPole-v1", lambda obs: 0


def acts_never():
    net = nn.Sequential(nn.Identity(), nn.Linear(4, 2))

    def act(obs):
        raise AssertionError("act ran: a step was taken before the inputs were checked")

    return net, lambda: gym.make("CartPole-v1"), act


def two_rows():
    """The policy runs its net on the observation twice, batched: two rows per step at ``0:out``."""
    net = nn.Sequential(nn.Linear(4, 2))

    @torch.no_grad()
    def act(obs):
        x = torch.as_tensor(obs, dtype=torch.float32)
        return int(net(torch.stack([x, x])).sum(0).argmax())

    return net, lambda: gym.make("CartPole-v1"), act
