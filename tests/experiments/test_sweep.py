"""Intervention sweeps on real CartPole: failure modes, intervals, and nudges that change behaviour."""

from __future__ import annotations

import functools
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from monitor.experiments import failure_modes
from monitor.experiments.failure_modes import CARTPOLE_MODES, classifier_for, classify, modes_for, register
from monitor.experiments.sweep import plot_sweep, run_episodes, scan, sweep, sweep_table_md
from monitor.stats.intervals import diff_ci, mean_ci, t_ppf, t_pvalue
from monitor.transcoders.model import Transcoder

N = 5
FLAW = 0.1  # the policy pushes right when theta + theta_dot/2 > -FLAW: balances the pole, drives the cart off


def _make_env() -> gym.Env:
    return gym.make("CartPole-v1")


def _policy() -> nn.Sequential:
    """Hidden units 0/1 are relu(+-s), s = theta + theta_dot/2; logits (unit 1, unit 0 + FLAW).
    Units 2..15 carry random features the output ignores."""
    torch.manual_seed(0)
    pol = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        pol[0].weight[0] = torch.tensor([0.0, 0.0, 1.0, 0.5])
        pol[0].weight[1] = -pol[0].weight[0]
        pol[0].bias[:2] = 0.0
        pol[2].weight.zero_()
        pol[2].weight[0, 1] = 1.0
        pol[2].weight[1, 0] = 1.0
        pol[2].bias.copy_(torch.tensor([0.0, FLAW]))
    return pol


def _agent(pol: nn.Module) -> tuple:
    return pol, _make_env, lambda obs: int(pol(torch.as_tensor(obs)[None]).argmax())


def _transcoder() -> Transcoder:
    """Latent 0 writes only to units the output ignores; latent 1 shifts the logit gap by 0.2 per
    unit alpha (alpha -0.5 cancels FLAW); latent 2 is huge: alpha +-1 fixes the action."""
    torch.manual_seed(1)
    tc = Transcoder(16, 3, 16)
    with torch.no_grad():
        tc.W_dec[0, :2] = 0.0
        tc.W_dec[1] = 0.0
        tc.W_dec[1, :2] = torch.tensor([0.1, -0.1])
        tc.W_dec[2] = 0.0
        tc.W_dec[2, :2] = torch.tensor([100.0, -100.0])
    return tc


def _obs(x: float = 0.0, theta: float = 0.0) -> np.ndarray:
    return np.array([x, 0.0, theta, 0.0], dtype=np.float32)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("obs", "term", "trunc", "mode"),
    [
        (_obs(theta=-0.25), True, False, "pole_left"),
        (_obs(theta=0.25), True, False, "pole_right"),
        (_obs(x=1.0, theta=-0.21), True, False, "pole_left"),
        (_obs(x=-1.0, theta=0.21), True, False, "pole_right"),
        (_obs(x=2.5), True, False, "cart_out"),
        (_obs(x=-2.5), True, False, "cart_out"),
        (_obs(x=2.41, theta=0.3), True, False, "cart_out"),  # the cart check comes first
        (_obs(theta=0.3), False, True, "survived"),  # truncated: the step limit, whatever the state
        (_obs(theta=0.3), True, True, "survived"),
        (_obs(), False, False, "survived"),
        (_obs(x=2.3, theta=0.2), True, False, "terminated"),  # inside every bound
    ],
)
def test_cartpole_classifier_on_hand_built_ends(obs: np.ndarray, term: bool, trunc: bool, mode: str) -> None:
    env = _make_env()
    assert classify("CartPole-v1", obs, term, trunc, {}, env) == mode
    assert classify("CartPole-v1", obs, term, trunc) == mode  # gymnasium's thresholds without an env
    env.close()


@pytest.mark.timeout(30)
def test_cartpole_classifier_reads_the_envs_thresholds() -> None:
    env = _make_env()
    env.unwrapped.theta_threshold_radians = 0.1
    env.unwrapped.x_threshold = 1.0
    assert classify("CartPole-v1", _obs(theta=-0.15), True, False, {}, env) == "pole_left"
    assert classify("CartPole-v1", _obs(x=1.5), True, False, {}, env) == "cart_out"
    env.close()


