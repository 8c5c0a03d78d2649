"""Live analytics: activations paired with the step's metrics, correlations, top examples."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until

from agent_side.wire import decode as _decode
from agent_side.wire import encode_act, encode_ep, encode_met
from monitor.service.ingest import Monitor
from monitor.service.persist import write_run
from monitor.stats.analytics import AnalyticsConfig
from monitor.store.records import Store
from monitor.store.tapstats import tap_stats


def _pos(steps: np.ndarray) -> np.ndarray:
    return np.stack([steps, np.zeros_like(steps)], axis=1).astype(np.int64)


def test_planted_correlations_top_examples_and_window(store: Store) -> None:
    rng = np.random.default_rng(0)
    window, n = 200, 1000
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=AnalyticsConfig(window_steps=window, ew_alpha=0.02, top_k=3))
    try:
        a, b, c = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n)
        x = np.stack([2 * a + 0.01 * rng.standard_normal(n), -b, np.full(n, 0.5), a + c], axis=1).astype(np.float32)
        y = np.stack([a, b, c], axis=1)
        seq = 0
        for start in range(0, n, 64):  # the agent's order: a tap's rows, then the step metrics
            steps = np.arange(start, min(n, start + 64))
            assert mon.handle(encode_act("r", "p", seq, 0, "h:out", x[steps], _pos(steps)))
            assert mon.handle(encode_met("r", "p", seq + 1, 0, ["a", "b", "c"], y[steps], _pos(steps)))
            seq += 2
        mon.flush(final=True)
        d = tap_stats(store, "r", "h:out", top=3)
        assert d["metrics"] == ["a", "b", "c"] and d["paired"] == n and d["window_n"] == window
        ch = d["channels"]
        assert ch[0]["corr"]["a"] > 0.999 and ch[1]["corr"]["b"] < -0.999
        assert ch[2]["corr"] == {"a": None, "b": None, "c": None}  # constant channel: undefined, not NaN
        with np.errstate(invalid="ignore", divide="ignore"):  # channel 2 is constant
            ref = np.corrcoef(np.concatenate([x[-window:], y[-window:]], axis=1).T.astype(np.float64))[:4, 4:]
        got = np.array([[ch[i]["corr"][m] if ch[i]["corr"][m] is not None else np.nan for m in "abc"] for i in range(4)])
        np.testing.assert_allclose(got[[0, 1, 3]], ref[[0, 1, 3]], atol=1e-5)
        assert ch[3]["ew_corr"]["a"] > 0.5 and ch[3]["ew_corr"]["c"] > 0.5
        best = np.argsort(-x[:, 0])[:3]
        assert [e["step"] for e in ch[0]["top"]] == best.tolist()
        for e in ch[0]["top"]:
            assert e["metrics"]["a"] == round(float(a[e["step"]]), 6)
            assert abs(e["value"] - x[e["step"], 0]) < 1e-5
        q = [e["value"] for e in ch[0]["quantiles"]]
        assert len(q) == 10 and q == sorted(q)
        win = x[-window:, 0]
        assert abs(ch[0]["window"]["mean"] - win.mean()) < 1e-4 and abs(ch[0]["window"]["max"] - win.max()) < 1e-4
    finally:
        mon.close()


def test_rows_without_metrics_are_not_correlated(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        steps = np.arange(50)
        mon.handle(encode_act("r", "p", 0, 0, "t", np.ones((50, 2), np.float32), _pos(steps)))
        mon.flush(final=True)
        d = tap_stats(store, "r", "t")
        assert d["metrics"] == [] and d["channels"][0]["corr"] == {} and d["channels"][0]["count"] == 50
    finally:
        mon.close()


def test_stats_cli_on_a_real_agent(redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--window-steps", "200")
    try:
        agent = spawn(
            [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "400", "--run", "stats"],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = agent.communicate(timeout=120)
        assert agent.returncode == 0
        counters = json.loads(out.strip().splitlines()[-1])
        tap = "mlp_extractor.policy_net.0:in"

        seen: list[object] = []

        def ready() -> dict | None:
            out = subprocess.run(
                [sys.executable, "-m", "monitor", "stats", "--run", "stats", "--tap", tap, "--json", "--redis", redis_url],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                timeout=60,
            )
            d = json.loads(out.stdout)["taps"][tap] if out.returncode == 0 else None
            seen.append(d.get("paired") if d else out.stderr[-300:])
            return d if d and d.get("paired") == 400 else None

        try:
            d = wait_until(ready, 60, what="400 paired rows")
        except AssertionError as e:
            run = next((r for r in store.status()["runs"] if r["run"] == "stats"), {})
            raise AssertionError(
                f"{e}; paired counts seen: {seen[-5:]}; agent counters: {counters}; "
                f"the run: {json.dumps({k: run.get(k) for k in ('steps', 'frames', 'gaps', 'drops', 'taps', 'metrics')})}"
            ) from None
        names = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]
        for i, name in enumerate(names):  # the input tap is the observation itself
            assert d["channels"][i]["corr"][name] > 0.9999
            top = d["channels"][i]["top"][0]
            assert abs(top["metrics"][name] - top["value"]) < 1e-5
        assert d["window_n"] == 200
        r = subprocess.run(
            [sys.executable, "-m", "monitor", "stats", "--run", "nope", "--redis", redis_url],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
        )
        assert r.returncode == 2 and "no run 'nope'" in r.stderr
    finally:
        mon.terminate()
        mon.wait(timeout=20)


def test_more_than_a_window_of_rows_before_the_first_metrics_is_paired_whole(store: Store) -> None:
    """Activation frames worth more than a window can come before the run's first metric frame
    (a monitor joining mid-stream, a slow wrapper); none of them may go unpaired."""
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=AnalyticsConfig(window_steps=200))
    try:
        rng = np.random.default_rng(0)
        m = rng.standard_normal((300, 2))
        pos = np.stack([np.arange(300), np.zeros(300, dtype=np.int64)], axis=1)
        assert mon.handle(encode_act("r", "p", 0, 0, "h:in", m[:150].astype(np.float32), pos[:150]))
        assert mon.handle(encode_act("r", "p", 1, 0, "h:in", m[150:].astype(np.float32), pos[150:]))
        assert mon.handle(encode_met("r", "p", 2, 0, ["a", "b"], m, pos))
        mon.flush(final=True)
    finally:
        mon.close()
    assert store.analytics("r", "h:in")["paired"] == 300


def test_a_restarted_monitor_continues_the_analytics(store: Store) -> None:
    """A monitor that dies and comes back keeps each tap's paired count, its all-time top examples
    and its correlations: it replays the recent rows Redis kept instead of starting from nothing.
    An agent that restarts the run from step 0 is paired with its own metrics, never the old ones."""
    rng = np.random.default_rng(1)
    n = 1600
    a, noise = rng.standard_normal(n), rng.standard_normal(n)
    x = np.stack([a, noise], axis=1).astype(np.float32)
    x[100, 1] = 50.0  # a spike long before the restart: outside every window and recent buffer
    cfg = AnalyticsConfig(window_steps=400, top_k=3)

    def stream(mon: Monitor, pub: str, steps: np.ndarray, x: np.ndarray, a: np.ndarray) -> None:
        for seq, s in enumerate(range(0, len(steps), 50)):  # the agent's order: tap rows, then metrics
            st, at = steps[s : s + 50], slice(s, s + 50)
            assert mon.handle(encode_act("r", pub, 2 * seq, 0, "h:out", x[at], _pos(st)))
            assert mon.handle(encode_met("r", pub, 2 * seq + 1, 0, ["a"], a[at, None], _pos(st)))
        mon.flush(final=True)

    first = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=cfg)
    try:
        stream(first, "p", np.arange(1500), x[:1500], a[:1500])
    finally:
        first.close()
    before = tap_stats(store, "r", "h:out", top=3)
    assert before["paired"] == 1500 and before["channels"][1]["top"][0]["step"] == 100

    second = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=cfg)
    try:
        # a restarted agent at steps whose old metric rows Redis still holds, with new values
        b = rng.standard_normal(100)
        stream(second, "q", np.arange(1400, 1500), np.stack([b, np.zeros(100)], axis=1).astype(np.float32), b)
    finally:
        second.close()
    d = tap_stats(store, "r", "h:out", top=3)
    assert d["paired"] == 1600
    assert d["channels"][1]["top"][0]["step"] == 100 and d["channels"][1]["top"][0]["value"] == 50.0
    # the window holds the replayed rows (Redis keeps 512) of its 400 steps, not just the new ones;
    # the restarted agent's 100 rows are at 100 of those steps again
    assert d["window_n"] == 500 and d["window_steps_held"] == 400
    assert d["channels"][0]["corr"]["a"] > 0.999  # old rows with old metrics, new rows with new ones


def test_an_idle_run_leaves_memory_and_comes_back_whole(store: Store) -> None:
    """A run quiet for evict_idle_s is let go once Redis has all of it; when it returns it goes on
    counting and pairing as if it had never left."""
    import time

    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", evict_idle_s=60, analytics=AnalyticsConfig(window_steps=100))
    try:
        rng = np.random.default_rng(0)
        a = rng.standard_normal(400)
        x = np.stack([a, -a], axis=1).astype(np.float32)
        then = time.time() - 120  # the "old" run's frames were received two minutes ago
        for run, now in (("old", then), ("live", time.time())):
            st = np.arange(300)
            assert mon.handle(encode_act(run, "p", 0, 0, "h:out", x[st], _pos(st)), now=now)
            assert mon.handle(encode_met(run, "p", 1, 0, ["a"], a[st, None], _pos(st)), now=now)
        assert mon.handle(encode_ep("old", "p", 2, 0, [[299, 0, 300.0, 300, 1.0, 0.0]]), now=then)  # a failure
        profiles = mon.runs["old"].failure_profiles
        assert set(profiles) == {"h:out"}
        mon.flush(final=True)
        assert set(mon.runs) == {"live"}  # written, idle, let go
        st = np.arange(300, 400)
        assert mon.handle(encode_act("old", "p", 3, 0, "h:out", x[st], _pos(st)))
        assert mon.handle(encode_met("old", "p", 4, 0, ["a"], a[st, None], _pos(st)))
        mon.flush(final=True)
        assert set(mon.runs) == {"old", "live"}
        assert mon.runs["old"].failure_profiles == profiles  # not in Redis, so kept while the run was away
    finally:
        mon.close()
    d = tap_stats(store, "old", "h:out")
    assert d["paired"] == 400 and d["channels"][0]["corr"]["a"] > 0.999 and d["channels"][1]["corr"]["a"] < -0.999
    (info,) = [r for r in store.status()["runs"] if r["run"] == "old"]
    assert info["frames"] == 5 and info["gaps"] == 0 and info["rows"] == 400


def test_an_agent_restarted_under_the_same_run_name_pairs_with_its_own_metrics(store: Store) -> None:
    """A new process streaming a known run counts its steps from 0 again: its activation rows,
    which arrive before their metric rows, must wait for those, not pair with the old process's."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(200), rng.standard_normal(100)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=AnalyticsConfig(window_steps=100))
    try:
        for seq, s in enumerate(range(0, 200, 50)):
            st = np.arange(s, s + 50)
            assert mon.handle(encode_act("r", "old", 2 * seq, 0, "h:out", a[st, None].astype(np.float32), _pos(st)))
            assert mon.handle(encode_met("r", "old", 2 * seq + 1, 0, ["m"], a[st, None], _pos(st)))
        for seq, s in enumerate(range(0, 100, 50)):  # the restarted agent: steps 0.. again, new values
            st = np.arange(s, s + 50)
            assert mon.handle(encode_act("r", "new", 2 * seq, 0, "h:out", b[st, None].astype(np.float32), _pos(st)))
            assert mon.handle(encode_met("r", "new", 2 * seq + 1, 0, ["m"], b[st, None], _pos(st)))
        mon.flush(final=True)
    finally:
        mon.close()
    d = tap_stats(store, "r", "h:out")
    assert d["paired"] == 300 and d["channels"][0]["corr"]["m"] > 0.9999  # every row with its own metric


