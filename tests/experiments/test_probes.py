"""Probes find planted signals and nothing in noise; the causal checks move the return when they should."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from agent_side.taps import tensor_hook
from monitor.experiments.interrogate import (
    ablation_effect,
    greedy_subspace,
    pca,
    plot_ablation_curve,
    polarity_inversion,
    projected,
)
from monitor.experiments.probes import collect, fit_probe, plot_probe_heatmap, probe_table, r2_score
from monitor.transcoders.splice import mean_return

# A linear CartPole controller (push right when theta + theta_dot / 2 > 0) that reaches 500 from seeds 0-4.
GOOD_W = torch.tensor([0.0, 0.0, 1.0, 0.5])


def _agent(net: nn.Module) -> tuple:
    act = lambda obs: int(net(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax())  # noqa: E731
    return net, lambda: gym.make("CartPole-v1"), act


def _random_policy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def _good_policy() -> nn.Sequential:
    """obs -> identity layer -> logits (-s, s) with s = GOOD_W·obs: its '1:in' tap is the observation itself."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.stack([-GOOD_W, GOOD_W]))
        net[2].bias.zero_()
    return net


def _planted(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    w = rng.standard_normal(8)
    X = np.concatenate([y[:, None] * w + 0.05 * rng.standard_normal((n, 8)), rng.standard_normal((n, 12))], axis=1)
    return X, y, np.concatenate([w, np.zeros(12)])


@pytest.mark.parametrize("kind", ["ridge", "lasso"])
def test_linear_probe_finds_a_planted_metric_and_nothing_in_noise(kind: str) -> None:
    X, y, w = _planted()
    p = fit_probe(X, y, kind=kind)
    assert p.r2_test > 0.95 and p.r2_train > 0.95
    np.testing.assert_allclose(p.predict(X[:5]), y[:5], atol=0.2)
    # the direction lives in the activation space, on the dims that carry y, not the pure-noise ones
    assert np.abs(p.direction[8:]).max() < 0.05
    if kind == "ridge":  # isotropic noise: ridge's weights line up with the planted w (lasso keeps a subset)
        assert abs(float(p.direction @ w) / np.linalg.norm(w)) > 0.95
    noise = np.random.default_rng(1).standard_normal(len(X))
    assert fit_probe(X, noise, kind=kind).r2_test < 0.1


def test_lasso_keeps_only_the_dims_that_carry_the_signal() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 20)) * rng.uniform(0.5, 3.0, 20)  # unequal scales: standardization must cope
    y = 2.0 * X[:, 3] - 1.5 * X[:, 11] + 0.1 * rng.standard_normal(1000)
    lasso, ridge = fit_probe(X, y, kind="lasso"), fit_probe(X, y, kind="ridge")
    assert 2 <= lasso.n_nonzero <= 4 and lasso.r2_test > 0.95
    assert set(np.flatnonzero(np.abs(lasso.direction) > 0.05)) == {3, 11}
    assert ridge.n_nonzero == 20


def test_mlp_probe_fits_a_nonlinear_target_that_ridge_cannot_and_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((1500, 3))
    y = X[:, 0] ** 2
    mlp, ridge = fit_probe(X, y, kind="mlp", seed=5), fit_probe(X, y, kind="ridge")
    assert mlp.r2_test > 0.85 and ridge.r2_test < 0.2
    assert mlp.direction is None and mlp.n_nonzero == 3
    again = fit_probe(X, y, kind="mlp", seed=5)
    assert again.r2_test == mlp.r2_test
    np.testing.assert_array_equal(again.predict(X[:10]), mlp.predict(X[:10]))


