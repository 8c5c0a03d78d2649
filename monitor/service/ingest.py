"""The monitor's receive loop: bind, validate every frame, keep per-run state, write it to Redis.

Many agents connect to one bound PULL socket. A bad frame is counted under its reason, logged
(rate-limited) and skipped; the loop never stops for one. Run state is written to Redis every
``flush_ms`` and restored from Redis the first time a run shows up, so a restarted monitor
continues counting (and counts the frames it lost as sequence gaps).

Live steering (:mod:`monitor.service.steering`): a PUB socket at ``control_endpoint`` (default: the data
endpoint's port + 1) publishes each opted-in run's wanted interventions on every flush that sees
them change and every second; agents' ``ctl`` frames come back on the data socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import zmq

from agent_side.wire import (
    DEFAULT_ENDPOINT,
    DEFAULT_LIMITS,
    ActFrame,
    CtlFrame,
    Limits,
    MetFrame,
    WireError,
    control_endpoint,
    decode,
)
from monitor.alerts.engine import AlertEngine
from monitor.alerts.rules import RulesFile
from monitor.alerts.sinks import AlertSink
from monitor.service.autotrain import AutoTrain, AutoTrainer
from monitor.service.encoding import Encoders
from monitor.service.filing import JobFiler
from monitor.service.persist import load_run, write_run
from monitor.service.runstate import RECENT_ROWS, RejectFrame, RunState
from monitor.service.steering import ControlChannel
from monitor.stats.analytics import DEFAULT_ANALYTICS, AnalyticsConfig
from monitor.store import keys
from monitor.store.recording import Recorder
from monitor.store.records import ConfigError, Store, service_ident

__all__ = ["Monitor", "MonitorResult"]

CTL_BACKLOG = 4096  # control events kept while Redis is away
RECORD_IDLE_S = 5.0  # a recording whose run sends nothing for this long is closed with what it has
ENCODER_RETRY_S = 2.0  # how often a transcoder that could not be loaded is looked at again

log = logging.getLogger(__name__)


def _active_alerts(store: Store) -> list[dict[str, Any]]:
    """The pending and firing alerts a previous monitor left in Redis (none if it cannot be read)."""
    try:
        return [json.loads(v) for v in store.r.hvals(keys.ALERTS_ACTIVE)]
    except (redis.RedisError, ValueError) as e:
        log.warning("cannot read the active alerts (%s): a restarted monitor starts them afresh", e)
        return []


@dataclass
class MonitorResult:
    frames: int
    rows: int
    rejected: dict[str, int]
    elapsed_s: float


class Monitor:
    """Receive frames on ``endpoint`` and keep every run's live state in Redis.

    ``run()`` returns after ``max_frames`` accepted-or-rejected frames, after ``idle_exit_s``
    without any, or when ``stop()`` is called: the stop-when-done modes tests use.
    """

    def __init__(
        self,
        store: Store,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        flush_ms: float = 200.0,
        health_ttl_s: float = 5.0,
        rcvhwm: int = 10_000,
        limits: Limits = DEFAULT_LIMITS,
        analytics: AnalyticsConfig | None = DEFAULT_ANALYTICS,
        analytics_every_s: float = 1.0,
        rules: RulesFile | None = None,
        data_dir: Path | None = None,
        auto_train: AutoTrain | None = None,
        file_jobs: bool = True,
        control_endpoint: str | None = None,
        evict_idle_s: float | None = 900.0,
        alert_idle_s: float | None = 60.0,
    ) -> None:
        self.store = store
        self._alert_idle_s = alert_idle_s  # a run quiet this long has its pending and firing alerts resolved
        self._alerts_ended: set[str] = set()
        self._evict_idle_s = evict_idle_s  # a run quiet this long leaves memory (Redis has nearly all of it)
        self._kept_profiles: dict[str, dict[str, Any]] = {}  # failure profiles of evicted runs
        self.endpoint = endpoint
        self.limits = limits
        self.analytics = analytics
        self._analytics_every_s = analytics_every_s
        self._next_analytics = 0.0
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.recorders: dict[str, Recorder] = {}
        self._ctl_events: deque[CtlFrame] = deque()  # control-plane events, answered at the next flush, beside the data path
        self.ctl_dropped = 0
        self._record_req: dict[str, dict[str, Any]] = {}
        self.encoders = Encoders()
        self.auto = AutoTrainer(auto_train, store) if auto_train is not None else None
        self.filer = JobFiler(store.r) if file_jobs else None
        self._encoders_version = -1
        self._encoders_retry_at = 0.0
        self.alerts = AlertEngine(rules, restore=_active_alerts(store)) if rules is not None else None
        self.sink = AlertSink(store.r, rules.webhooks) if rules is not None else None
        self._flush_s = flush_ms / 1000.0
        self._health_ttl_s = health_ttl_s
        self.ident = service_ident()
        self.runs: dict[str, RunState] = {}
        self.rejected: Counter[str] = Counter()
        self._rejected_unsaved: Counter[str] = Counter()
        self._reject_logged: dict[str, float] = {}
        self.frames = 0
        self.rows = 0
        self.lag_s = 0.0
        self.started = time.time()
        self._stop = threading.Event()
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, limits.frame_bytes)
        self._sock.bind(endpoint)
        if endpoint.endswith(":0") or endpoint.endswith(":*"):
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("monitor listening on %s", self.endpoint)
        self.control = self._control_channel(control_endpoint)

    def _control_channel(self, endpoint: str | None) -> ControlChannel:
        """The steering channel; a derived endpoint that cannot be bound leaves steering off, with a warning."""
        sink = self.sink or AlertSink(self.store.r)
        if endpoint is not None:
            try:
                return ControlChannel(self.store, self._ctx, endpoint, sink=sink)
            except zmq.ZMQError as e:
                self._sock.close(linger=0)
                self._ctx.term()
                raise ConfigError(f"cannot bind the control endpoint {endpoint}: {e}") from e
        try:
            return ControlChannel(self.store, self._ctx, control_endpoint(self.endpoint), sink=sink)
        except (ValueError, zmq.ZMQError) as e:
            log.warning("live steering is off: no control endpoint (%s); pass control_endpoint=", e)
            return ControlChannel(self.store, self._ctx, None, sink=sink)

    # -- one message ----------------------------------------------------------------------------
    def handle(self, parts: list[Any], now: float | None = None) -> bool:
        """Validate and apply one multipart message; False if it was rejected."""
        now = time.time() if now is None else now
        self.frames += 1
        try:
            frame = decode(parts, self.limits)
            st = self.runs.get(frame.run)
            if st is None:
                # a restart, or an idle run back: its state and analytics continue from what Redis kept
                st = load_run(self.store, frame.run, recent_rows=RECENT_ROWS, analytics_cfg=self.analytics)
                if st is None:
                    st = RunState(run=frame.run, analytics_cfg=self.analytics)
                else:
                    st.failure_profiles = self._kept_profiles.pop(frame.run, {})
                self.runs[frame.run] = st
                self.control.known(frame.run)
            if isinstance(frame, CtlFrame):  # the control plane: answered beside the data path
                st.sequence(frame)
                st.last_seen, st.dirty = now, True
                if len(self._ctl_events) >= CTL_BACKLOG:  # Redis has been away for long: the oldest go, counted
                    self.ctl_dropped += 1
                    self._warn_store(
                        f"control backlog full ({CTL_BACKLOG} events): dropped the oldest ({self.ctl_dropped} so far)"
                    )
                    self._ctl_events.popleft()
                self._ctl_events.append(frame)
                return True
            st.update(frame, now)
            self._alerts_ended.discard(frame.run)
            if isinstance(frame, MetFrame) and st.analytics:
                self._paired(st)
        except (WireError, RejectFrame) as e:
            self._reject(e.reason, str(e))
            return False
        except redis.RedisError as e:
            self._reject("store_unavailable", f"cannot load run state: {e}")
            return False
        except Exception as e:  # a bug of ours must cost one frame, never the monitor
            self._reject("internal_error", f"{type(e).__name__}: {e}")
            # the first one in full: a bug report needs the traceback, a flood of them does not
            log.log(
                logging.WARNING if self.rejected["internal_error"] == 1 else logging.DEBUG,
                "internal error on a frame",
                exc_info=True,
            )
            return False
        self.rows += frame.rows
        self.lag_s = max(0.0, now - frame.t)
        rec = self.recorders.get(frame.run)
        if isinstance(frame, MetFrame) and rec is not None:
            rec.add_metrics(frame.names, frame.data, frame.pos)
        if isinstance(frame, ActFrame):
            rows = [(frame.tap, frame.data)]
            try:
                for latent_tap, z in self.encoders.encode(frame.run, frame.tap, frame.data):
                    st.add_rows(latent_tap, z, frame.pos, frame.lead)
                    rows.append((latent_tap, z))
            except Exception:  # a transcoder must never stop the monitor
                log.exception("encoding failed for %s/%s", frame.run, frame.tap)
            for tap, data in rows:
                if rec is not None:
                    rec.add_tap(tap, data, frame.pos)
                self._alert(st, tap, data, frame.pos)
        return True

    def _on_analytics(self, run: str, tap: str, an: Any) -> None:
        if self.filer is not None:
            self.filer.on_analytics(run, tap, an.paired, an.rolling.get())

    def _alert(self, st: RunState, tap: str, data: Any, pos: Any) -> None:
        if self.alerts is not None:
            self._emit(st, self.alerts.on_rows, st.run, tap, data, pos, st.analytics.get(tap))

    def _paired(self, st: RunState) -> None:
        """Rows were paired with their metrics: corr_flip rules look at the new correlations."""
        if self.alerts is not None:
            for tap, an in st.analytics.items():
                self._emit(st, self.alerts.on_paired, st.run, tap, an, an.rolling.newest)

    def _emit(self, st: RunState, evaluate: Any, *args: Any) -> None:
        """Store and send the events ``evaluate(*args)`` gives; a rule's failure costs only itself."""
        try:
            for event in evaluate(*args):
                tap = event["tap"]
                if event["state"] == "firing":
                    known = self.store.explanation(st.run, tap, event["latent"])
                    if known and known.get("label"):
                        event["explanation"] = {"label": known["label"], "text": known["text"], "score": known.get("score")}
                        event["text"] += f"; explained as: {known['label']}"
                    elif self.filer is not None:
                        self.filer.on_alert(st.run, tap, event["latent"])
                self.sink.emit(event)
        except Exception:  # a rule must never stop the monitor
            log.exception("alert evaluation failed for run %s", st.run)

    def _end_quiet_runs(self) -> None:
        """Resolve the pending and firing alerts of runs that sent nothing for ``alert_idle_s``."""
        if self.alerts is None or self._alert_idle_s is None:
            return
        now = time.time()
        for run, st in self.runs.items():
            quiet = now - st.last_seen
            if run not in self._alerts_ended and st.last_seen and quiet > self._alert_idle_s:
                self._alerts_ended.add(run)
                reason = f"the run sent nothing for {quiet:.0f} s"
                self._emit(st, self.alerts.end_run, st.run, max(0, st.steps - 1), reason, st.analytics)

    def _reject(self, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        self._rejected_unsaved[reason] += 1
        now = time.monotonic()
        if now - self._reject_logged.get(reason, -1e9) >= 1.0:
            self._reject_logged[reason] = now
            log.warning("rejected frame (%s, %d so far): %s", reason, self.rejected[reason], message[:200])

    # -- writing --------------------------------------------------------------------------------
    def flush(self, *, final: bool = False) -> None:
        """Write dirty runs, reject counts and the health key to Redis.

        A run that cannot be written stays in memory (still dirty) and the next flush retries it.
        """
        now = time.monotonic()
        with_analytics = final or now >= self._next_analytics
        if with_analytics:
            self._next_analytics = now + self._analytics_every_s
        for st in self.runs.values():
            if st.dirty or (with_analytics and st.analytics_dirty):
                try:
                    write_run(self.store, st, analytics=with_analytics, on_analytics=self._on_analytics)
                except redis.RedisError as e:  # one run's trouble must not stop the others
                    self._warn_store(f"cannot write run {st.run!r}, keeping it in memory: {e}")
        try:
            version = self.store.transcoders_version()
            retry = self.encoders.failing and now >= self._encoders_retry_at  # a broken artifact may have been fixed
            if version != self._encoders_version or retry:  # a transcoder was registered: load it between frames
                self._encoders_version = version
                self._encoders_retry_at = now + ENCODER_RETRY_S
                self.encoders.refresh(self.store.transcoders())
            if self.auto is not None:
                self.auto.tick({run: set(st.taps) for run, st in self.runs.items()})
            self._recordings(final)
            self._end_quiet_runs()
            self._evict_idle()
            while self._ctl_events:  # one at a time: an event whose write failed stays for the next flush
                self.control.on_event(self._ctl_events[0])
                self._ctl_events.popleft()
            self.control.publish()
            self.store.add_rejected(dict(self._rejected_unsaved))
            self._rejected_unsaved.clear()
            self.store.heartbeat("monitor", self.ident, self.health(), self._health_ttl_s)
        except redis.RedisError as e:
            self._warn_store(f"cannot write to Redis, keeping state in memory: {e}")

    def _evict_idle(self) -> None:
        """Let go of runs quiet for ``evict_idle_s`` whose state is written to Redis, so a monitor that
        serves many runs over weeks does not grow by their windows and buffers; a run that comes
        back is restored from Redis (counters, moments, recent rows, analytics) like after a restart."""
        if self._evict_idle_s is None:
            return
        now = time.time()
        for run, st in list(self.runs.items()):
            if now - st.last_seen > self._evict_idle_s and not st.dirty and not st.analytics_dirty and run not in self.recorders:
                del self.runs[run]
                # kept: what Redis does not hold. The failure profiles (the rules suggested from
                # every failure so far); the alert engine's and job filer's small per-tap state
                # stays with them, so a firing alert still resolves and nothing is filed twice
                if st.failure_profiles:
                    self._kept_profiles[run] = st.failure_profiles
                log.info("run %r idle for %.0f s: its state is in Redis, let go from memory", run, now - st.last_seen)

    def _recordings(self, final: bool) -> None:
        """Start recordings that were asked for, report progress, close the finished ones."""
        for run, req in self.store.record_requests().items():
            if req.get("state") == "requested" and run not in self.recorders:
                if self.data_dir is None:
                    self.store.set_record(run, {**req, "state": "failed", "error": "this monitor has no --data-dir"})
                    continue
                folder = self.data_dir / "recordings" / f"{run.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
                self.recorders[run] = Recorder(folder, run, max_steps=int(req["steps"]))
                self._record_req[run] = req
                self.store.set_record(run, {**req, "state": "recording", "path": str(folder), "recorded": 0})
                log.info("recording run %r for %d steps into %s", run, int(req["steps"]), folder)
        for run, rec in list(self.recorders.items()):
            st = self.runs.get(run)
            quiet = st is not None and rec.steps > 0 and time.time() - st.last_seen > RECORD_IDLE_S  # the run ended early
            metrics_expected = st is not None and bool(st.metrics.names)  # a run that logs metrics: wait for the last step's
            if rec.finished(time.monotonic(), metrics_expected=metrics_expected, grace_s=RECORD_IDLE_S) or final or quiet:
                path = rec.close()
                del self.recorders[run]
                req = self._record_req.pop(run, {})
                self.store.set_record(
                    run, {**req, "steps": rec.max_steps, "state": "done", "path": str(path), "recorded": rec.steps}
                )
                log.info("recording of run %r done: %d steps in %s", run, rec.steps, path)
            else:
                req = self._record_req.get(run, {})
                self.store.set_record(
                    run, {**req, "steps": rec.max_steps, "state": "recording", "path": str(rec.dir), "recorded": rec.steps}
                )

    def _warn_store(self, message: str) -> None:
        now = time.monotonic()
        if now - self._reject_logged.get("_redis", -1e9) >= 5.0:
            self._reject_logged["_redis"] = now
            log.warning(message)

    def health(self) -> dict[str, Any]:
        return {
            "kind": "monitor",
            "id": self.ident,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "endpoint": self.endpoint,
            "control_endpoint": self.control.endpoint,
            "started": self.started,
            "frames": self.frames,
            "rows": self.rows,
            "rejected": sum(self.rejected.values()),
            "lag_s": round(self.lag_s, 4),
            "runs": len(self.runs),
            "control_events_dropped": self.ctl_dropped,
            "transcoders_broken": dict(self.encoders.broken),
            "time": time.time(),
        }

    # -- the loop -------------------------------------------------------------------------------
    def run(self, *, max_frames: int | None = None, idle_exit_s: float | None = None, batch: int = 256) -> MonitorResult:
        t0 = time.monotonic()
        last_msg = t0
        next_flush = t0
        f0, r0 = self.frames, self.rows
        poller_ms = int(min(self._flush_s, 0.1) * 1000) or 1
        while not self._stop.is_set():
            if self._sock.poll(poller_ms):
                for _ in range(batch):
                    try:
                        parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle([p.buffer for p in parts])
                    if max_frames is not None and self.frames - f0 >= max_frames:
                        break
                last_msg = time.monotonic()
            now = time.monotonic()
            if now >= next_flush:
                self.flush()
                next_flush = now + self._flush_s
            if max_frames is not None and self.frames - f0 >= max_frames:
                break
            if idle_exit_s is not None and now - last_msg >= idle_exit_s:
                break
        self.flush(final=True)
        return MonitorResult(self.frames - f0, self.rows - r0, dict(self.rejected), time.monotonic() - t0)

    def stop(self) -> None:
        """Ask ``run()`` to return (thread-safe)."""
        self._stop.set()

    def close(self) -> None:
        if self.auto is not None:
            self.auto.close()
        if self.sink is not None:
            self.sink.close()
        try:
            self.store.clear_heartbeat("monitor", self.ident)
        except Exception:  # Redis may already be gone at shutdown
            log.debug("could not clear heartbeat", exc_info=True)
        self.control.close()
        self._sock.close(linger=0)
        self._ctx.term()