def decode_frame(parts: list) -> object:
    return _decode([bytes(p) for p in parts])


def test_analytics_are_in_redis_before_anyone_is_told(store: Store) -> None:
    """The monitor files explain jobs from write_run's on_analytics: by then the analytics must be
    readable, or a fast worker finds nothing and records the job as failed (seen in make demo)."""
    from monitor.service.runstate import RunState

    st = RunState(run="r", analytics_cfg=AnalyticsConfig(window_steps=50))
    steps = np.arange(100)
    st.update(decode_frame(encode_act("r", "p", 0, 0, "latents:x", np.ones((100, 2), np.float32), _pos(steps))), 0.0)
    st.update(decode_frame(encode_met("r", "p", 1, 0, ["m"], steps[:, None].astype(np.float64), _pos(steps))), 0.0)
    seen: list[bool] = []
    write_run(store, st, analytics=True, on_analytics=lambda run, tap, an: seen.append(store.analytics(run, tap) is not None))
    assert seen == [True]


def test_rows_wait_for_their_metric_rows_past_one_window() -> None:
    """A fast agent sends a frame of more activation rows than the window before the metric rows
    of those steps (they trail in a frame of their own): every row still pairs. CI saw 387 and
    398 of 400 paired when pending rows were cut to one window (200 here) before the metrics came."""
    from monitor.stats.analytics import AnalyticsConfig, Joiner, TapAnalytics

    rng = np.random.default_rng(0)
    an = TapAnalytics(3, ["m"], AnalyticsConfig(window_steps=200))
    joiner = Joiner(["m"])
    pos = np.stack([np.arange(213), np.zeros(213, dtype=np.int64)], axis=1)
    an.offer(rng.standard_normal((213, 3)), pos, joiner)  # no metric rows yet
    joiner.add(rng.standard_normal((213, 1)), pos)
    an.retry(joiner)
    assert (an.paired, an.unpaired_dropped) == (213, 0)
    far = an.pending_cap() + 50  # past the bound, the oldest go and are counted
    pos = np.stack([np.arange(1000, 1000 + far), np.zeros(far, dtype=np.int64)], axis=1)
    an.offer(rng.standard_normal((far, 3)), pos, joiner)
    assert an.unpaired_dropped == 50 and an.to_state()["unpaired_dropped"] == 50


