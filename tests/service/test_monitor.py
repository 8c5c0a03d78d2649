"""The monitor's receive loop against real sockets and a real Redis."""

from __future__ import annotations

import msgpack
import numpy as np
import zmq
from helpers import LiveMonitor, wait_until

from agent_side.wire import encode_act, encode_ep, encode_met
from monitor.service.ingest import Monitor
from monitor.store import keys
from monitor.store.records import Store


def _pos(steps: range, index: int = 0) -> np.ndarray:
    return np.array([[s, index] for s in steps], dtype=np.int64)


def _push(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(endpoint)
    return s


def test_garbage_interleaved_with_valid_frames(store: Store, live_monitor: LiveMonitor) -> None:
    sock = _push(live_monitor.endpoint)
    rng = np.random.default_rng(0)
    header = bytes(encode_act("r", "p", 0, 0, "t", np.ones((2, 2), np.float32), _pos(range(2)))[0])
    garbage = [
        ([b"\xc1", b"x", b"y"], "bad_msgpack"),
        ([msgpack.packb([1, 2, 3])], "bad_header"),
        ([msgpack.packb({**msgpack.unpackb(header), "v": 7}), b"", b""], "version"),
        ([header], "bad_frame"),
        ([b"x" * 70_000, b"", b""], "oversized"),
    ]
    valid = 0
    expected_bad: dict[str, int] = {}
    seq = 0
    for i in range(60):
        data = rng.standard_normal((4, 8)).astype(np.float32)
        if i % 3 == 0:
            parts, reason = garbage[(i // 3) % len(garbage)]
            sock.send_multipart(parts)
            expected_bad[reason] = expected_bad.get(reason, 0) + 1
        elif i % 7 == 0:
            bad = data.copy()
            bad[1, 1] = np.nan
            sock.send_multipart(encode_act("run-a", "p1", seq, 0, "layer:out", bad, _pos(range(i * 4, i * 4 + 4))))
            expected_bad["non_finite"] = expected_bad.get("non_finite", 0) + 1
            seq += 1
        else:
            sock.send_multipart(encode_act("run-a", "p1", seq, 0, "layer:out", data, _pos(range(i * 4, i * 4 + 4))))
            valid += 1
            seq += 1
    wait_until(lambda: live_monitor.monitor.frames >= 60, what="all 60 frames")
    mon = live_monitor.finish()
    sock.close()
    assert sum(mon.rejected.values()) == 60 - valid
    assert dict(mon.rejected) == expected_bad
    st = store.status()
    assert st["monitor"]["rejected"] == expected_bad
    (run,) = st["runs"]
    assert run["taps"]["layer:out"] == {"width": 8, "rows": 4 * valid, "frames": valid, "dtype": "float32"}
    assert run["gaps"] == expected_bad["non_finite"]  # the rejected NaN frames are missing from the sequence


def test_width_change_mid_run_is_rejected_and_other_runs_continue(store: Store, live_monitor: LiveMonitor) -> None:
    sock = _push(live_monitor.endpoint)
    sock.send_multipart(encode_act("r1", "p", 0, 0, "t:out", np.ones((2, 4), np.float32), _pos(range(2))))
    sock.send_multipart(encode_act("r1", "p", 1, 0, "t:out", np.ones((2, 5), np.float32), _pos(range(2, 4))))
    sock.send_multipart(encode_act("r2", "q", 0, 0, "t:out", np.ones((2, 5), np.float32), _pos(range(2))))
    sock.send_multipart(encode_act("r1", "p", 2, 0, "t:out", np.ones((3, 4), np.float32), _pos(range(4, 7))))
    wait_until(lambda: live_monitor.monitor.frames >= 4, what="4 frames")
    mon = live_monitor.finish()
    sock.close()
    assert mon.rejected == {"width_changed": 1}
    runs = {r["run"]: r for r in store.status()["runs"]}
    assert runs["r1"]["taps"]["t:out"]["rows"] == 5
    assert runs["r1"]["gaps"] == 0  # the refused frame is counted once, as rejected, not also as a gap
    assert runs["r2"]["taps"]["t:out"]["width"] == 5


def test_gaps_stale_sequence_metrics_and_episodes(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        d = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert mon.handle(encode_act("r", "p", 0, 2, "t", d, _pos(range(2))))
        assert mon.handle(encode_act("r", "p", 4, 5, "t", d, _pos(range(2, 4))))  # 1, 2, 3 lost
        assert not mon.handle(encode_act("r", "p", 4, 5, "t", d, _pos(range(2, 4))))  # a repeat
        assert mon.handle(encode_met("r", "p", 5, 5, ["reward", "x"], np.array([[1.0, 2.0]]), _pos(range(9, 10))))
        assert mon.handle(encode_ep("r", "p", 6, 5, [[9, 0, 10.0, 10, 1, 0], [9, 1, 30.0, 30, 0, 1]]))
        mon.flush()
        (run,) = store.status()["runs"]
        assert (run["gaps"], run["drops"], run["steps"], run["episodes"]) == (3, 5, 10, 2)
        assert run["return_mean_100"] == 20.0
        assert run["metrics"] == ["reward", "x"]
        assert mon.rejected == {"stale_seq": 1}
        assert store.r.xlen(keys.episodes("r")) == 2
    finally:
        mon.close()


def test_restarted_monitor_continues_statistics_and_counts_lost_frames(store: Store) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((30, 4)).astype(np.float32)
    first = Monitor(store, endpoint="tcp://127.0.0.1:0")
    first.handle(encode_act("r", "p", 0, 0, "t", a, _pos(range(50))))
    first.flush()
    first.handle(encode_act("r", "p", 1, 0, "t", a[:5], _pos(range(50, 55))))  # never flushed: lost with the process
    first.close()
    second = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        second.handle(encode_act("r", "p", 2, 0, "t", b, _pos(range(55, 85))))
        second.flush()
        (run,) = store.status()["runs"]
        assert run["gaps"] == 1 and run["taps"]["t"]["rows"] == 80
        m = store.tap_moments("r", "t")
        both = np.concatenate([a, b]).astype(np.float64)
        np.testing.assert_allclose(m["mean"], both.mean(0), rtol=1e-9)
        np.testing.assert_allclose(m["std"], both.std(0), rtol=1e-9)
        data, pos = store.recent("r", "t")
        np.testing.assert_array_equal(pos[:, 0], np.r_[0:50, 55:85])
        np.testing.assert_array_equal(data[-30:], b)
    finally:
        second.close()


def test_run_names_that_look_like_keys_do_not_collide(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        for run, pub in (("x", "p"), ("x:metrics", "q"), ("x:taps", "r")):
            mon.handle(encode_act(run, pub, 0, 0, "t:out", np.ones((2, 3), np.float32), _pos(range(2))))
            mon.handle(encode_met(run, pub, 1, 0, ["m"], np.ones((2, 1)), _pos(range(2))))
        mon.flush()
        runs = {r["run"]: r for r in store.status()["runs"]}
        assert set(runs) == {"x", "x:metrics", "x:taps"}
        assert all(r["taps"]["t:out"]["rows"] == 2 and r["metrics"] == ["m"] for r in runs.values())
    finally:
        mon.close()
