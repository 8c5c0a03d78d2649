"""A CartPole agent whose action reads a direction with less variance than units it ignores.

The tapped layer (``2:in``, 5 wide) holds unit 0 = 0.1 (theta + theta_dot / 2), the only unit the
head reads (push right when it is positive, a controller that reaches 500), and units 1-4, noise of
sd 3 drawn fresh each step (torch's RNG, which the experiments seed per episode). The action's
direction is the tap's smallest principal component: keeping the top components in variance order
needs all 5, while the one component it reads keeps the whole return.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import nn

TAP = "2:in"
NOISE_SD = 3.0
QUIET = 0.1


class Noise(nn.Module):
    """Appends ``n`` units of Gaussian noise to each row."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, NOISE_SD * torch.randn(x.shape[0], self.n)], dim=-1)


@torch.no_grad()
def policy() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 1), Noise(4), nn.Identity(), nn.Linear(5, 2))
    net[0].weight.copy_(QUIET * torch.tensor([[0.0, 0.0, 1.0, 0.5]]))
    net[0].bias.zero_()
    net[3].weight.zero_()
    net[3].weight[0, 0], net[3].weight[1, 0] = -1.0, 1.0
    net[3].bias.zero_()
    return net.eval()


def make() -> tuple:
    net = policy()

    @torch.no_grad()
    def act(obs) -> int:
        return int(net(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax())

    return net, lambda: gym.make("CartPole-v1"), act