def test_held_out_rows_are_whole_blocks_so_a_memorized_trend_does_not_pass() -> None:
    # activations that only say "when" (narrow bumps along time) and a metric that only drifts with time
    t = np.arange(400, dtype=np.float64)
    X = np.exp(-(((t[:, None] - np.arange(0, 400, 10.0)) / 4.0) ** 2))
    y = np.cumsum(np.random.default_rng(4).standard_normal(400))
    idx = np.random.default_rng(0).permutation(400)  # a row-wise split interpolates between neighbours...
    A = np.c_[X, np.ones(400)]
    w = np.linalg.lstsq(A[idx[:320]], y[idx[:320]], rcond=None)[0]
    assert r2_score(y[idx[320:]], A[idx[320:]] @ w) > 0.8
    assert fit_probe(X, y, kind="ridge").r2_test < 0.3  # ...held-out blocks of steps cannot be


def test_probe_table_and_heatmap(tmp_path: Path) -> None:
    X, y, _ = _planted(n=600)
    rows = probe_table(X, {"planted": y, "noise": np.random.default_rng(7).standard_normal(600)}, kinds=("ridge", "lasso"))
    assert [(r["metric"], r["kind"]) for r in rows] == [
        ("planted", "ridge"),
        ("planted", "lasso"),
        ("noise", "ridge"),
        ("noise", "lasso"),
    ]
    assert rows[0]["r2_test"] > 0.95 > rows[2]["r2_test"]
    out = plot_probe_heatmap(rows, tmp_path / "probes.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_pca_matches_numpy_svd() -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 3.0
    p = pca(X)
    _, s, vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    np.testing.assert_allclose(p.explained_variance_ratio, s**2 / (s**2).sum(), rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(p.components * vt, axis=1)), 1.0, rtol=1e-10)
    np.testing.assert_allclose(p.project(X, 6), X, atol=1e-9)
    top2 = pca(X, k=2)
    assert top2.components.shape == (2, 6) and top2.explained_variance_ratio.sum() < 1.0


def test_collect_records_one_tap_row_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import monitor.experiments.probes as probes

    calls = []  # every call of collect's recording function

    def counted(module, site, fn):  # the real tensor_hook, its function counted
        return tensor_hook(module, site, lambda t: (calls.append(1), fn(t))[1])

    monkeypatch.setattr(probes, "tensor_hook", counted)
    net = _random_policy()
    ro = collect(_agent(net), "1:out", episodes=2, seed=0)
    assert len(calls) == len(ro.X)
    assert ro.X.shape == (len(ro.obs), 16) and ro.X.dtype == np.float32
    assert len(ro.returns) == 2 and ro.returns.sum() == ro.rewards.sum() == len(ro.X)  # CartPole pays 1 per step
    with torch.no_grad():
        expected = torch.tanh(net[0](torch.as_tensor(ro.obs))).numpy()
    np.testing.assert_allclose(ro.X, expected, atol=1e-6)
    assert ro.returns[0] == mean_return(lambda: gym.make("CartPole-v1"), _agent(net)[2], 1, seed=0)
    n = len(calls)
    with torch.no_grad():
        net(torch.zeros(3, 4))
    assert len(calls) == n  # the recording hook came off: a later forward records nothing


def test_collect_shows_the_policy_the_transformed_obs_but_keeps_the_true_one() -> None:
    def flip(o: np.ndarray) -> np.ndarray:
        o = o.copy()
        o[2] = -o[2]
        return o

    ro = collect(_agent(_good_policy()), "0:in", episodes=1, seed=0, obs_transform=flip)
    np.testing.assert_allclose(ro.X[:, 2], -ro.obs[:, 2], atol=1e-7)
    np.testing.assert_allclose(ro.X[:, [0, 1, 3]], ro.obs[:, [0, 1, 3]], atol=1e-7)


def test_polarity_inversion_at_the_input_tap_collapses_the_probe() -> None:
    res = polarity_inversion(_agent(_good_policy()), "0:in", obs_index=2, metric_name="pole angle", episodes=2, seed=0)
    assert res["metric"] == "pole angle"
    assert res["r2_normal"] > 0.99
    assert res["r2_inverted"] < -1.0 and res["r2_vs_negated"] > 0.95 and res["dropped"]
    assert res["return_inverted"] < res["return_normal"]  # a sign-flipped angle sensor topples the pole


