"""Probes find planted signals and nothing in noise; the causal checks move the return when they
should, and every effect carries its uncertainty (fold spread, per-episode returns, intervals,
random-direction controls, a bootstrap interval of the minimal subspace)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from agents import quiet_cartpole
from torch import nn

from agent_side.taps import tensor_hook
from monitor.experiments.episodes import run_episodes
from monitor.experiments.interrogate import (
    ablated,
    ablation_effect,
    greedy_subspace,
    pca,
    plot_ablation_curve,
    polarity_inversion,
    projected,
)
from monitor.experiments.probes import collect, cross_validate, fit_probe, plot_probe_heatmap, probe_table, r2_score
from monitor.experiments.subspace import minimal_k
from monitor.stats.intervals import diff_ci
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
    for r in rows:  # the held-out R² is the mean over the stated folds, with their spread
        assert r["folds"] == 5 and len(r["r2_test_folds"]) == 5
        assert r["r2_test"] == pytest.approx(np.mean(r["r2_test_folds"]))
        assert r["r2_test_sd"] == pytest.approx(np.std(r["r2_test_folds"], ddof=1))
    assert rows[0]["r2_test_sd"] < 0.01 and rows[1]["n_nonzero"] <= 20 and rows[0]["alpha"] is not None
    assert probe_table(X, {"planted": y}, kinds=("ridge",), folds=3)[0]["folds"] == 3
    out = plot_probe_heatmap(rows, tmp_path / "probes.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_cross_validation_holds_out_contiguous_blocks_and_shows_the_spread() -> None:
    # the metric is carried for the first 800 steps and not at all in the last 200
    rng = np.random.default_rng(8)
    X = rng.standard_normal((1000, 8))
    y = X @ rng.standard_normal(8) + 0.1 * rng.standard_normal(1000)
    y[800:] = y.std() * rng.standard_normal(200)
    cv = cross_validate(X, y, kind="ridge", folds=5)
    assert cv.folds == 5 and len(cv.probes) == 5
    for i, p in enumerate(cv.probes):  # fold i held out the i-th fifth of the steps, in time order
        block = slice(200 * i, 200 * (i + 1))
        assert p.r2_test == pytest.approx(r2_score(y[block], p.predict(X[block])))
    assert min(cv.r2_test[:4]) > 0.5 and cv.r2_test[4] < 0.1  # one split could have said either
    assert cv.r2_mean == pytest.approx(cv.r2_test.mean()) and cv.r2_sd > 0.3
    assert cross_validate(X, y, kind="ridge", folds=5).r2_test.tolist() == cv.r2_test.tolist()  # deterministic
    with pytest.raises(ValueError, match="folds"):
        cross_validate(X, y, folds=1)


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
    agent = _agent(_good_policy())
    res = polarity_inversion(agent, "0:in", obs_index=2, metric_name="pole angle", episodes=3, seed=0, folds=4)
    assert res["metric"] == "pole angle" and res["folds"] == 4 and len(res["r2_normal_folds"]) == 4
    assert res["r2_normal"] > 0.99 and res["r2_normal_sd"] < 0.01
    assert res["r2_inverted"] < -1.0 and res["r2_vs_negated"] > 0.95 and res["dropped"]
    assert len(res["r2_inverted_folds"]) == 4 and res["r2_inverted_sd"] >= 0.0
    # per-episode returns, as a plain rerun of the same seeds gives them (with and without the flip)
    assert res["normal"]["returns"] == [r.episode_return for r in run_episodes(agent, episodes=3, seed=0)] == [500.0] * 3
    flipped = collect(agent, "0:in", episodes=3, seed=0, obs_transform=lambda o: o * np.array([1, 1, -1, 1], np.float32))
    assert res["inverted"]["returns"] == list(flipped.returns) and res["inverted"]["n"] == 3
    assert (
        res["return_inverted"] == np.mean(flipped.returns) < res["return_normal"]
    )  # a sign-flipped angle sensor topples the pole
    assert res["diff"] == diff_ci(res["normal"]["returns"], res["inverted"]["returns"])
    assert res["diff"]["ci"][1] < 0.0 and res["diff"]["excludes_zero"]


def test_polarity_inversion_runs_on_a_hidden_tap() -> None:
    res = polarity_inversion(_agent(_random_policy()), "1:out", obs_index=2, episodes=3, seed=0)
    assert {"r2_normal", "r2_inverted", "r2_vs_negated", "dropped", "return_normal", "return_inverted"} <= set(res)
    assert res["metric"] == "obs[2]" and res["folds"] == 5


def _episodes_with_hook(agent: tuple, module: nn.Module, edit, episodes: int) -> list[float]:
    """Returns with a hand-written forward-pre hook editing the module's input: the reference."""
    h = module.register_forward_pre_hook(lambda m, args: (edit(args[0]),))
    try:
        return [r.episode_return for r in run_episodes(agent, episodes=episodes, seed=0)]
    finally:
        h.remove()


