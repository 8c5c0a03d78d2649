"""Alert rules: parsing, the state machine, every kind, webhooks, /metrics, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until

from agent_side.wire import encode_act, encode_met
from monitor.alerts.engine import WARMUP_ROWS, AlertEngine
from monitor.alerts.prom import serve_metrics
from monitor.alerts.rules import RulesError, parse_rules
from monitor.service.ingest import Monitor
from monitor.stats.analytics import AnalyticsConfig, TapAnalytics, key_of
from monitor.store import keys
from monitor.store.records import Store


def _pos(steps) -> np.ndarray:
    steps = np.asarray(list(steps))
    return np.stack([steps, np.zeros_like(steps)], axis=1).astype(np.int64)


class Hook:
    """A local HTTP server standing in for a webhook receiver."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"rules": [{"name": "a", "kind": "spike"}]}, "rule 'a': field 'kind' must be one of"),
        ({"rules": [{"name": "a", "kind": "zscore", "z": "high"}]}, "rule 'a': field 'z' must be a number"),
        ({"rules": [{"name": "a", "kind": "threshold"}]}, "rule 'a': a threshold rule needs field 'above' or 'below'"),
        ({"rules": [{"name": "a", "kind": "zscore", "for": -1}]}, "rule 'a': field 'for' must be >= 0"),
        ({"rules": [{"name": "a", "kind": "zscore", "severty": "x"}]}, "rule 'a': unknown field 'severty'"),
        ({"rules": [{"kind": "zscore"}]}, "rule #1: field 'name' is required"),
        ({"rules": [{"name": "a", "kind": "zscore"}, {"name": "a", "kind": "wake"}]}, "rule 'a': field 'name' is used twice"),
        ({"rules": [{"name": "a", "kind": "corr_flip"}]}, "rule 'a': a corr_flip rule needs field 'metric'"),
        ({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": [{"url": "ftp://x"}]}, "webhook #1: field 'url'"),
        (
            {"rules": [{"name": "a", "kind": "zscore"}], "webhooks": [{"url": "http://h/x", "timeout": 2}]},
            "webhook #1: unknown field 'timeout'",
        ),
        ({"rules": [{"name": "a", "kind": "zscore"}], "webhook": [{"url": "http://h/x"}]}, "unknown top-level field 'webhook'"),
        ({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": {"url": "http://h/x"}}, "field 'webhooks' must be a list"),
    ],
)
def test_rules_errors_name_the_rule_and_field(doc: dict, message: str) -> None:
    with pytest.raises(RulesError) as e:
        parse_rules(doc)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_rules_file_on_the_command_line(tmp_path: Path, redis_url: str) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("rules:\n  - name: spiky\n    kind: zscore\n    cooldown: soon\n")
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "monitor", "--rules", str(f), "--redis", redis_url],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "interlatent: rule 'spiky': field 'cooldown' must be an integer, got 'soon'"


def test_the_example_rules_file_parses() -> None:
    import yaml

    rules = parse_rules(yaml.safe_load((ROOT / "deploy" / "alerts.example.yaml").read_text()))
    assert {r.kind for r in rules.rules} == {"zscore", "threshold", "wake", "corr_flip"}


def _run(engine: AlertEngine, values: list[float], width: int = 1) -> list[tuple[int, str]]:
    x = np.zeros((len(values), width), np.float32)
    x[:, 0] = values
    return [(e["step"], e["state"]) for e in engine.on_rows("r", "t", x, _pos(range(len(values))), None)]


def test_state_machine_for_keep_firing_cooldown_and_dedup() -> None:
    rule = {"name": "hot", "kind": "threshold", "above": 1.0, "for": 3, "keep_firing_for": 2, "cooldown": 5}
    engine = AlertEngine(parse_rules({"rules": [rule]}))
    v = [0, 2, 2, 0, 2, 2, 2, 2, 2, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2]
    #    0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20 21 22
    # pending at 1-2 (reset at 3); fires at 6 (3rd true step); stays firing while true and for 2 steps
    # after (9, 10); resolves at 11; cooldown until 16 stops 12-14 firing; 19-21 holds 3 steps: fires at 21
    assert _run(engine, v) == [
        (1, "pending"),
        (3, "inactive"),  # cleared before `for`: back to inactive, never fired
        (4, "pending"),
        (6, "firing"),
        (11, "resolved"),
        (19, "pending"),  # 12-14 are in the cooldown: not even pending
        (21, "firing"),
    ]
    assert engine.active() == [{"rule": "hot", "run": "r", "tap": "t", "latent": 0, "state": "firing"}]


def test_zscore_fires_on_a_spike_after_warmup_only() -> None:
    engine = AlertEngine(parse_rules({"rules": [{"name": "z", "kind": "zscore", "z": 6}]}))
    rng = np.random.default_rng(0)
    early_spike = [0.0] * 3 + [5.0]  # within the warm-up: never fires, though z would be huge
    calm = rng.normal(0, 1, 200).tolist()
    assert _run(engine, early_spike) == []
    x = np.zeros((201, 2), np.float32)
    x[:200, 0], x[200, 0] = calm, 12.0
    x[:, 1] = rng.normal(0, 1, 201)
    events = engine.on_rows("r", "t", x, _pos(range(4, 205)), None)
    assert [(e["step"], e["state"], e["latent"]) for e in events] == [(204, "firing", 0)]
    assert events[0]["z"] > 6 and "z=+" in events[0]["text"]
    assert WARMUP_ROWS < 200


def test_wake_fires_when_a_rare_channel_lights_up() -> None:
    engine = AlertEngine(parse_rules({"rules": [{"name": "w", "kind": "wake", "above": 0.5, "rare_below": 0.05}]}))
    v = [0.0] * 100 + [3.0] + [0.0] * 5
    assert _run(engine, v) == [(100, "firing"), (101, "resolved")]
    busy = AlertEngine(parse_rules({"rules": [{"name": "w", "kind": "wake", "above": 0.5, "rare_below": 0.05}]}))
    assert _run(busy, [3.0, 0.0] * 60) == []  # active half the time: not rare


def test_corr_flip_uses_the_live_correlation() -> None:
    engine = AlertEngine(parse_rules({"rules": [{"name": "f", "kind": "corr_flip", "metric": "m", "min_abs": 0.8}]}))
    an = TapAnalytics(1, ["m"], AnalyticsConfig(window_steps=50))
    rng = np.random.default_rng(1)
    events = []
    for sign in (1.0, -1.0):
        for chunk in range(4):
            m = rng.standard_normal((25, 1))
            x = (sign * m).astype(np.float32)
            steps = range(chunk * 25 + (0 if sign > 0 else 100), chunk * 25 + 25 + (0 if sign > 0 else 100))
            an._update(x.astype(np.float64), m, key_of(_pos(steps)))  # the rows' own steps: the window is in steps
            events += engine.on_paired("r", "t", an, steps[-1])  # after the rows are paired with their metrics
    assert [e["state"] for e in events] == ["firing", "resolved"]  # a flip is an event: it resolves at the next frame
    assert events[0]["value"] < -0.8 and events[0]["correlations"]["m"] < -0.8


def test_alerts_reach_stream_webhook_and_metrics(store: Store) -> None:
    hook = Hook()
    rules = parse_rules(
        {"rules": [{"name": "hot", "kind": "threshold", "above": 5.0, "labels": {"team": "rl"}}], "webhooks": [{"url": hook.url}]}
    )
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    server = serve_metrics(mon, 0)
    try:
        x = np.zeros((10, 3), np.float32)
        x[4, 1] = 9.0
        mon.handle(encode_act("r", "p", 0, 0, "t", x, _pos(range(10))))
        mon.handle(encode_met("r", "p", 1, 0, ["m"], np.arange(10.0)[:, None], _pos(range(10))))
        wait_until(lambda: len(hook.bodies) == 2, what="firing and resolved at the webhook")
        assert [b["alert"]["state"] for b in hook.bodies] == ["firing", "resolved"]
        body = hook.bodies[0]
        assert body["text"].startswith("[warning] hot firing: r t channel 1 at step 4")
        assert body["alert"]["labels"] == {"team": "rl"} and body["alert"]["value"] == 9.0
        stream = [json.loads(f[b"json"]) for _, f in store.r.xrange(keys.ALERTS)]
        assert [(a["latent"], a["state"]) for a in stream] == [(1, "firing"), (1, "resolved")]
        assert store.r.hlen(keys.ALERTS_ACTIVE) == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics", timeout=5).read().decode()
        assert 'interlatent_alerts_total{rule="hot",state="firing"} 1' in text
        assert "interlatent_frames_total 2" in text and "interlatent_up 1" in text
    finally:
        server.shutdown()
        mon.close()
        hook.close()


def test_dead_webhook_does_not_stall_the_monitor(store: Store) -> None:
    dead = free_endpoint().replace("tcp://", "http://") + "/hook"
    rules = parse_rules(
        {
            "rules": [{"name": "hot", "kind": "threshold", "above": 0.5}],
            "webhooks": [{"url": dead, "timeout_s": 0.2, "retries": 1}],
        }
    )
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    try:
        for i in range(50):  # alternate on/off: 50 frames, 25 firing events and 25 resolved
            x = np.full((1, 1), float(i % 2 == 0), np.float32)
            assert mon.handle(encode_act("r", "p", i, 0, "t", x, _pos([i])))
        assert mon.frames == 50 and mon.rows == 50
        assert store.r.xlen(keys.ALERTS) == 50  # every alert stored even though no webhook answers
        wait_until(lambda: mon.sink.webhook_failed + mon.sink.webhook_dropped == 50, timeout_s=60, what="all posts given up")
        assert mon.sink.webhook_sent == 0
    finally:
        mon.close()


def test_end_to_end_planted_spike_alerts(tmp_path: Path, redis_url: str, store: Store) -> None:
    hook = Hook()
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
webhooks: [{{url: "{hook.url}"}}]
rules:
  - name: cart-out-of-range
    kind: threshold
    tap: "*policy_net.0:in"
    channels: [0]
    above: 10
    severity: critical
""")
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--rules", str(rules))
    try:
        agent = spawn(
            [
                str(AGENT_DIR / "sb3_cartpole.py"),
                "--endpoint",
                ep,
                "--steps",
                "600",
                "--spike-at",
                "450",
                "--sleep-ms",
                "1",
                "--run",
                "spiky",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert agent.wait(timeout=120) == 0
        wait_until(lambda: len(hook.bodies) >= 2, what="the planted spike at the webhook")
        firing = hook.bodies[0]["alert"]
        assert (firing["run"], firing["step"], firing["latent"], firing["state"], firing["value"]) == (
            "spiky",
            450,
            0,
            "firing",
            50.0,
        )
        assert "cart_pos" in firing["correlations"]
        out = subprocess.run(
            [sys.executable, "-m", "monitor", "alerts", "--run", "spiky", "--json", "--redis", redis_url],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
        )
        alerts = json.loads(out.stdout)["alerts"]
        assert [(a["step"], a["state"]) for a in alerts] == [(450, "firing"), (451, "resolved")]
        follow = subprocess.run(
            [sys.executable, "-m", "monitor", "alerts", "--follow", "--max", "1", "--run", "spiky", "--redis", redis_url],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
        )
        lines = follow.stdout.strip().splitlines()  # at most --max lines, the newest past ones first
        assert len(lines) == 1 and "cart-out-of-range resolved: spiky" in lines[0]
    finally:
        mon.terminate()
        mon.wait(timeout=20)
        hook.close()


def test_alerts_of_a_quiet_run_are_not_hidden_by_a_busy_one(store: Store, redis_url: str, capsys: pytest.CaptureFixture) -> None:
    """`alerts --run R --last N` is the newest N of R, read past any number of other runs' alerts;
    `--follow --max N` prints at most N."""
    from monitor.cli.main import main

    def add(run: str, i: int) -> None:
        a = {"run": run, "rule": "r", "state": "firing", "time": 1000.0 + i, "text": f"{run} {i}"}
        store.r.xadd(keys.ALERTS, {"json": json.dumps(a)})

    for i in range(3):
        add("quiet", i)
    for i in range(2500):
        add("busy", i)
    assert main(["alerts", "--run", "quiet", "--last", "2", "--json", "--redis", redis_url]) == 0
    got = json.loads(capsys.readouterr().out)["alerts"]
    assert [a["text"] for a in got] == ["quiet 1", "quiet 2"]
    assert main(["alerts", "--last", "3", "--json", "--redis", redis_url]) == 0
    assert [a["text"] for a in json.loads(capsys.readouterr().out)["alerts"]] == ["busy 2497", "busy 2498", "busy 2499"]
    assert main(["alerts", "--run", "busy", "--last", "10", "--follow", "--max", "4", "--redis", redis_url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].endswith("busy 2499")
