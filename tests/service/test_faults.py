"""Faults a monitor must survive without losing anything it acknowledged, or losing it counted:
Redis killed mid-stream (the outbox), a run that floods its pre-metrics buffer or its taps
(per-run budgets), and frames whose runs must not be registered (no state for a rejected frame)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
import zmq
from helpers import wait_until

from agent_side.wire import encode_act, encode_ep, encode_met, encode_tok
from monitor.alerts.prom import render
from monitor.service.ingest import Monitor
from monitor.service.runstate import EARLY_RUN_BYTES, EARLY_TAP_BYTES, EPISODE_BYTES, RUN_TAPS
from monitor.stats.analytics import AnalyticsConfig
from monitor.store import keys
from monitor.store.embedded import EmbeddedRedis
from monitor.store.records import Store, connect


def _pos(steps: range | np.ndarray, index: int = 0) -> np.ndarray:
    s = np.asarray(list(steps), dtype=np.int64)
    return np.stack([s, np.full_like(s, index)], axis=1)


class _Redis:
    """A Redis of the test's own (the suite's is shared), killed and started again on the same
    socket and files. ``appendfsync always``: what it acknowledged survives a SIGKILL."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.server = EmbeddedRedis(folder, persist=True, write_url=False)
        self.url = self.server.start()
        connect(self.url).config_set("appendfsync", "always")

    def kill(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()
        self.server.stop()

    def start(self) -> None:
        assert self.server.start() == self.url
        connect(self.url).config_set("appendfsync", "always")

    def close(self) -> None:
        self.server.stop()


class _Loop:
    """A real Monitor on a loopback socket, its loop in a thread, and a PUSH socket into it."""

    def __init__(self, store: Store, **kw: object) -> None:
        self.monitor = Monitor(store, endpoint="tcp://127.0.0.1:0", flush_ms=50, steering=False, **kw)
        self.thread = threading.Thread(target=self.monitor.run, daemon=True)
        self.thread.start()
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.monitor.endpoint)
        self.sent = 0

    def send(self, parts: list) -> None:
        self.push.send_multipart(parts)
        self.sent += 1

    def received(self) -> None:
        wait_until(lambda: self.monitor.frames >= self.sent, what=f"all {self.sent} frames received")

    def close(self) -> None:
        self.monitor.stop()
        self.thread.join(timeout=30)
        self.push.close()
        self.monitor.close()


def _stream(loop: _Loop, run: str, steps: range, seq: list[int]) -> None:
    """One episode end and one token forward a step, as an agent's frames."""
    for s in steps:
        loop.send(encode_ep(run, "p", seq[0], 0, [[s, 0, float(s), 10, 1, 0]]))
        loop.send(encode_tok(run, "p", seq[0] + 1, 0, s, [[f"t{s}", "x"]]))
        seq[0] += 2
    loop.received()


