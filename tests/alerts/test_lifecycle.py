"""The alert lifecycle as Prometheus has it: inactive -> pending -> firing -> resolved, baselines
frozen while an excursion lasts, corr_flip on the newest correlations, runs that stop resolve their
alerts, and the state survives a monitor restart."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from helpers import ROOT

from agent_side.wire import encode_act, encode_met
from monitor.alerts.engine import AlertEngine
from monitor.alerts.rules import parse_rules
from monitor.service.ingest import Monitor
from monitor.stats.analytics import AnalyticsConfig
from monitor.store import keys
from monitor.store.records import Store


def _pos(steps) -> np.ndarray:
    steps = np.asarray(list(steps))
    return np.stack([steps, np.zeros_like(steps)], axis=1).astype(np.int64)


def _events(engine: AlertEngine, values: list[float], start: int = 0) -> list[tuple[int, str]]:
    x = np.asarray(values, np.float32)[:, None]
    return [(e["step"], e["state"]) for e in engine.on_rows("r", "t", x, _pos(range(start, start + len(x))), None)]


def _stream(store: Store) -> list[dict]:
    return [json.loads(f[b"json"]) for _, f in store.r.xrange(keys.ALERTS)]


def test_a_sustained_excursion_alerts_for_as_long_as_it_lasts() -> None:
    # zscore's EW baseline is frozen while the channel fires: an 11-step excursion is an 11-step alert
    engine = AlertEngine(parse_rules({"rules": [{"name": "z", "kind": "zscore", "z": 4, "baseline_alpha": 0.2}]}))
    rng = np.random.default_rng(0)
    calm = rng.normal(0, 1, 100).tolist()
    out = _events(engine, calm + [8.0] * 11 + rng.normal(0, 1, 20).tolist())
    assert out == [(100, "firing"), (111, "resolved")]


def test_wake_stays_firing_while_the_channel_is_lit() -> None:
    engine = AlertEngine(parse_rules({"rules": [{"name": "w", "kind": "wake", "above": 0.5, "rare_below": 0.05}]}))
    assert _events(engine, [0.0] * 100 + [3.0] * 30 + [0.0] * 3) == [(100, "firing"), (130, "resolved")]


def test_pending_is_an_event_and_resolved_says_what_the_value_returned_to(store: Store) -> None:
    rules = parse_rules({"rules": [{"name": "hot", "kind": "threshold", "above": 5.0, "for": 3}]})
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    try:
        x = np.zeros((6, 1), np.float32)
        x[1:3] = 9.0  # two steps: pending, then inactive again
        assert mon.handle(encode_act("r", "p", 0, 0, "t", x, _pos(range(6))))
        assert [(a["step"], a["state"]) for a in _stream(store)] == [(1, "pending"), (3, "inactive")]
        x = np.full((3, 1), 9.0, np.float32)
        assert mon.handle(encode_act("r", "p", 1, 0, "t", x, _pos(range(6, 9))))
        (active,) = [json.loads(v) for v in store.r.hvals(keys.ALERTS_ACTIVE)]
        assert active["state"] == "firing" and active["since"] == 6 and active["channel"] == 0
        assert mon.handle(encode_act("r", "p", 2, 0, "t", np.array([[1.5]], np.float32), _pos([9])))
        last = _stream(store)[-1]
        assert last["state"] == "resolved" and "resolved" in last["text"] and "back to +1.500" in last["text"]
        assert "since step 6" in last["text"] and store.r.hlen(keys.ALERTS_ACTIVE) == 0
    finally:
        mon.close()


def test_a_flip_in_a_runs_last_frames_is_alerted(store: Store) -> None:
    """corr_flip looks at the correlation once the frame's rows are paired with their metrics: the
    last frame's flip is seen, not a window one frame behind."""
    rules = parse_rules({"rules": [{"name": "flip", "kind": "corr_flip", "metric": "m", "min_abs": 0.8}]})
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules, analytics=AnalyticsConfig(window_steps=40))
    rng = np.random.default_rng(2)
    try:
        seq = 0
        for start, sign in ((0, 1.0), (40, 1.0), (80, -1.0)):  # the flip is in the last 40 steps only
            m = rng.standard_normal((40, 1))
            steps = _pos(range(start, start + 40))
            assert mon.handle(encode_act("r", "p", seq, 0, "t", (sign * m).astype(np.float32), steps))
            assert mon.handle(encode_met("r", "p", seq + 1, 0, ["m"], m, steps))
            seq += 2
        fired = [a for a in _stream(store) if a["state"] == "firing"]
        assert len(fired) == 1 and fired[0]["step"] == 119 and fired[0]["value"] < -0.8
    finally:
        mon.close()