@pytest.mark.timeout(30)
def test_registry_fallback_and_custom_classifiers() -> None:
    assert classifier_for("CartPole-v1") is failure_modes.cartpole
    assert classifier_for("NoSuchEnv-v9") is None
    assert modes_for("NoSuchEnv-v9") == ("terminated", "truncated")
    assert classify("NoSuchEnv-v9", None, True, False) == "terminated"
    assert classify("NoSuchEnv-v9", None, True, True) == "truncated"
    with pytest.raises(TypeError):
        register("InterlatentTest-v0", "not callable")  # type: ignore[arg-type]

    def by_length(last_obs, terminated, truncated, info, env) -> str:
        return "far_right" if last_obs[0] > 0 else "far_left"

    register("InterlatentTest-v0", by_length, modes=("far_left", "far_right"))
    runs = run_episodes(_agent(_policy()), episodes=3, env_id="InterlatentTest-v0")
    assert {r.mode for r in runs} <= {"far_left", "far_right"}
    assert modes_for("InterlatentTest-v0") == ("far_left", "far_right")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("act", "mode"),
    [
        (lambda obs: 1, "pole_left"),  # pushing right the whole time tips the pole left
        (lambda obs: 0, "pole_right"),
        (lambda obs: int(obs[2] + 0.5 * obs[3] + FLAW > 0), "cart_out"),
        (lambda obs: int(obs[2] + 0.5 * obs[3] > 0), "survived"),
    ],
)
def test_every_episode_end_of_a_real_run_is_classified(act, mode: str) -> None:
    runs = run_episodes((None, _make_env, act), episodes=4, seed=3)
    assert [r.seed for r in runs] == [3, 4, 5, 6]
    assert [r.mode for r in runs] == [mode] * 4
    for r in runs:
        assert r.mode in CARTPOLE_MODES
        assert r.episode_return == r.length  # CartPole pays 1 per step
        assert (r.length == 500) == (mode == "survived")


@pytest.mark.timeout(30)
def test_run_episodes_max_steps_counts_as_truncated() -> None:
    runs = run_episodes((None, _make_env, lambda obs: int(obs[2] + 0.5 * obs[3] > 0)), episodes=2, max_steps=30)
    assert [(r.length, r.mode) for r in runs] == [(30, "survived"), (30, "survived")]


@pytest.mark.timeout(30)
def test_run_episodes_seeds_episode_i_with_seed_plus_i() -> None:
    agent = _agent(_policy())
    runs = run_episodes(agent, episodes=4, seed=5)
    assert len({r.episode_return for r in runs}) > 1  # different starts, not one episode four times
    assert run_episodes(agent, episodes=1, seed=8) == runs[3:]
    with pytest.raises(ValueError):
        run_episodes((None, _make_env, lambda obs: 0), episodes=0)


@pytest.mark.timeout(30)
def test_mean_ci_by_hand() -> None:
    m, lo, hi = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4 df) * s / sqrt(n)
    assert (m, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-6)
    m, lo, hi = mean_ci([10, 12], level=0.9)
    half = 6.3137515 * math.sqrt(2.0) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((11.0 - half, 11.0 + half), abs=1e-6)
    assert mean_ci([7, 7, 7]) == (7.0, 7.0, 7.0)
    m, lo, hi = mean_ci([4.0])
    assert m == 4.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        mean_ci([])


@pytest.mark.timeout(30)
def test_t_distribution_against_table_values() -> None:
    for q, df, t in [
        (0.975, 1, 12.7062047),
        (0.975, 10, 2.2281389),
        (0.995, 30, 2.7499957),
        (0.95, 2.5, 2.5582186),
        (0.975, 1e6, 1.9599663),
    ]:
        assert t_ppf(q, df) == pytest.approx(t, rel=1e-6)
        assert t_pvalue(t, df) == pytest.approx(2 * (1 - q), rel=1e-5)
    assert t_pvalue(0.0, 5) == 1.0
    assert t_pvalue(math.inf, 5) == 0.0