def _stored(store: Store, run: str) -> tuple[set[int], set[int]]:
    return {int(e["step"]) for e in store.episodes(run)}, set(store.token_steps(run))


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "outbox_bytes", [64 << 20, 160 * EPISODE_BYTES]
)  # the second holds the first 100 steps, not the 200 of the outage
def test_redis_killed_mid_stream_every_episode_and_token_is_stored_or_counted(tmp_path: Path, outbox_bytes: int) -> None:
    """Before: the outbox was emptied before the write that failed, so what came during the
    outage vanished (stored + counted < sent). Now: stored + lost == sent, exactly; with a small
    outbox the excess is dropped and counted by kind in status --json and /metrics."""
    rd = _Redis(tmp_path / "redis")
    store = Store(connect(rd.url))
    loop = _Loop(store, outbox_bytes=outbox_bytes)
    run, seq = "outage", [0]
    try:
        _stream(loop, run, range(0, 100), seq)
        wait_until(lambda: store.r.xlen(keys.episodes(run)) == 100, what="the first 100 episodes in Redis")
        rd.kill()
        failed = loop.monitor.write_failures
        _stream(loop, run, range(100, 300), seq)  # every write of these fails: Redis is gone
        wait_until(lambda: loop.monitor.write_failures >= failed + 3, what="flushes that failed with these pending")
        rd.start()
        _stream(loop, run, range(300, 350), seq)
        wait_until(lambda: loop.monitor.outbox.pending_bytes == 0, what="the outbox written out")
        st = loop.monitor.runs[run]
        wait_until(lambda: not st.dirty, what="the run written")
    finally:
        loop.close()
    try:
        store = Store(connect(rd.url))
        eps, toks = _stored(store, run)
        lost = st.lost
        assert eps <= set(range(350)) and toks <= set(range(350))
        assert len(eps) + lost["episodes"] == 350
        assert len(toks) + lost["tokens"] == 350
        if outbox_bytes > 1 << 20:
            assert lost["episodes"] == lost["tokens"] == 0 and len(eps) == len(toks) == 350
        else:  # the outbox held what it could of the 200 sent while Redis was away; the rest is counted
            assert lost["episodes"] > 0 and lost["tokens"] > 0
            status = store.status()
            (entry,) = status["runs"]
            assert entry["lost"] == {"episodes": lost["episodes"], "tokens": lost["tokens"]}
            assert status["monitor"]["lost"]["episodes"] == lost["episodes"]
            assert status["monitor"]["lost"]["tokens"] == lost["tokens"]
            text = render(loop.monitor)
            assert f'interlatent_outbox_dropped_total{{kind="episodes"}} {float(lost["episodes"])}' in text
            assert f'interlatent_run_lost_total{{kind="tokens",run="{run}"}} {float(lost["tokens"])}' in text
        assert store.r.hget(keys.run(run), "episodes") == b"350"  # the run's counters never lost a frame
    finally:
        rd.close()


def test_a_write_that_fails_keeps_the_outbox_for_the_next_flush(store: Store) -> None:
    """The unit under the fault test: a write that fails (here a run hash of the wrong type)
    leaves every pending record in place; once the key is fixed, the next flush writes them all."""
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        assert mon.handle(encode_ep("w", "p", 0, 0, [[1, 0, 1.0, 1, 1, 0], [2, 0, 2.0, 1, 1, 0]]))
        store.r.set(keys.run("w"), "not a hash")  # WRONGTYPE for the run's HSET: the write fails
        mon.flush()
        st = mon.runs["w"]
        assert len(st.new_episodes) == 2 and st.dirty and mon.outbox.pending_bytes == 2 * EPISODE_BYTES
        assert mon.write_failures == 1
        store.r.delete(keys.run("w"))
        mon.flush()
        assert not st.new_episodes and mon.outbox.pending_bytes == 0
        # Redis runs the rest of a MULTI past a command's error: at least once, here twice
        assert sorted(e["step"] for e in store.episodes("w")) == [1.0, 1.0, 2.0, 2.0]
    finally:
        mon.close()


# -- per-run budgets ------------------------------------------------------------------------------
def test_a_tap_too_wide_for_analytics_is_not_buffered_before_metrics(store: Store) -> None:
    """Before: rows of a tap past max_channels piled up in the pre-metrics buffer (its row cap
    ignored their width) and were never used. Now nothing of them is held."""
    cfg = AnalyticsConfig(max_channels=64)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, analytics=cfg)
    try:
        wide = np.ones((32, 65), dtype=np.float32)
        for i in range(50):
            assert mon.handle(encode_act("wide", "p", i, 0, "w:out", wide, _pos(range(i * 32, i * 32 + 32))))
        st = mon.runs["wide"]
        assert st.early == {} and st.early_bytes == 0
        assert st.taps["w:out"].rows == 1600  # its moments and recent rows are kept as for any tap
    finally:
        mon.close()


