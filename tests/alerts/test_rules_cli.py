"""`interlatent rules check FILE` and `rules test FILE --recording DIR`: rules a user can test
before a run, like promtool's check and test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import ROOT

from agent_side.wire import encode_act, encode_met
from monitor.alerts.rules import parse_rules
from monitor.service.ingest import Monitor
from monitor.stats.analytics import AnalyticsConfig
from monitor.store import keys
from monitor.store.recording import Recorder
from monitor.store.records import Store

RULES = {
    "rules": [
        {"name": "hot", "kind": "threshold", "tap": "h:out", "channels": [1], "above": 3.0, "for": 2},
        {"name": "z", "kind": "zscore", "tap": "h:out", "channels": [0], "z": 5},
        {"name": "flip", "kind": "corr_flip", "tap": "h:out", "channels": [2], "metric": "m", "min_abs": 0.8},
    ],
    "webhooks": [{"url": "http://127.0.0.1:9/hook", "group_wait": 0}],
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _rows(n: int = 1200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    m = rng.standard_normal(n)
    x = rng.standard_normal((n, 3)).astype(np.float32) * 0.5
    x[300:304, 1] = 9.0  # four steps hot: pending, then firing
    x[700, 0] = 40.0  # one zscore spike
    x[:, 2] = np.where(np.arange(n) < 900, m, -m)  # its correlation with m flips at step 900
    pos = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)
    return x, m[:, None], pos


def test_rules_check_says_ok_or_names_the_field(tmp_path: Path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text(json.dumps(RULES))
    r = _cli("rules", "check", str(good))
    assert r.returncode == 0 and "3 rules" in r.stdout and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({**RULES, "webhooks": [{"url": "http://127.0.0.1:9/hook", "timeout": 2}]}))
    r = _cli("rules", "check", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "'timeout'" in r.stderr and str(bad) in r.stderr


def test_rules_test_replays_a_recording_as_the_live_monitor_would(tmp_path: Path, store: Store) -> None:
    x, m, pos = _rows()
    rec = Recorder(tmp_path / "rec", "r", max_steps=10_000)
    for lo in range(0, len(x), 100):  # the agent's order: a frame of tap rows, then its metric rows
        rec.add_tap("h:out", x[lo : lo + 100], pos[lo : lo + 100])
        rec.add_metrics(["m"], m[lo : lo + 100], pos[lo : lo + 100])
    rec.close()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(json.dumps({"rules": RULES["rules"]}))
    r = _cli(
        "rules",
        "test",
        str(rules_file),
        "--recording",
        str(tmp_path / "rec"),
        "--window-steps",
        "100",
        "--chunk",
        "100",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    replayed = [(e["rule"], e["state"], e["step"]) for e in json.loads(r.stdout)["events"]]
    # the same rows streamed to a live monitor, frame by frame
    mon = Monitor(
        store,
        endpoint="tcp://127.0.0.1:0",
        rules=parse_rules({"rules": RULES["rules"]}),
        analytics=AnalyticsConfig(window_steps=100),
    )
    try:
        for seq, lo in enumerate(range(0, len(x), 100)):
            assert mon.handle(encode_act("r", "p", 2 * seq, 0, "h:out", x[lo : lo + 100], pos[lo : lo + 100]))
            assert mon.handle(encode_met("r", "p", 2 * seq + 1, 0, ["m"], m[lo : lo + 100], pos[lo : lo + 100]))
    finally:
        mon.close()
    live = [(a["rule"], a["state"], a["step"]) for a in (json.loads(f[b"json"]) for _, f in store.r.xrange(keys.ALERTS))]
    live = [e for e in live if e[1] in ("firing", "resolved")]
    fired = [e for e in replayed if e[1] == "firing"]
    assert ("hot", "firing", 301) in fired and ("z", "firing", 700) in fired
    assert any(rule == "flip" and 900 <= step < 1000 for rule, _, step in fired)
    assert replayed[: len(live)] == live  # what the live monitor raised, then the recording's end resolves the rest
    r = _cli("rules", "test", str(rules_file), "--recording", str(tmp_path / "rec"), "--window-steps", "100")
    assert r.returncode == 0 and "hot firing" in r.stdout and "hot: 1 fired" in r.stdout
    # a reader that stops early (`| head -1`) gets its line and no traceback
    p = subprocess.Popen(
        [sys.executable, "-m", "monitor", "rules", "test", str(rules_file), "--recording", str(tmp_path / "rec"), "--all-states"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert p.stdout is not None and p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err
    r = _cli("rules", "test", str(rules_file), "--recording", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no recording" in r.stderr and "Traceback" not in r.stderr


def test_rules_check_refuses_values_that_mean_nothing_or_never_fire(tmp_path: Path) -> None:
    base = {"name": "r", "kind": "zscore"}
    cases = [
        ({**base, "z": -3}, "'z'"),
        ({**base, "z": 0}, "'z'"),
        ({"name": "r", "kind": "threshold", "above": float("nan")}, "'above'"),
        ({"name": "r", "kind": "wake", "rare_below": 2}, "'rare_below'"),
        ({"name": "r", "kind": "corr_flip", "metric": "m", "min_abs": 1.5}, "'min_abs'"),
        ({**base, "labels": {"team": [1, 2]}}, "'labels'"),
        ({"name": "a|b", "kind": "zscore"}, "'name'"),
        ({"name": "r", "kind": "threshold", "above": 1, "metric": "m"}, "'metric' does not apply to a threshold rule"),
    ]
    for rule, field in cases:
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"rules": [rule]}))
        r = _cli("rules", "check", str(path))
        assert r.returncode == 2 and field in r.stderr and len(r.stderr.strip().splitlines()) == 1, (rule, r.stderr)
    path.write_text(json.dumps({"rules": [base], "webhooks": [{"url": "http://127.0.0.1:9/h", "group_by": ["channel", "unit"]}]}))
    assert _cli("rules", "check", str(path)).returncode == 0  # the fields alerts carry can group