def test_ablating_the_direction_the_policy_uses_breaks_it_random_ones_less_so() -> None:
    agent = _agent(_good_policy())
    X = collect(agent, "2:in", episodes=2, seed=0).X
    res = ablation_effect(agent, "2:in", GOOD_W.numpy(), X=X, episodes=3, seed=0, random_directions=5)
    assert res["modes"] == ["zero", "mean"] and set(res["ablations"]) == {"zero", "mean"} and res["episodes"] == 3
    assert res["clean"]["returns"] == [500.0] * 3 and res["return_clean"] == 500.0
    u = (GOOD_W / GOOD_W.norm()).double()
    for mode, value in (("zero", 0.0), ("mean", float(np.mean(X @ u.numpy())))):
        cell = res["ablations"][mode]
        assert cell["value"] == pytest.approx(value, abs=1e-9)
        reference = _episodes_with_hook(agent, agent[0][2], lambda x, v=value: x + (v - x @ u.float())[:, None] * u.float(), 3)
        assert cell["returns"] == reference and max(reference) < 50.0  # the controller reads nothing else
        assert cell["diff"] == diff_ci(res["clean"]["returns"], cell["returns"]) and cell["diff"]["ci"][1] < 0.0
        controls = cell["random"]
        assert controls["n"] == len(controls["deltas"]) == 5
        assert controls["min"] <= controls["mean"] <= controls["max"] and controls["mean"] > cell["diff"]["mean"]
        assert controls["p_empirical"] == (1 + sum(d <= cell["diff"]["mean"] for d in controls["deltas"])) / 6
    # the first mode's figures under the names they always had
    assert res["return_ablated"] == res["ablations"]["zero"]["mean"] and res["delta"] == res["return_ablated"] - 500.0
    assert res["return_random"] == pytest.approx(500.0 + res["ablations"]["zero"]["random"]["mean"])
    assert res["return_random"] > res["return_ablated"]
    probe_x = torch.randn(64, 4)
    with torch.no_grad():
        torch.testing.assert_close(agent[0](probe_x), _good_policy()(probe_x), rtol=0, atol=0)  # every steer came off


def _offset_policy() -> nn.Sequential:
    """The good controller plus a unit that sits near 5 (5 + 0.01 cart_pos) and enters the logit
    gap as (unit - 5): on the data it adds almost nothing, at 0 it pushes left every step."""
    net = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:4] = torch.eye(4)
        net[0].weight[4, 0] = 0.01
        net[0].bias.zero_()
        net[0].bias[4] = 5.0
        net[2].weight.copy_(torch.stack([torch.cat([-GOOD_W, torch.zeros(1)]), torch.cat([GOOD_W, torch.ones(1)])]))
        net[2].bias.copy_(torch.tensor([0.0, -5.0]))
    return net


def test_mean_ablation_keeps_what_zero_ablation_breaks_off_the_data() -> None:
    agent = _agent(_offset_policy())
    X = collect(agent, "2:in", episodes=2, seed=0).X
    e4 = np.eye(5)[4]
    res = ablation_effect(agent, "2:in", e4, X=X, episodes=3, random_directions=2)
    zero, mean = res["ablations"]["zero"], res["ablations"]["mean"]
    assert res["clean"]["returns"] == [500.0] * 3
    assert max(zero["returns"]) < 30.0 and set(zero["modes"]) == {"pole_right"}  # pushed left every step, it topples right
    assert mean["value"] == pytest.approx(5.0, abs=0.05) and mean["returns"] == [500.0] * 3
    assert mean["diff"]["mean"] == 0.0 and zero["diff"]["excludes_zero"]
    only_zero = ablation_effect(agent, "2:in", e4, episodes=2, modes=("zero",), random_directions=1)
    assert only_zero["modes"] == ["zero"] and set(only_zero["ablations"]) == {"zero"}
    with pytest.raises(ValueError, match="ablation modes"):
        ablation_effect(agent, "2:in", e4, episodes=1, modes=("median",))


