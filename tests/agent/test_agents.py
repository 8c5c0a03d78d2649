"""attach() on real agents: SB3 models, gymnasium envs (single and vectorized), LSTMs, a tiny GPT-2.

Every test streams to a real Monitor on a loopback port and reads back what it wrote to Redis, so
what is asserted is what a user of ``interlatent status`` would see.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from torch import nn

import agent_side
from agent_side import TapError
from monitor.service.persist import load_run

try:  # tests/ is not a package: pytest puts it on sys.path (rootdir-relative "prepend" import)
    from helpers import LiveMonitor, free_endpoint, wait_until
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests.conftest import LiveMonitor, free_endpoint, wait_until

CARTPOLE_OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]


# -- helpers ----------------------------------------------------------------------------------
def finish(live_monitor, *taps) -> None:
    """Detach, wait until the monitor has every frame the taps sent, stop it (flushing to Redis)."""
    for t in taps:
        t.detach()
    sent = sum(t.counters()["sent"] for t in taps)
    assert sent > 0, "nothing was sent"
    wait_until(lambda: live_monitor.monitor.frames >= sent, timeout_s=10, what=f"monitor to receive {sent} frames")
    mon = live_monitor.finish()
    assert dict(mon.rejected) == {}, f"monitor rejected frames: {dict(mon.rejected)}"


def run_entry(store, run: str) -> dict:
    runs = {r["run"]: r for r in store.status()["runs"]}
    assert run in runs, f"run {run!r} not in status (have {list(runs)})"
    return runs[run]


def by_pos(rows: np.ndarray, pos: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for k, (s, i) in enumerate(pos.tolist()):
        assert (s, i) not in out, f"duplicate position {(s, i)}"
        out[(s, i)] = rows[k]
    return out


def metric_table(store, run: str, names: list[str]) -> dict[tuple[int, int], np.ndarray]:
    """(step, index) -> the logged values of ``names`` (all from one env wrapper, so one position list)."""
    met = store.recent_metrics(run)
    missing = [n for n in names if n not in met]
    assert not missing, f"metrics {missing} not logged (have {sorted(met)})"
    pos = met[names[0]][1]
    for n in names:
        np.testing.assert_array_equal(met[n][1], pos)
    return by_pos(np.stack([met[n][0] for n in names], axis=1), pos)


def tap_table(store, run: str, tap: str) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], np.ndarray]]:
    got = store.recent(run, tap)
    assert got is not None, f"no recent rows for {run}/{tap}"
    rows, pos = got
    return rows, pos, by_pos(rows, pos)


def assert_rows_match_obs(tap_rows: dict, obs: dict, expect_n: int) -> None:
    """Every activation row of an obs-input tap equals the observation logged at its (step, index)."""
    assert len(tap_rows) == expect_n
    assert set(tap_rows) == set(obs), "activation and metric positions differ"
    for key, row in tap_rows.items():
        np.testing.assert_array_equal(row, obs[key].astype(np.float32), err_msg=f"at (step, index) {key}")


# -- 1. continuous actions: SAC on Pendulum ---------------------------------------------------
def test_sac_pendulum_continuous_actions(store, live_monitor):
    from stable_baselines3 import SAC

    steps = 200
    model = SAC("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[16, 16]), buffer_size=1000, seed=0, device="cpu")
    taps = ["actor.latent_pi.0:in", "actor.latent_pi.0:out"]
    with agent_side.attach(model.policy, taps, run="sac", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        env = tap.wrap(gymnasium.make("Pendulum-v1"))
        obs, _ = env.reset(seed=0)
        actions = []
        for _ in range(steps):
            action, _ = model.predict(obs, deterministic=True)
            actions.append(float(np.asarray(action).reshape(-1)[0]))
            obs, _, terminated, truncated, _ = env.step(action)
        assert truncated and not terminated  # Pendulum's TimeLimit ends the episode at step 200
        finish(live_monitor, tap)

    st = run_entry(store, "sac")
    assert st["steps"] == steps
    assert st["drops"] == 0
    assert st["gaps"] == 0
    assert st["episodes"] == 1
    assert st["taps"]["actor.latent_pi.0:in"]["width"] == 3
    assert st["taps"]["actor.latent_pi.0:out"]["width"] == 16
    for t in taps:
        assert st["taps"][t]["rows"] == steps, t
    # a 1-D Box action is one column named "action"
    assert "action" in st["metrics"] and "action_0" not in st["metrics"]
    assert {"obs_0", "obs_1", "obs_2", "reward", "terminated", "truncated"} <= set(st["metrics"])

    obs_logged = metric_table(store, "sac", ["obs_0", "obs_1", "obs_2"])
    _, pos, rows_in = tap_table(store, "sac", "actor.latent_pi.0:in")
    np.testing.assert_array_equal(pos[:, 0], np.arange(steps))
    np.testing.assert_array_equal(pos[:, 1], 0)
    assert_rows_match_obs(rows_in, obs_logged, steps)

    # the action logged at step t is the one the policy chose at step t
    act_logged = metric_table(store, "sac", ["action"])
    np.testing.assert_allclose([act_logged[(t, 0)][0] for t in range(steps)], actions, rtol=0, atol=1e-6)

    # :out rows are the first layer applied to the :in rows of the same step
    _, _, rows_out = tap_table(store, "sac", "actor.latent_pi.0:out")
    lin = model.policy.actor.latent_pi[0]
    with torch.no_grad():
        for key in [(0, 0), (99, 0), (199, 0)]:
            expect = lin(torch.tensor(rows_in[key])).numpy()
            np.testing.assert_allclose(rows_out[key], expect, rtol=1e-5, atol=1e-6)


# -- 2. vectorized envs -----------------------------------------------------------------------
def test_sb3_vecenv_eight_envs(store, live_monitor):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    n_envs, steps = 8, 50
    venv = make_vec_env("CartPole-v1", n_envs=n_envs, seed=0)
    model = PPO("MlpPolicy", venv, policy_kwargs=dict(net_arch=[16, 16]), n_steps=16, batch_size=16, seed=0, device="cpu")
    taps = ["mlp_extractor.policy_net.0:in", "action_net:out"]
    with agent_side.attach(model.policy, taps, run="vec8", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        wenv = tap.wrap(venv, obs_names=CARTPOLE_OBS)
        obs = wenv.reset()
        for _ in range(steps):
            actions, _ = model.predict(obs, deterministic=True)
            obs, _, _, _ = wenv.step(actions)
        finish(live_monitor, tap)

    st = run_entry(store, "vec8")
    assert st["steps"] == steps
    assert st["drops"] == 0 and st["gaps"] == 0
    assert st["taps"]["mlp_extractor.policy_net.0:in"]["width"] == 4
    assert st["taps"]["action_net:out"]["width"] == 2
    for t in taps:
        assert st["taps"][t]["rows"] == n_envs * steps, t
    assert set(CARTPOLE_OBS + ["action", "reward", "terminated", "truncated"]) <= set(st["metrics"])

    obs_logged = metric_table(store, "vec8", CARTPOLE_OBS)
    _, pos, rows_in = tap_table(store, "vec8", "mlp_extractor.policy_net.0:in")
    assert sorted(map(tuple, pos.tolist())) == [(s, i) for s in range(steps) for i in range(n_envs)]
    assert_rows_match_obs(rows_in, obs_logged, n_envs * steps)

    # the deterministic action logged for (step, env) is the argmax of that row's logits
    act = metric_table(store, "vec8", ["action"])
    _, _, logits = tap_table(store, "vec8", "action_net:out")
    assert set(logits) == set(act)
    for key, row in logits.items():
        assert int(act[key][0]) == int(np.argmax(row)), key


def test_gymnasium_sync_vector_env_torch_mlp(store, live_monitor):
    n_envs, steps = 4, 30
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    venv = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1") for _ in range(n_envs)])
    with agent_side.attach(policy, ["0:in", "2:out"], run="gymvec", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        wenv = tap.wrap(venv, obs_names=CARTPOLE_OBS)
        obs, _ = wenv.reset(seed=0)
        with torch.no_grad():
            for _ in range(steps):
                logits = policy(torch.as_tensor(obs))
                obs, _, _, _, _ = wenv.step(logits.argmax(dim=1).numpy())
        finish(live_monitor, tap)
    wenv.close()

    st = run_entry(store, "gymvec")
    assert st["steps"] == steps
    assert st["drops"] == 0 and st["gaps"] == 0
    assert st["taps"]["0:in"] == {**st["taps"]["0:in"], "width": 4, "rows": n_envs * steps}
    assert st["taps"]["2:out"] == {**st["taps"]["2:out"], "width": 2, "rows": n_envs * steps}

    obs_logged = metric_table(store, "gymvec", CARTPOLE_OBS)
    _, _, rows_in = tap_table(store, "gymvec", "0:in")
    assert_rows_match_obs(rows_in, obs_logged, n_envs * steps)
    act = metric_table(store, "gymvec", ["action"])
    _, _, rows_out = tap_table(store, "gymvec", "2:out")
    for key, row in rows_out.items():
        assert int(act[key][0]) == int(np.argmax(row)), key


# -- 3. SB3 callback during learn() -----------------------------------------------------------
def test_sb3_callback_streams_only_rollout_forwards(store, live_monitor):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    n_envs, n_steps, total = 2, 64, 256
    venv = make_vec_env("CartPole-v1", n_envs=n_envs, seed=0)
    model = PPO(
        "MlpPolicy", venv, n_steps=n_steps, batch_size=32, n_epochs=2, policy_kwargs=dict(net_arch=[16, 16]), seed=0, device="cpu"
    )
    tap_name = "mlp_extractor.policy_net.0:in"
    with agent_side.attach(model.policy, [tap_name], run="learn", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        model.learn(total, callback=tap.sb3_callback(obs_names=CARTPOLE_OBS))
        assert model.num_timesteps == total
        assert not tap.paused  # hooks are live again once learn() returns
        finish(live_monitor, tap)

    st = run_entry(store, "learn")
    # 2 rollouts x 64 steps x 2 envs; the update forwards (2 epochs over 128 samples, twice) add none
    assert st["taps"][tap_name]["rows"] == total
    assert st["taps"][tap_name]["width"] == 4
    assert st["steps"] == total // n_envs
    assert st["drops"] == 0 and st["gaps"] == 0
    assert set(CARTPOLE_OBS + ["action", "reward"]) <= set(st["metrics"])

    met = store.recent_metrics("learn")
    assert len(met["reward"][0]) == total  # one metric row per env per rollout step
    obs_logged = metric_table(store, "learn", CARTPOLE_OBS)
    _, pos, rows_in = tap_table(store, "learn", tap_name)
    assert sorted(map(tuple, pos.tolist())) == [(s, i) for s in range(total // n_envs) for i in range(n_envs)]
    assert_rows_match_obs(rows_in, obs_logged, total)


# -- 4. a recurrent module whose output is a tuple --------------------------------------------
class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm_tuple_output_sequence_rows(store, live_monitor):
    torch.manual_seed(0)
    model = TinyLSTM()
    batch, seq, n = 3, 5, 10
    xs = [torch.randn(batch, seq, 4) for _ in range(n)]
    with torch.no_grad():
        expected = [model.lstm(x)[0].reshape(-1, 8).numpy().copy() for x in xs]  # before attaching
    with agent_side.attach(model, ["lstm:out"], run="lstm", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            for x in xs:
                model(x)
        finish(live_monitor, tap)

    st = run_entry(store, "lstm")
    assert st["taps"]["lstm:out"]["width"] == 8
    assert st["taps"]["lstm:out"]["rows"] == n * batch * seq
    assert st["steps"] == n  # no env: the step is the tap's forward index
    assert st["drops"] == 0 and st["gaps"] == 0
    assert load_run(store, "lstm", recent_rows=512).taps["lstm:out"].lead == [batch, seq]

    rows, pos = store.recent("lstm", "lstm:out")
    assert rows.shape == (n * batch * seq, 8)
    for k in range(n):
        sel = pos[:, 0] == k
        np.testing.assert_array_equal(pos[sel, 1], np.arange(batch * seq))  # index = b * seq + t
        np.testing.assert_allclose(rows[sel], expected[k], rtol=1e-6, atol=1e-6)
    # spot-check the b * seq + t layout against the unflattened output
    got = by_pos(rows, pos)
    b, t = 2, 3
    np.testing.assert_allclose(got[(7, b * seq + t)], expected[7].reshape(batch, seq, 8)[b, t], rtol=1e-6, atol=1e-6)


# -- 5. a tiny HuggingFace GPT-2 --------------------------------------------------------------
def test_tiny_gpt2_token_rows(store, live_monitor):
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    # Three layers: hidden_states[-1] has ln_f applied, so the last block's raw output is not in it;
    # hidden_states[2] is the raw output of block 1 only when a block follows it.
    config = transformers.GPT2Config(
        n_layer=3, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    names = dict(model.named_modules())
    assert "transformer.h.0.mlp.c_fc" in names and "transformer.h.1" in names
    c_fc_out = []
    ref = names["transformer.h.0.mlp.c_fc"].register_forward_hook(lambda m, a, o: c_fc_out.append(o.detach().clone()))

    taps = ["transformer.h.0.mlp.c_fc:out", "transformer.h.1:out"]
    with agent_side.attach(model, taps, run="gpt2", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        batch, seq, n = 2, 7, 3
        hidden = []
        with torch.no_grad():
            for _ in range(n):
                ids = torch.randint(0, 100, (batch, seq))
                out = model(input_ids=ids, output_hidden_states=True)
                hidden.append(out.hidden_states[2].reshape(-1, 32).numpy().copy())
        ref.remove()
        finish(live_monitor, tap)

    st = run_entry(store, "gpt2")
    assert st["taps"]["transformer.h.0.mlp.c_fc:out"]["width"] == 4 * 32
    assert st["taps"]["transformer.h.1:out"]["width"] == 32
    for t in taps:
        assert st["taps"][t]["rows"] == n * batch * seq, t
    assert st["steps"] == n
    assert st["drops"] == 0 and st["gaps"] == 0

    for t, expect in [
        ("transformer.h.1:out", hidden),
        ("transformer.h.0.mlp.c_fc:out", [o.reshape(-1, 128).numpy() for o in c_fc_out]),
    ]:
        rows, pos = store.recent("gpt2", t)
        assert rows.shape[0] == n * batch * seq
        for k in range(n):
            sel = pos[:, 0] == k
            np.testing.assert_array_equal(pos[sel, 1], np.arange(batch * seq))
            np.testing.assert_allclose(rows[sel], expect[k], rtol=1e-5, atol=1e-5, err_msg=f"{t} forward {k}")


# -- 6. the hooks copy what they capture --------------------------------------------------------
def test_hook_copies_before_inplace_modification(store, live_monitor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    xs = [torch.randn(16, 4) for _ in range(5)]
    with torch.no_grad():
        pre = [torch.nn.functional.linear(x, model[0].weight, model[0].bias).numpy().copy() for x in xs]
    assert all((p < 0).any() for p in pre)
    with agent_side.attach(model, ["0:out"], run="inplace", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            outs = [model(x) for x in xs]
        assert all((o >= 0).all() for o in outs)  # the ReLU did run in place on the Linear's output
        finish(live_monitor, tap)

    rows, pos = store.recent("inplace", "0:out")
    assert rows.shape == (5 * 16, 4)
    assert (rows < 0).any(), "the monitor got the in-place ReLU'd tensor, not the Linear's output"
    for k in range(5):
        np.testing.assert_allclose(rows[pos[:, 0] == k], pre[k], rtol=1e-6, atol=1e-6)


# -- 7. bad taps fail before anything is hooked ---------------------------------------------
def test_unknown_module_and_bad_site(store, live_monitor):
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[16, 16]), seed=0, device="cpu")
    policy = model.policy
    obs = torch.randn(3, 4)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return policy.get_distribution(obs).distribution.logits.clone()

    before = logits()
    endpoint = free_endpoint()
    with pytest.raises(TapError) as ei:
        agent_side.attach(policy, ["mlp_extractor.policy_nett.0:in"], run="x", endpoint=endpoint)
    assert "mlp_extractor.policy_net.0" in str(ei.value)
    assert "policy_nett" in str(ei.value)
    with pytest.raises(TapError):
        agent_side.attach(policy, ["mlp_extractor.policy_net.0:sideways"], run="x", endpoint=endpoint)
    with pytest.raises(TapError):
        agent_side.attach(nn.Sequential(nn.Linear(4, 4)), ["0:sideways"], run="x", endpoint=endpoint)
    # one good tap and one bad: nothing may stay hooked on the good one
    with pytest.raises(TapError):
        agent_side.attach(policy, ["mlp_extractor.policy_net.0:in", "mlp_extractor.nope:out"], run="x", endpoint=endpoint)

    torch.testing.assert_close(logits(), before, rtol=0, atol=0)  # forward still works, unchanged

    with agent_side.attach(policy, ["mlp_extractor.policy_net.0:in"], run="x", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        for _ in range(5):
            logits()
        finish(live_monitor, tap)
    st = run_entry(store, "x")
    assert list(st["taps"]) == ["mlp_extractor.policy_net.0:in"]
    assert st["taps"]["mlp_extractor.policy_net.0:in"]["rows"] == 5 * 3
    assert st["steps"] == 5


# -- 8. no monitor listening --------------------------------------------------------------
def _cartpole_episode_forwards(policy: nn.Module, env, steps: int, obs) -> tuple[list[torch.Tensor], int, object]:
    """``steps`` policy forwards + env steps; returns the logits, the episodes ended and the last obs."""
    outs, ended = [], 0
    with torch.no_grad():
        for _ in range(steps):
            logits = policy(torch.as_tensor(obs)[None])
            outs.append(logits)
            obs, _, terminated, truncated, _ = env.step(int(logits.argmax()))
            if terminated or truncated:
                ended += 1
                obs, _ = env.reset()
    return outs, ended, obs


def test_no_monitor_is_harmless_then_monitor_arrives(store):
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    env = gymnasium.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    expected, ended_ref, _ = _cartpole_episode_forwards(policy, env, 100, obs)  # without attach
    assert ended_ref > 0

    endpoint = free_endpoint()  # nobody binds it (yet)
    with agent_side.attach(policy, ["0:out", "2:in"], run="late", endpoint=endpoint) as tap:
        wenv = tap.wrap(gymnasium.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
        obs, _ = wenv.reset(seed=0)
        got, ended, obs = _cartpole_episode_forwards(policy, wenv, 100, obs)
        c = tap.counters()
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)  # attach changes nothing the agent computes
        assert ended == ended_ref
        assert c["sent"] == 0
        assert not c["connected"]
        assert c["step"] == 100  # the env step counter runs with or without a monitor
        assert c["unwatched"] == 100 and c["drops"] == 0  # each step counted once, as unwatched: nothing was built

        # the monitor comes up late: the agent connects by itself and streams from then on
        late = LiveMonitor(store, endpoint)
        try:
            assert tap.wait_for_monitor(10)
            _cartpole_episode_forwards(policy, wenv, 20, obs)
            finish(late, tap)
        finally:
            late.close()

    st = run_entry(store, "late")
    assert st["taps"]["0:out"]["rows"] == 20 and st["taps"]["0:out"]["width"] == 8
    assert st["taps"]["2:in"]["rows"] == 20 and st["taps"]["2:in"]["width"] == 8
    assert st["steps"] == 120
    assert st["gaps"] == 0
    assert st["taps"]["0:out"]["rows"] + st["unwatched"] + st["drops"] == st["steps"]  # 20 + 100 + 0: every step
    _, pos, rows_out = tap_table(store, "late", "0:out")
    np.testing.assert_array_equal(pos[:, 0], np.arange(100, 120))  # aligned with env steps, not forward count
    _, _, rows_in = tap_table(store, "late", "2:in")
    assert set(rows_in) == set(rows_out)
    for key in rows_out:  # the Tanh between the taps
        np.testing.assert_allclose(rows_in[key], np.tanh(rows_out[key]), rtol=1e-6, atol=1e-6)
    obs_logged = metric_table(store, "late", CARTPOLE_OBS)
    assert set(obs_logged) == {(s, 0) for s in range(100, 120)}
    with torch.no_grad():
        for key, o in obs_logged.items():
            np.testing.assert_allclose(
                rows_out[key], policy[0](torch.as_tensor(o, dtype=torch.float32)).numpy(), rtol=1e-5, atol=1e-6
            )


def test_no_monitor_builds_nothing_and_counts_its_steps_as_unwatched():
    """With no monitor the hooks are off (the model runs torch's hook-free path, activations are
    not even copied); the env wrapper builds no rows, and each step counts once as unwatched."""
    import gymnasium as gym

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with agent_side.attach(model, ["0:out", "2:in"], run="nobody", endpoint=free_endpoint()) as tap:
        env = tap.wrap(gym.make("CartPole-v1"))
        obs, _ = env.reset(seed=0)
        episodes = 0
        for _ in range(100):
            with torch.no_grad():
                action = int(model(torch.as_tensor(obs)[None]).argmax())
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                episodes += 1
                obs, _ = env.reset()
        c = tap.counters()
    assert c["sent"] == 0 and not c["connected"] and episodes > 0
    assert (c["unwatched"], c["drops"]) == (100, 0)


def test_empty_batch_forward_keeps_positions(store, live_monitor):
    model = nn.Sequential(nn.Linear(4, 2))
    with agent_side.attach(model, ["0:in"], run="empty", endpoint=live_monitor.endpoint, flush_ms=10_000) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            model(torch.zeros(0, 4))
            model(torch.ones(2, 4))
        finish(live_monitor, tap)
    _, pos = store.recent("empty", "0:in")
    assert pos.tolist() == [[1, 0], [1, 1]]


def test_dqn_q_net(store, live_monitor):
    """DQN acts through ``q_net``: its input and the Q-values it outputs stream, aligned with obs."""
    import gymnasium as gym
    from stable_baselines3 import DQN

    model = DQN("MlpPolicy", gym.make("CartPole-v1"), policy_kwargs=dict(net_arch=[16]), seed=0, device="cpu")
    taps = ["q_net.q_net.0:in", "q_net.q_net.2:out"]
    tap = agent_side.attach(model.policy, taps, run="dqn", endpoint=live_monitor.endpoint)
    assert tap.wait_for_monitor(10)
    env = tap.wrap(gym.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=0)
    actions = {}
    for step in range(60):
        action, _ = model.predict(obs, deterministic=True)
        actions[step] = int(action)
        obs, _, term, trunc, _ = env.step(action)
        if term or trunc:
            obs, _ = env.reset()
    finish(live_monitor, tap)
    entry = run_entry(store, "dqn")
    assert {t: v["rows"] for t, v in entry["taps"].items()} == {taps[0]: 60, taps[1]: 60}
    assert entry["taps"][taps[1]]["width"] == 2
    _, _, inputs = tap_table(store, "dqn", taps[0])
    assert_rows_match_obs(inputs, metric_table(store, "dqn", CARTPOLE_OBS), 60)
    _, _, q = tap_table(store, "dqn", taps[1])
    assert all(int(np.argmax(q[(s, 0)])) == a for s, a in actions.items())  # greedy action = argmax Q


def test_watching_never_raises_into_the_agent(store, live_monitor):
    """A metric callable that raises, and a tensor the hook cannot use, are skipped and counted."""
    import gymnasium as gym

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    tap = agent_side.attach(model, ["0:out", "2:out"], run="odd", endpoint=live_monitor.endpoint)
    assert tap.wait_for_monitor(10)
    env = tap.wrap(gym.make("CartPole-v1"), metrics={"broken": lambda s: 1 / 0})
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        with torch.no_grad():
            action = int(model(torch.as_tensor(obs)[None]).argmax())
        obs, _, term, trunc, _ = env.step(action)  # must not raise ZeroDivisionError
        if term or trunc:
            obs, _ = env.reset()
    with torch.no_grad():
        model[0](torch.zeros(2, 0, 4))  # an empty batch
    assert tap.counters()["drops"] >= 20
    finish(live_monitor, tap)
    assert run_entry(store, "odd")["taps"]["0:out"]["rows"] == 20


def test_one_huge_forward_is_split_into_frames(store, live_monitor):
    model = nn.Sequential(nn.Linear(1024, 1024))
    tap = agent_side.attach(model, ["0:out"], run="big", endpoint=live_monitor.endpoint)
    assert tap.wait_for_monitor(10)
    with torch.no_grad():
        out = model(torch.randn(3000, 1024))  # 12 MiB of activations in one forward
    finish(live_monitor, tap)
    assert tap.counters()["sent"] >= 3
    entry = run_entry(store, "big")
    assert entry["taps"]["0:out"]["rows"] == 3000 and (entry["drops"], entry["gaps"]) == (0, 0)
    rows, pos = store.recent("big", "0:out")
    np.testing.assert_array_equal(rows, out[-len(rows) :].numpy())
    np.testing.assert_array_equal(pos[:, 1], np.arange(3000 - len(rows), 3000))
