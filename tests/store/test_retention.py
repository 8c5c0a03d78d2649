"""What a run costs in Redis and how it goes: `interlatent runs delete R`, `--retain-days`, and
the text of `interlatent status`, which escapes whatever a name holds."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from agent_side.wire import encode_act, encode_ep, encode_met, encode_tok
from monitor.cli.main import main
from monitor.service.ingest import Monitor
from monitor.service.steering import set_interventions
from monitor.store import keys
from monitor.store.records import Store


def _pos(steps: range) -> np.ndarray:
    return np.array([[s, 0] for s in steps], dtype=np.int64)


def _cli(redis_url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([argv[0], "--redis", redis_url, *argv[1:]])
    return rc, out.getvalue(), err.getvalue()


def _run(mon: Monitor, run: str, *, steps: int = 300) -> None:
    """A run as the demo streams it: two taps, step metrics, episodes, tokens."""
    rng = np.random.default_rng(0)
    seq = 0
    for s in range(0, steps, 50):
        for tap, width in (("h0:in", 4), ("h1:out", 64)):
            assert mon.handle(
                encode_act(run, "p", seq, 0, tap, rng.standard_normal((50, width)).astype(np.float32), _pos(range(s, s + 50)))
            )
            seq += 1
        met = rng.standard_normal((50, 7))
        assert mon.handle(encode_met(run, "p", seq, 0, [f"m{i}" for i in range(7)], met, _pos(range(s, s + 50))))
        assert mon.handle(encode_ep(run, "p", seq + 1, 0, [[s + 49, 0, 50.0, 50, 1, 0]]))
        assert mon.handle(encode_tok(run, "p", seq + 2, 0, s, [["a", "b"]]))
        seq += 3
    mon.flush(final=True)


def _keys_of(store: Store, run: str) -> list[bytes]:
    return [k for k in store.r.keys("*") if run.encode() in k]


def test_runs_delete_removes_every_key_of_one_run_and_nothing_else(store: Store, redis_url: str) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        _run(mon, "gone")
        _run(mon, "kept")
    finally:
        mon.close()
    set_interventions(store.r, "gone", [])
    store.set_record("gone", {"steps": 10, "state": "done"})
    before = _keys_of(store, "gone")
    assert len(before) >= 12
    cost = store.run_cost("gone")
    assert cost["keys"] == len(before) and cost["bytes"] > 10_000
    rc, out, err = _cli(redis_url, "runs", "--json")
    assert rc == 0 and {r["run"] for r in json.loads(out)["runs"]} == {"gone", "kept"}

    rc, out, err = _cli(redis_url, "runs", "delete", "gone")
    assert rc == 2 and "--force" in err and len(err.strip().splitlines()) == 1  # it streamed a moment ago
    rc, out, err = _cli(redis_url, "runs", "delete", "gone", "--force", "--json")
    assert rc == 0, err
    assert json.loads(out) == {"run": "gone", "deleted_keys": len(before)}
    assert _keys_of(store, "gone") == [] and store.runs() == ["kept"] and "gone" not in store.record_requests()
    assert len(_keys_of(store, "kept")) == len(before) - 1  # the other run is whole (it has no steer key)
    rc, _, err = _cli(redis_url, "runs", "delete", "nope")
    assert rc == 2 and "no run 'nope'" in err


def test_retain_days_expires_ended_runs_only(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        _run(mon, "old")
        _run(mon, "new")
    finally:
        mon.close()
    store.r.zadd(keys.RUNS, {"old": time.time() - 31 * 86400})  # its last frame, a month ago
    assert _keys_of(store, "old")
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, retain_days=30)
    try:
        mon.flush()
        assert _keys_of(store, "old") == [] and store.runs() == ["new"] and mon.runs_expired == 1
        assert len(_keys_of(store, "new")) >= 12
    finally:
        mon.close()
    keep = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)  # the library default keeps runs
    try:
        store.r.zadd(keys.RUNS, {"new": 1.0})
        keep.flush()
        assert store.runs() == ["new"]
    finally:
        keep.close()


@pytest.mark.parametrize("flag, value", [("--retain-days", "-1"), ("--outbox-mib", "0")])
def test_monitor_limits_refuse_bad_values_in_one_line(redis_url: str, flag: str, value: str) -> None:
    rc, out, err = _cli(redis_url, "monitor", "--endpoint", "tcp://127.0.0.1:0", "--metrics-port", "-1", flag, value)
    assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1


def test_status_text_escapes_what_names_hold(store: Store, redis_url: str) -> None:
    """The wire refuses such names now; Redis may still hold them (an older monitor, a hand edit).
    Before: status printed them raw, so a run name could forge a line or send escape sequences."""
    evil = "x\nrun forged: steps 999, drops 0\x1b[2J\x1b[31m"
    store.r.zadd(keys.RUNS, {evil: time.time()})
    store.r.hset(keys.run(evil), mapping={"steps": 1, "last_seen": time.time()})
    store.r.hset(keys.run_taps(evil), "t\rap", json.dumps({"width": 1, "rows": 1, "frames": 1, "dtype": "float32"}))
    rc, out, err = _cli(redis_url, "status")
    assert rc == 0, err
    assert "\x1b" not in out and "\r" not in out
    assert not any(line.startswith("run forged") for line in out.splitlines())
    assert "x\\nrun forged: steps 999, drops 0\\x1b[2J\\x1b[31m" in out and "t\\rap" in out
    rc, out, err = _cli(redis_url, "status", "--json")
    assert json.loads(out)["runs"][0]["run"] == evil  # JSON carries it, escaped by JSON