def test_polarity_inversion_runs_on_a_hidden_tap() -> None:
    res = polarity_inversion(_agent(_random_policy()), "1:out", obs_index=2, episodes=3, seed=0)
    assert {"r2_normal", "r2_inverted", "r2_vs_negated", "dropped", "return_normal", "return_inverted"} <= set(res)
    assert res["metric"] == "obs[2]"


def test_ablating_the_direction_the_policy_uses_breaks_it_a_random_one_less_so() -> None:
    agent = _agent(_good_policy())
    res = ablation_effect(agent, "2:in", GOOD_W.numpy(), episodes=3, seed=0)
    assert res["return_clean"] == 500.0
    assert res["return_ablated"] < 50.0 and res["delta"] == res["return_ablated"] - 500.0
    assert res["return_random"] > res["return_ablated"]
    probe_x = torch.randn(64, 4)
    with torch.no_grad():
        torch.testing.assert_close(agent[0](probe_x), _good_policy()(probe_x), rtol=0, atol=0)  # both steers came off


def test_projection_hook_is_the_pca_projection_and_comes_off() -> None:
    net = _good_policy()
    rng = np.random.default_rng(6)
    X = (rng.standard_normal((200, 4)) * [1.0, 0.5, 0.2, 0.1]).astype(np.float32)
    p = pca(X)
    seen = []
    h = net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        with projected(net, "1:out", p, 2):
            net(torch.as_tensor(X[:7]))
        net(torch.as_tensor(X[:7]))
    h.remove()
    np.testing.assert_allclose(seen[0].numpy(), p.project(X[:7], 2), atol=1e-5)
    np.testing.assert_array_equal(seen[1].numpy(), X[:7])  # outside the block the tap is untouched


def _loud_policy() -> nn.Sequential:
    """Like the good policy, but its hidden layer carries the control signal s loudly (10 s) beside
    the raw observation, and the readout looks only at s."""
    net = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.cat([10.0 * GOOD_W[None], torch.eye(4)]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[-1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]]))
        net[2].bias.zero_()
    return net


@pytest.mark.timeout(120)
def test_greedy_subspace_stops_at_the_first_k_that_keeps_the_return(tmp_path: Path) -> None:
    loud = _agent(_loud_policy())
    res = greedy_subspace(loud, "2:in", collect(loud, "2:in", episodes=2, seed=10).X, keep=0.95, episodes=2, seed=0)
    assert res["return_clean"] == 500.0 and res["k"] == 1 and res["curve"] == [(1, 500.0)]
    # the good policy reads obs through small-variance directions: every component is needed
    agent = _agent(_good_policy())
    X = collect(agent, "2:in", episodes=2, seed=10).X
    res = greedy_subspace(agent, "2:in", X, keep=0.95, episodes=2, seed=0)
    assert res["k"] == 4 and [k for k, _ in res["curve"]] == [1, 2, 3, 4]
    assert res["curve"][-1][1] >= 0.95 * 500.0 and all(r < 475.0 for _, r in res["curve"][:-1])
    capped = greedy_subspace(agent, "2:in", X, keep=0.95, episodes=2, seed=0, max_k=2)
    assert capped["k"] is None and [k for k, _ in capped["curve"]] == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(agent[0](torch.as_tensor(X)), _good_policy()(torch.as_tensor(X)), rtol=0, atol=0)
    out = plot_ablation_curve(res["curve"], tmp_path / "curve.png", clean=res["return_clean"], keep=0.95)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_exported_names() -> None:
    import monitor.experiments.interrogate
    import monitor.experiments.probes

    assert sorted(monitor.experiments.probes.__all__) == sorted(
        ["Rollouts", "collect", "Probe", "fit_probe", "r2_score", "probe_table", "plot_probe_heatmap"]
    )
    assert sorted(monitor.experiments.interrogate.__all__) == sorted(
        ["polarity_inversion", "ablation_effect", "PCA", "pca", "projected", "greedy_subspace", "plot_ablation_curve"]
    )
    for mod in (monitor.experiments.probes, monitor.experiments.interrogate):
        assert all(hasattr(mod, n) for n in mod.__all__)