def test_a_vector_agent_logging_its_own_metric_has_every_metric_correlated_over_steps(redis_url: str, store: Store) -> None:
    """tap.log() beside tap.wrap(): both frames' metrics pair with the step's rows, whichever comes
    first; with 2 envs a window of 200 steps holds 400 rows, not 200."""
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--window-steps", "200")
    try:
        agent = spawn(
            [str(AGENT_DIR / "logged_vector.py"), "--endpoint", ep, "--steps", "600"], stdout=subprocess.PIPE, text=True
        )
        out, _ = agent.communicate(timeout=120)
        assert agent.returncode == 0, out
        tap = "0:in"

        def paired() -> dict | None:
            d = tap_stats(store, "logged", tap)
            return d if d and d.get("paired") == 1200 else None

        d = wait_until(paired, 60, what="1200 paired rows (600 steps x 2 envs)")
        assert set(d["metrics"]) >= {"pole_angle", "angle_x3", "reward"}
        assert d["channels"][2]["corr"]["pole_angle"] > 0.9999  # the wrapper's metric, both envs' rows
        # the user's metric is logged for row 0 of each step only: it pairs with env 0's rows
        assert d["channels"][2]["corr"]["angle_x3"] > 0.99
        assert d["window_steps"] == 200 and d["window_steps_held"] == 200 and d["window_n"] == 400
    finally:
        mon.terminate()
        mon.wait(timeout=20)