def test_ablated_sets_the_component_and_comes_off() -> None:
    net = _offset_policy()
    x = torch.randn(7, 5)
    seen = []
    h = net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))  # sees what 1:out hands on
    u = np.array([1.0, 2.0, 0.0, 0.0, 2.0])
    with torch.no_grad():
        with ablated(net, "1:out", u, value=1.5):
            net[2](net[1](x))
        net[2](net[1](x))
    h.remove()
    unit = torch.as_tensor(u / 3.0, dtype=torch.float32)
    torch.testing.assert_close(seen[0] @ unit, torch.full((7,), 1.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[0] - (seen[0] @ unit)[:, None] * unit, x - (x @ unit)[:, None] * unit, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[1], x, atol=0, rtol=0)


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
def test_greedy_by_return_finds_the_quiet_direction_variance_order_needs_everything(tmp_path: Path) -> None:
    agent = quiet_cartpole.make()
    tap = quiet_cartpole.TAP
    X = collect(agent, tap, episodes=2, seed=10).X
    p = pca(X)
    assert p.explained_variance_ratio[-1] < 1e-4  # the read direction is the quietest component
    res = greedy_subspace(agent, tap, X, keep=0.95, episodes=2, seed=0)
    assert res["order"] == "return" and res["return_clean"] == 500.0 and res["bar"] == 475.0
    assert res["k"] == 1 and res["k_ci"] == [1, 1] and res["components"] == [4] and res["curve"] == [(1, 500.0)]
    step = res["points"][0]
    assert sorted(c for c, _ in step["tried"]) == [0, 1, 2, 3, 4] and step["returns"] == [500.0, 500.0]
    assert max(m for c, m in step["tried"] if c != 4) < 100.0  # any one noise component alone topples the pole
    # the projection greedy chose, rerun by hand, keeps the return
    with projected(agent[0], tap, p, [4]):
        assert [r.episode_return for r in run_episodes(agent, episodes=2, seed=0)] == [500.0, 500.0]
    var = res["variance_order"]
    assert var["order"] == "variance" and var["k"] == 5 and [k for k, _ in var["curve"]] == [1, 2, 3, 4, 5]
    assert all(r < 475.0 for _, r in var["curve"][:-1]) and var["curve"][-1][1] == 500.0 and var["k_ci"] == [5, 5]
    capped = greedy_subspace(agent, tap, X, keep=0.95, episodes=2, seed=0, max_k=2)
    assert capped["k"] == 1 and capped["variance_order"]["k"] is None and capped["variance_order"]["k_ci"] == [None, None]
    assert [k for k, _ in capped["variance_order"]["curve"]] == [1, 2]
    x = torch.randn(16, 4)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        a = agent[0](x)
        torch.manual_seed(0)
        torch.testing.assert_close(a, quiet_cartpole.policy()(x), rtol=0, atol=0)  # the projection came off
    out = plot_ablation_curve(
        res["curve"], tmp_path / "curve.png", clean=500.0, keep=0.95, variance_curve=res["variance_order"]["curve"]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_greedy_subspace_on_a_loud_signal_stops_at_one() -> None:
    loud = _agent(_loud_policy())
    res = greedy_subspace(loud, "2:in", collect(loud, "2:in", episodes=2, seed=10).X, episodes=2, seed=0, variance_order=False)
    assert res["return_clean"] == 500.0 and res["k"] == 1 and res["components"] == [0] and res["curve"] == [(1, 500.0)]
    assert "variance_order" not in res


def test_minimal_k_has_a_bootstrap_interval_over_episodes() -> None:
    clean = [100.0] * 10
    # k = 2 keeps exactly 95% on average, so about half the resamples need k = 3
    curve = [[0.0] * 10, [100.0] * 5 + [90.0] * 5, [100.0] * 10]
    assert minimal_k(clean, curve, keep=0.95) == (2, [2, 3])
    assert minimal_k(clean, [[0.0] * 10, [100.0] * 10], keep=0.95) == (2, [2, 2])
    assert minimal_k(clean, [[0.0] * 10], keep=0.95) == (None, [None, None])
    # a point that passes on average but not in most resamples leaves the top of the interval open
    k, (lo, hi) = minimal_k(clean, [[0.0] * 10, [100.0] * 9 + [50.0]], keep=0.95)
    assert (k, lo, hi) == (2, 2, None)


def test_exported_names() -> None:
    import monitor.experiments.interrogate
    import monitor.experiments.probes
    import monitor.experiments.subspace

    assert sorted(monitor.experiments.probes.__all__) == sorted(
        [
            "Rollouts",
            "collect",
            "first_step",
            "Probe",
            "fit_probe",
            "CrossValidated",
            "cross_validate",
            "r2_score",
            "probe_table",
            "plot_probe_heatmap",
        ]
    )
    assert sorted(monitor.experiments.interrogate.__all__) == sorted(
        [
            "ABLATIONS",
            "polarity_inversion",
            "ablation_effect",
            "ablated",
            "PCA",
            "pca",
            "projected",
            "greedy_subspace",
            "plot_ablation_curve",
        ]
    )
    assert sorted(monitor.experiments.subspace.__all__) == sorted(["PCA", "pca", "projected", "greedy_subspace", "minimal_k"])
    for mod in (monitor.experiments.probes, monitor.experiments.interrogate, monitor.experiments.subspace):
        assert all(hasattr(mod, n) for n in mod.__all__)