def test_the_pre_metrics_buffer_is_bounded_in_bytes_and_what_it_drops_is_counted(store: Store) -> None:
    """Before: ``max(window, ...)`` rows whatever their width (a 16,384-wide tap held 64 MiB+ a
    tap) and a re-sum of the buffer on every frame. Now EARLY_TAP_BYTES a tap, EARLY_RUN_BYTES a
    run, the oldest let go first, each row counted once: held + dropped == sent."""
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    width = 8192  # 32 KiB a float32 row: 16 MiB is 512 rows a tap
    rows = np.ones((64, width), dtype=np.float32)
    try:
        seq = 0
        for tap in range(6):  # 6 taps x 1024 rows x 32 KiB = 192 MiB offered before any metric
            for f in range(16):
                assert mon.handle(encode_act("flood", "p", seq, 0, f"t{tap}:out", rows, _pos(range(f * 64, f * 64 + 64))))
                seq += 1
        st = mon.runs["flood"]
        held = {t: e.rows for t, e in st.early.items()}
        assert all(e.nbytes <= EARLY_TAP_BYTES for e in st.early.values())
        assert st.early_bytes == sum(e.nbytes for e in st.early.values()) <= EARLY_RUN_BYTES
        assert sum(held.values()) + st.early_dropped == 6 * 16 * 64
        assert st.early_dropped > 0
        mon.flush()
        (entry,) = store.status()["runs"]
        assert entry["early_dropped"] == st.early_dropped
        # the first metric frame pairs what was held and empties the buffer
        names = ["m"]
        assert mon.handle(encode_met("flood", "p", seq, 0, names, np.zeros((1024, 1)), _pos(range(1024))))
        assert st.early == {} and st.early_bytes == 0
    finally:
        mon.close()


def test_a_run_past_its_tap_budget_is_refused_new_taps_and_others_go_on(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, analytics=None)
    try:
        one = np.ones((1, 2), dtype=np.float32)
        for i in range(RUN_TAPS + 5):
            mon.handle(encode_act("taps", "p", i, 0, f"t{i}:out", one, _pos([0])))
        assert len(mon.runs["taps"].taps) == RUN_TAPS and mon.rejected == {"run_budget": 5}
        assert mon.handle(encode_act("taps", "p", RUN_TAPS + 5, 0, "t0:out", one, _pos([1])))  # known taps go on
        assert mon.handle(encode_act("other", "q", 0, 0, "t:out", one, _pos([0])))
    finally:
        mon.close()


# -- no state for a rejected frame ------------------------------------------------------------------
def test_a_stale_frame_of_a_returning_run_leaves_no_state(store: Store) -> None:
    """Before: a frame refused as stale_seq had already registered its run (loaded, or made anew
    with last seen 0, "57 years ago") and the next flush wrote it."""
    first = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    d = np.ones((2, 3), dtype=np.float32)
    try:
        assert first.handle(encode_act("back", "p", 10, 0, "t", d, _pos(range(2))))
        first.flush()
    finally:
        first.close()
    seen = store.r.zscore(keys.RUNS, "back")
    second = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        assert not second.handle(encode_act("back", "p", 4, 0, "t", d, _pos(range(2, 4))))  # older than seq 10
        assert second.rejected == {"stale_seq": 1} and "back" not in second.runs
        second.flush()
        assert store.r.zscore(keys.RUNS, "back") == seen
        assert store.r.hget(keys.run("back"), "frames") == b"1"
    finally:
        second.close()


def test_redis_away_when_a_run_first_shows_up_rejects_its_frame_and_registers_nothing(tmp_path: Path) -> None:
    rd = _Redis(tmp_path / "redis")
    store = Store(redis.Redis.from_url(rd.url, socket_connect_timeout=1, socket_timeout=2))
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        rd.kill()
        assert not mon.handle(encode_act("new", "p", 0, 0, "t", np.ones((1, 1), np.float32), _pos([0])))
        assert mon.rejected == {"store_unavailable": 1} and mon.runs == {}
        mon.flush()  # Redis away: the flush fails quietly, the monitor goes on
    finally:
        mon.close()
        rd.close()