def test_a_recording_keeps_every_metric_whichever_frame_it_came_in(redis_url: str, store: Store, tmp_path) -> None:
    """`interlatent record` of an agent logging tap.log() beside the env wrapper keeps both sets,
    joined by (step, env) on read: all of the wrapper's columns, and the user's where logged."""
    from monitor.store.recording import Recording

    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--data-dir", str(tmp_path))
    try:
        store.set_record("logged", {"steps": 300, "state": "requested"})
        agent = spawn(
            [str(AGENT_DIR / "logged_vector.py"), "--endpoint", ep, "--steps", "400"], stdout=subprocess.PIPE, text=True
        )
        out, _ = agent.communicate(timeout=120)
        assert agent.returncode == 0, out
        req = wait_until(lambda: (r := store.record_requests()["logged"]).get("state") == "done" and r, 60, what="the recording")
    finally:
        mon.terminate()
        mon.wait(timeout=20)
    rec = Recording(req["path"])
    assert {"pole_angle", "reward", "angle_x3"} <= set(rec.metric_names)
    data, pos = rec.metrics()
    pole, mine = data[:, rec.metric_names.index("pole_angle")], data[:, rec.metric_names.index("angle_x3")]
    assert len(data) == 600 and not np.isnan(pole).any()  # 300 steps x 2 envs
    assert np.isnan(mine[pos[:, 1] == 1]).all()  # the user's metric is env 0's only
    env0 = pos[:, 1] == 0
    np.testing.assert_allclose(mine[env0], 3 * pole[env0] + 1, atol=1e-6)
