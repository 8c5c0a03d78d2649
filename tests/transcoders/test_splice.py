"""Splicing a transcoder into a policy, and zero-ablating a tap, change exactly what they say."""

from __future__ import annotations

import torch
from torch import nn

from monitor.transcoders.model import Transcoder
from monitor.transcoders.splice import mean_return, return_recovered, spliced


def _policy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_splice_replaces_the_target_with_the_reconstruction_and_comes_off() -> None:
    pol = _policy()
    x = torch.randn(5, 4)
    with torch.no_grad():
        clean = pol(x)
        tc = Transcoder(4, 3, 8)
        with spliced(pol, tc, "0:in", "1:out"):
            got = pol(x)
        expected = pol[2](tc.decode(tc.encode(x)))  # layer 1's output replaced by the reconstruction
        torch.testing.assert_close(got, expected)
        with spliced(pol, None, "0:in", "2:in"):
            ablated = pol(x)
        torch.testing.assert_close(ablated, pol[2].bias.expand(5, 2))  # fc's input zeroed: only its bias remains
        assert torch.equal(pol(x), clean)  # every hook came off: bit for bit


def test_return_recovered_of_an_exact_transcoder_is_one() -> None:
    import gymnasium as gym

    pol = _policy()
    act = lambda obs: int(pol(torch.as_tensor(obs)[None]).argmax())  # noqa: E731
    # an SAE on layer 1's output that reproduces it exactly: relu(x) - relu(-x) = x
    exact = Transcoder(8, 16, 8)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(8), -torch.eye(8)], dim=1))
        exact.b_enc.zero_()
        exact.W_dec.copy_(torch.cat([torch.eye(8), -torch.eye(8)], dim=0))
        exact.b_dec.zero_()
    res = return_recovered((pol, lambda: gym.make("CartPole-v1"), act), exact, "1:out", "1:out", episodes=3)
    assert res["return_spliced"] == res["return_clean"] == mean_return(lambda: gym.make("CartPole-v1"), act, 3)
    if res["return_recovered"] is not None:
        assert res["return_recovered"] == 1.0