def test_a_run_that_goes_quiet_resolves_its_alerts_with_a_reason(store: Store) -> None:
    rules = parse_rules({"rules": [{"name": "hot", "kind": "threshold", "above": 5.0}]})
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules, alert_idle_s=30.0)
    try:
        x = np.full((4, 2), 9.0, np.float32)
        assert mon.handle(encode_act("r", "p", 0, 0, "t", x, _pos(range(4))), now=1000.0)
        assert mon.handle(encode_act("busy", "p", 0, 0, "t", x, _pos(range(4))))
        assert {a["run"] for a in _stream(store) if a["state"] == "firing"} == {"r", "busy"}
        assert store.r.hlen(keys.ALERTS_ACTIVE) == 4
        mon.flush()  # the quiet run's last frame was long ago
        ended = [a for a in _stream(store) if a["state"] == "resolved"]
        assert {(a["run"], a["channel"]) for a in ended} == {("r", 0), ("r", 1)}
        assert all("the run sent nothing for" in a["text"] and a["reason"] for a in ended)
        assert {json.loads(v)["run"] for v in store.r.hvals(keys.ALERTS_ACTIVE)} == {"busy"}
    finally:
        mon.close()


def test_alert_state_survives_a_monitor_restart(store: Store, redis_url: str) -> None:
    rules = parse_rules({"rules": [{"name": "hot", "kind": "threshold", "above": 5.0, "for": 2}]})
    first = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    try:
        x = np.array([[9.0, 0.0], [9.0, 9.0]], np.float32)  # channel 0 fires, channel 1 is pending
        assert first.handle(encode_act("r", "p", 0, 0, "t", x, _pos(range(2))))
    finally:
        first.close()
    states = {json.loads(v)["channel"]: json.loads(v)["state"] for v in store.r.hvals(keys.ALERTS_ACTIVE)}
    assert states == {0: "firing", 1: "pending"}
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "alerts", "--json", "--redis", redis_url], capture_output=True, text=True, cwd=ROOT
    )
    assert sorted(a["state"] for a in json.loads(r.stdout)["active"]) == ["firing", "pending"]  # pending is visible
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "status", "--json", "--redis", redis_url], capture_output=True, text=True, cwd=ROOT
    )
    counts = json.loads(r.stdout)["alerts"]
    assert (counts["pending"], counts["firing"], counts["events"]["hot|pending"], counts["events"]["hot|firing"]) == (1, 1, 2, 1)
    second = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    try:  # the restarted monitor knows channel 0 fires: it resolves it, and does not fire it twice
        assert second.handle(encode_act("r", "q", 0, 0, "t", np.array([[9.0, 0.0], [0.0, 0.0]], np.float32), _pos([2, 3])))
        after = [(a["channel"], a["state"]) for a in _stream(store)][3:]
        assert after == [(1, "inactive"), (0, "resolved")]
        assert store.r.hlen(keys.ALERTS_ACTIVE) == 0
    finally:
        second.close()


def test_a_vector_envs_rows_are_one_step_for_the_rules() -> None:
    """Two envs, two rows a step: `for` counts steps, and one env's quiet row does not resolve what
    the other's row keeps firing (it flapped at every step before)."""
    engine = AlertEngine(parse_rules({"rules": [{"name": "hot", "kind": "threshold", "above": 3.0, "for": 2}]}))
    steps = np.repeat(np.arange(10), 2)
    pos = np.stack([steps, np.tile([0, 1], 10)], axis=1)
    x = np.zeros((20, 1), np.float32)
    x[8::2] = 5.0  # env 0 hot from step 4 on; env 1 never
    out = [(e["step"], e["state"], e["index"]) for e in engine.on_rows("r", "t", x, pos, None)]
    assert out == [(4, "pending", 0), (5, "firing", 0)]