@pytest.mark.timeout(30)
def test_t_distribution_and_welch_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(200):
        df, t, q = float(rng.uniform(0.8, 120)), float(rng.exponential(3)), float(rng.uniform(0.51, 0.999))
        assert t_pvalue(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-8)
        assert t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8)
    a, b = rng.normal(0, 1, 20), rng.normal(0.8, 2, 13)
    d, ref = diff_ci(a, b), stats.ttest_ind(b, a, equal_var=False)
    assert d["mean"] == pytest.approx(b.mean() - a.mean())
    assert d["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert d["df"] == pytest.approx(ref.df, rel=1e-10)
    assert d["ci"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-8)


@pytest.mark.timeout(30)
def test_diff_ci_degenerate_cases() -> None:
    assert diff_ci([500, 500], [500, 500]) | {"level": 0} == {
        "mean": 0.0,
        "ci": [0.0, 0.0],
        "df": None,
        "p_value": 1.0,
        "excludes_zero": False,
        "level": 0,
    }
    d = diff_ci([10, 10, 10], [500, 500])
    assert (d["ci"], d["p_value"], d["excludes_zero"]) == ([490.0, 490.0], 0.0, True)
    d = diff_ci([10], [20, 30])
    assert d["mean"] == 15.0 and d["ci"] == [None, None] and d["p_value"] is None


def _check_shape(res: dict, *, latents: list[int], alphas: list[float], n: int) -> None:
    assert {
        "kind",
        "tap",
        "env_id",
        "episodes",
        "seed",
        "level",
        "d_sae",
        "latents",
        "alphas",
        "modes",
        "baseline",
        "cells",
    } <= set(res)
    assert res["env_id"] == "CartPole-v1" and res["latents"] == latents and res["alphas"] == alphas
    assert set(CARTPOLE_MODES) <= set(res["modes"])
    assert [(c["latent"], c["alpha"]) for c in res["cells"]] == [(la, al) for la in latents for al in alphas]
    for c in [res["baseline"], *res["cells"]]:
        assert {"n", "mean", "ci", "std", "failures", "returns", "lengths", "modes"} <= set(c)
        assert c["n"] == n == len(c["returns"])
        assert list(c["failures"]) == res["modes"] and sum(c["failures"].values()) == n
        assert c["mean"] == pytest.approx(np.mean(c["returns"]))
    for c in res["cells"]:
        assert {"mean", "ci", "df", "p_value", "excludes_zero"} <= set(c["diff"])
    json.dumps(res, allow_nan=False)


@pytest.mark.timeout(60)
def test_sweep_planted_latents_steer_the_policy_and_reproduce() -> None:
    agent, tc = _agent(_policy()), _transcoder()
    res = sweep(agent, tap="1:out", model=tc, alphas=(1.0, -1.0), episodes=N, seed=7, progress=False)
    _check_shape(res, latents=[0, 1, 2], alphas=[1.0, -1.0], n=N)
    base = res["baseline"]
    assert base["failures"]["cart_out"] == N  # the flawed policy balances the pole but loses the cart
    cell = {(c["latent"], c["alpha"]): c for c in res["cells"]}
    for alpha in (1.0, -1.0):  # latent 0 writes where the output never reads: nothing changes
        assert cell[0, alpha]["returns"] == base["returns"] and cell[0, alpha]["failures"] == base["failures"]
        assert cell[0, alpha]["diff"]["excludes_zero"] is False
    right, left = cell[2, 1.0], cell[2, -1.0]  # huge: always push right / always push left
    assert right["failures"]["pole_left"] == N and left["failures"]["pole_right"] == N
    for c in (right, left):
        assert c["failures"] != base["failures"]
        assert c["diff"]["mean"] < 0 and c["diff"]["ci"][1] < 0 and c["diff"]["excludes_zero"] is True
        assert c["diff"]["p_value"] < 0.01
    assert cell[1, 1.0]["failures"]["pole_left"] == N  # a right bias of 0.3 in the logit gap tips the pole
    again = sweep(agent, tap="1:out", model=tc, alphas=(1.0, -1.0), episodes=N, seed=7, progress=False)
    assert json.dumps(again) == json.dumps(res)
    other = sweep(agent, tap="1:out", model=tc, latents=[0], alphas=(1.0,), episodes=N, seed=8, progress=False)
    assert other["baseline"]["returns"] != base["returns"]
    assert torch.equal(agent[0](torch.ones(1, 4)), _policy()(torch.ones(1, 4)))  # the steering came off
    with pytest.raises(ValueError):
        sweep(agent, tap="1:out", model=tc, latents=[3], episodes=1, progress=False)


@pytest.mark.timeout(60)
def test_scan_finds_the_nudge_that_cancels_the_flaw() -> None:
    res = scan(_agent(_policy()), tap="1:out", model=_transcoder(), episodes=N, seed=0, progress=False)
    _check_shape(res, latents=[0, 1, 2], alphas=[0.5, -0.5], n=N)
    assert res["kind"] == "scan" and res["tested_latents"] == [0, 1, 2] and res["tests"] == 6
    assert res["bonferroni_level"] == pytest.approx(1 - 0.05 / 6)
    assert [(h["latent"], h["alpha"]) for h in res["improving"]] == [(1, -0.5)]
    hit = res["improving"][0]
    assert hit["mean"] == 500.0 and hit["diff"] > 0 and hit["ci"][0] > 0
    assert {(h["latent"], h["alpha"]) for h in res["improving_unadjusted"]} >= {(1, -0.5)}
    for c in res["cells"]:
        lo, hi = c["diff"]["ci"]
        alo, ahi = c["diff_adjusted"]["ci"]
        assert alo <= lo and ahi >= hi  # the adjusted interval is the wider one
        assert c["p_bonferroni"] == pytest.approx(min(1.0, c["diff"]["p_value"] * 6))


@pytest.mark.timeout(60)
def test_table_and_plot(tmp_path) -> None:
    res = sweep(
        _agent(_policy()), tap="1:out", model=_transcoder(), latents=[1, 2], alphas=(1.0, -1.0, 2.5), episodes=3, progress=False
    )
    md = sweep_table_md(res)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 6
    assert all(m in lines[0] for m in CARTPOLE_MODES) and "latent" in lines[0] and "alpha" in lines[0]
    assert lines[3].startswith("| 1 | -1 |")
    assert f"{res['baseline']['failures']['pole_left']} → {res['cells'][3]['failures']['pole_left']}" in lines[5]
    assert "*" in lines[5]  # latent 2 at alpha 1: a difference whose interval excludes 0
    out = plot_sweep(res, tmp_path / "plots" / "sweep.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.timeout(120)
def test_sweep_on_the_demo_agent(tmp_path, monkeypatch) -> None:
    """The demo agent as `load_agent("demo")` builds it, but trained for 2048 steps, not 40k
    (which takes about a minute on two cores)."""
    import monitor.experiments.agents
    from monitor.experiments.agents import load_agent

    monkeypatch.setattr(
        monitor.experiments.agents, "demo_policy", functools.partial(monitor.experiments.agents.demo_policy, train_steps=2048)
    )
    agent = load_agent("demo", data_dir=tmp_path)
    torch.manual_seed(0)
    tc = Transcoder(4, 4, 64)
    res = sweep(
        agent, tap="mlp_extractor.policy_net.1:out", model=tc, latents=[0, 3], alphas=(100.0, -100.0), episodes=N, progress=False
    )
    _check_shape(res, latents=[0, 3], alphas=[100.0, -100.0], n=N)
    sides = {}
    for c in res["cells"]:  # a huge nudge saturates the next tanh layer: one action, one side, every time
        (mode,) = {m for m, k in c["failures"].items() if k}
        assert mode in ("pole_left", "pole_right")
        assert c["mean"] < res["baseline"]["mean"]
        sides[c["latent"], c["alpha"]] = mode
    assert sides[0, 100.0] != sides[0, -100.0]


@pytest.mark.timeout(60)
def test_sweep_starts_an_lstm_policy_afresh_each_episode_with_its_reset(tmp_path) -> None:
    """The recurrent agent of tests/agents/lstm_cartpole.py: with its factory's reset() every
    episode of the baseline and of every cell starts from a zero state; without it the baseline's
    later episodes inherit a spent counter and end at once."""
    from agents import lstm_cartpole

    from monitor.experiments.agents import load_agent

    tc = Transcoder(3, 2, 3)
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.W_dec[0, 1] = 10.0  # latent 0 pushes the balance unit positive: push right every step
    agent = load_agent("agents.lstm_cartpole:make", data_dir=tmp_path)
    res = sweep(agent, tap=lstm_cartpole.TAP, model=tc, latents=[0, 1], alphas=(1.0,), episodes=3, progress=False)
    _check_shape(res, latents=[0, 1], alphas=[1.0], n=3)
    alone = [run_episodes(agent, episodes=1, seed=i)[0].episode_return for i in range(3)]
    assert res["baseline"]["returns"] == alone and min(alone) > 100.0
    pushed, silent = res["cells"]
    assert pushed["failures"]["pole_left"] == 3 and max(pushed["returns"]) < 30.0
    assert silent["returns"] == res["baseline"]["returns"]  # a zero decoder row changes nothing, episode by episode
    spent = sweep(
        load_agent("agents.lstm_cartpole:make_no_reset", data_dir=tmp_path),
        tap=lstm_cartpole.TAP,
        model=tc,
        latents=[1],
        alphas=(1.0,),
        episodes=3,
        progress=False,
    )
    assert spent["baseline"]["returns"][0] == alone[0] and max(spent["baseline"]["returns"][1:]) < 20.0
