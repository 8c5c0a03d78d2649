"""The monitor's receive loop: bind, validate every frame, keep per-run state, write it to Redis.

Many agents connect to one bound PULL socket. A bad frame is counted under its reason, logged
(rate-limited) and skipped; the loop never stops for one. Run state is written to Redis every
``flush_ms`` and restored from Redis the first time a run shows up, so a restarted monitor
continues counting (and counts the frames it lost as sequence gaps).

Live steering (:mod:`monitor.service.steering`): a CURVE XPUB socket at ``control_endpoint`` (default:
the data endpoint's port + 1) publishes each opted-in run's wanted interventions on every flush that
sees them change and every second; agents subscribe and report over that authenticated connection.
A control endpoint that cannot be bound stops the monitor (a :class:`ConfigError`), unless steering
is off (``steering=False``): a squatter there could otherwise be mistaken for the monitor.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
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
from monitor.service.curve import monitor_keypair
from monitor.service.encoding import Encoders
from monitor.service.filing import JobFiler
from monitor.service.leases import LEASE_S, LeaseLost, Leases, lease_problem
from monitor.service.persist import load_run, write_run
from monitor.service.runstate import OUTBOX_BYTES, RECENT_ROWS, Outbox, RejectFrame, RunState
from monitor.service.steering import ControlChannel
from monitor.stats.analytics import DEFAULT_ANALYTICS, AnalyticsConfig
from monitor.store import keys
from monitor.store.embedded import port_free
from monitor.store.recording import Recorder
from monitor.store.records import ConfigError, Store, service_ident

__all__ = ["Monitor", "MonitorResult"]

RECORD_IDLE_S = 5.0  # a recording whose run sends nothing for this long is closed with what it has
RETAIN_SWEEP_S = 60.0  # how often runs past their retention are looked for
RETAIN_SWEEP_RUNS = 100  # runs deleted per sweep at most (the rest go at the next one)
HANDOVER_QUIET_S = 1.0  # a run quiet this long, that another monitor asked for, is handed over
HANDOVER_CHECK_S = 0.5  # how often quiet runs are checked for being wanted elsewhere
ENCODER_RETRY_S = 2.0  # how often a transcoder that could not be loaded is looked at again

log = logging.getLogger(__name__)


def _next_port_free(endpoint: str) -> bool:
    """Whether the port after ``tcp://host:port`` can be bound now."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return port.isdigit() and port_free(int(port) + 1, host.strip("[]") or "127.0.0.1")


def _bad_port(endpoint: str) -> str | None:
    """The port of a ``tcp://`` endpoint when it is a number past 65535 (ZeroMQ would take it modulo 65536)."""
    if not endpoint.startswith("tcp://"):
        return None
    port = endpoint.rpartition(":")[2]
    return port if port.isdigit() and int(port) > 65535 else None


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
        steering: bool = True,
        evict_idle_s: float | None = 900.0,
        alert_idle_s: float | None = 60.0,
        outbox_bytes: int = OUTBOX_BYTES,
        retain_days: float | None = None,
        allow_keys: Path | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        why = lease_problem(lease_s, flush_ms / 1000.0)
        if why is not None:
            raise ConfigError(f"lease_s {why}")
        bad_port = _bad_port(endpoint)
        if bad_port is not None:
            raise ConfigError(f"cannot bind the data endpoint {endpoint}: port {bad_port} is not in 0-65535")
        self.store = store
        self._retain_s = retain_days * 86400.0 if retain_days else None  # an ended run's keys go this long after its last frame
        self._next_sweep = 0.0
        self.runs_expired = 0
        self.outbox = Outbox(limit_bytes=outbox_bytes)  # every run's records not yet in Redis, bounded
        self._lost_saved: Counter[str] = Counter()  # outbox drops already added to keys.LOST
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
        self._record_req: dict[str, dict[str, Any]] = {}
        self._record_asked: dict[str, dict[str, Any]] = {}  # requests for runs not here yet, as of the last flush
        self.encoders = Encoders()
        self.auto = AutoTrainer(auto_train, store) if auto_train is not None else None
        self.filer = JobFiler(store.r) if file_jobs else None
        self._encoders_version = -1
        self._encoders_retry_at = 0.0
        try:  # what is registered already encodes the first frame, not only frames after the first flush
            self._encoders_version = store.transcoders_version()
            self.encoders.refresh(store.transcoders())
        except redis.RedisError as e:
            log.warning("cannot read the transcoder registry yet (%s): it is read at the first flush", e)
            self._encoders_version = -1
        self.alerts = AlertEngine(rules, restore=_active_alerts(store)) if rules is not None else None
        self.sink = AlertSink(store.r, rules.webhooks) if rules is not None else None
        self._flush_s = flush_ms / 1000.0
        self._health_ttl_s = health_ttl_s
        self.ident = f"{service_ident()}-{uuid.uuid4().hex[:4]}"  # unique even for monitors sharing a process
        self.runs: dict[str, RunState] = {}
        self.rejected: Counter[str] = Counter()
        self._rejected_unsaved: Counter[str] = Counter()
        self._reject_logged: dict[str, float] = {}
        self.frames = 0
        self.rows = 0
        self.write_failures = 0  # run writes Redis refused (each retried whole by the next flush)
        self.lag_s = 0.0
        self.started = time.time()
        self._stop = threading.Event()
        self._ctx = zmq.Context(io_threads=1)
        try:
            self.keypair = monitor_keypair(self.data_dir)
        except OSError as e:
            self._ctx.term()
            raise ConfigError(f"cannot read or make the monitor's CURVE keypair in {self.data_dir}: {e}") from e
        self._auth = self._allow(allow_keys) if allow_keys is not None else None
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, limits.frame_bytes)
        if self._auth is not None:  # remote agents: CURVE, and only the keys allowed
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = self.keypair
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close_sockets()
            raise ConfigError(f"cannot bind the data endpoint {endpoint}: {e}") from e
        if endpoint.endswith(":0") or endpoint.endswith(":*"):
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            for _ in range(50):  # an ephemeral port whose port + 1, the steering channel's, is free too
                if not steering or control_endpoint is not None or _next_port_free(self.endpoint):
                    break
                self._sock.unbind(self.endpoint)
                self._sock.bind(endpoint)
                self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("monitor listening on %s", self.endpoint)
        self.leases = Leases(store, self.ident, f"{socket.gethostname()}|{self.endpoint}", ttl_s=lease_s)
        self._next_handover = 0.0
        self.control = self._control_channel(control_endpoint if steering else None, steering)
        self.control.serves = self.leases.held.__contains__

    def _control_channel(self, endpoint: str | None, steering: bool) -> ControlChannel:
        """The steering channel. One that cannot be bound stops the monitor: agents would find
        whoever holds the port (and refuse it, having the monitor's key, but never be steered)."""
        sink = self.sink or AlertSink(self.store.r)
        if not steering:
            log.info("live steering is off")
            return ControlChannel(self.store, self._ctx, None, sink=sink)
        try:
            return ControlChannel(
                self.store,
                self._ctx,
                endpoint or control_endpoint(self.endpoint),
                sink=sink,
                keypair=self.keypair,
                lost=self.outbox.dropped,
            )
        except (ValueError, zmq.ZMQError) as e:
            self.close_sockets()
            where = endpoint or f"the data endpoint's port + 1 of {self.endpoint}"
            raise ConfigError(
                f"cannot bind the steering control endpoint ({where}): {e}; pass --control-endpoint, or --no-steering"
            ) from e

    def _allow(self, folder: Path) -> Any:
        """A ZAP handler on this monitor's context: CURVE clients (data and control) must hold a
        key whose public certificate is in ``folder`` (``interlatent keys agent NAME`` makes one)."""
        from zmq.auth.thread import ThreadAuthenticator

        folder = Path(folder)
        if not folder.is_dir() or not any(folder.glob("*.key")):
            self._ctx.term()
            raise ConfigError(
                f"--allow-keys {folder}: no agent public keys (*.key) there; `interlatent keys agent NAME` makes one"
            )
        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("monitor.service.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(folder))
        log.info("data and control channels: CURVE, agents allowed by the keys in %s", folder)
        return auth

    def close_sockets(self) -> None:
        """Close the sockets and the context (what close() does after the rest)."""
        if getattr(self, "control", None) is not None:
            self.control.close()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # -- one message ----------------------------------------------------------------------------
    def handle(self, parts: list[Any], now: float | None = None) -> bool:
        """Validate and apply one multipart message; False if it was rejected."""
        now = time.time() if now is None else now
        self.frames += 1
        frame_run: str | None = None
        try:
            frame = decode(parts, self.limits)
            frame_run = frame.run
            st = self.runs.get(frame.run)
            new = st is None
            if st is None:
                if not self.leases.acquire(frame.run):  # another monitor serves this run now
                    raise RejectFrame("leased_elsewhere", f"run {frame.run!r} is served by another monitor")
                # a restart, or an idle run back: its state and analytics continue from what Redis kept;
                # registered only once the frame is accepted, so a rejected frame leaves no state behind
                st = load_run(self.store, frame.run, recent_rows=RECENT_ROWS, analytics_cfg=self.analytics)
                if st is None:
                    st = RunState(run=frame.run, analytics_cfg=self.analytics)
                else:
                    st.failure_profiles = self._kept_profiles.get(frame.run, {})
                st.outbox = self.outbox
            if isinstance(frame, CtlFrame):  # the agent's greeting: its sequence counts, its claims do not
                st.sequence(frame)
                st.greetings += 1
                st.last_seen, st.dirty = now, True
                self.control.on_data_event(frame)
            else:
                st.update(frame, now)
            if new:
                self._kept_profiles.pop(frame.run, None)
                self.runs[frame.run] = st
                self.control.now_serving(frame.run)
                if frame.run in self._record_asked:  # a recording asked for before the run came here
                    try:
                        self._start_recording(frame.run, self._record_asked[frame.run])
                    except redis.RedisError as e:  # the recorder runs; its state is written at the next flush
                        self._warn_store(f"cannot mark the recording of {frame.run!r} started: {e}")
            if isinstance(frame, CtlFrame):
                return True
            self._alerts_ended.discard(frame.run)
            if isinstance(frame, MetFrame) and st.analytics:
                self._paired(st)
        except (WireError, RejectFrame) as e:
            self._unserve(frame_run)
            self._reject(e.reason, str(e))
            return False
        except redis.RedisError as e:
            self._unserve(frame_run)
            self._reject("store_unavailable", f"cannot load run state: {e}")
            return False
        except Exception as e:  # a bug of ours must cost one frame, never the monitor
            self._unserve(frame_run)
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

    def _unserve(self, run: str | None) -> None:
        """A new run's first frame was refused after its lease was taken: give the lease back."""
        if run is not None and run not in self.runs and run in self.leases.held:
            try:
                self.leases.release(run)
            except redis.RedisError:
                self.leases.held.pop(run, None)

    def _let_go(self, run: str, why: str, *, lost: bool) -> None:
        """Stop serving ``run``: from memory, and its lease (given back, or already lost)."""
        st = self.runs.pop(run, None)
        if st is not None and st.failure_profiles:
            self._kept_profiles[run] = st.failure_profiles
        if st is not None and st.pending_bytes:  # its unwritten records go; their frames are the next owner's gaps
            self.outbox.release(st.pending_bytes)
        if lost:
            self.leases.lost(run, why)
        else:
            self.leases.release(run, event=why)

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
        for st in list(self.runs.values()):
            if not st.dirty and not (with_analytics and st.analytics_dirty) and self.leases.due(st.run):
                try:  # nothing new to write, but the lease needs renewing
                    self.leases.renew(st.run)
                except LeaseLost as e:
                    self._let_go(st.run, str(e), lost=True)
                except redis.RedisError as e:
                    self._warn_store(f"cannot renew the lease of run {st.run!r}: {e}")
                continue
            if st.dirty or (with_analytics and st.analytics_dirty):
                try:
                    write_run(self.store, st, analytics=with_analytics, on_analytics=self._on_analytics, leases=self.leases)
                except LeaseLost as e:  # another monitor serves it now: what is in memory is not to be written
                    self._let_go(st.run, str(e), lost=True)
                except redis.RedisError as e:  # one run's trouble must not stop the others
                    self.write_failures += 1
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
            self._hand_over()
            self._evict_idle()
            self._expire_runs()
            self.control.poll()  # what agents said on the control channel, beside the data path
            self.control.publish()
            self.store.add_rejected(dict(self._rejected_unsaved))
            self._rejected_unsaved.clear()
            lost = self.outbox.dropped - self._lost_saved
            if lost:
                self.store.add_lost(dict(lost))
                self._lost_saved.update(lost)
            self.store.heartbeat("monitor", self.ident, self.health(), self._health_ttl_s)
        except redis.RedisError as e:
            self._warn_store(f"cannot write to Redis, keeping state in memory: {e}")

    def _hand_over(self) -> None:
        """Let go of quiet runs another monitor asked for (their agents moved there), once written."""
        now = time.monotonic()
        if now < self._next_handover:
            return
        self._next_handover = now + HANDOVER_CHECK_S
        t = time.time()
        quiet = [
            r for r, st in self.runs.items() if t - st.last_seen > HANDOVER_QUIET_S and not st.dirty and r not in self.recorders
        ]
        for run in self.leases.wanted(quiet):
            log.info("run %r is quiet here and wanted by another monitor: handing it over", run)
            self._let_go(run, "handed_over", lost=False)

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
                self.leases.release(run)
                # kept: what Redis does not hold. The failure profiles (the rules suggested from
                # every failure so far); the alert engine's and job filer's small per-tap state
                # stays with them, so a firing alert still resolves and nothing is filed twice
                if st.failure_profiles:
                    self._kept_profiles[run] = st.failure_profiles
                log.info("run %r idle for %.0f s: its state is in Redis, let go from memory", run, now - st.last_seen)

    def _expire_runs(self) -> None:
        """Delete the keys of runs whose last frame is older than ``retain_days`` (and that this
        monitor does not hold): Redis keeps ~100-200 KiB a run otherwise, forever."""
        now = time.monotonic()
        if self._retain_s is None or now < self._next_sweep:
            return
        self._next_sweep = now + RETAIN_SWEEP_S
        for run in self.store.ended_runs(time.time() - self._retain_s)[:RETAIN_SWEEP_RUNS]:
            if run not in self.runs:
                n = self.store.delete_run(run)
                self.runs_expired += 1
                log.info("run %r past its retention (%.3g days): deleted its %d keys", run, self._retain_s / 86400, n)

    def _recordings(self, final: bool) -> None:
        """Start recordings that were asked for, report progress, close the finished ones; fail,
        with a reason, one whose monitor is gone (no health key)."""
        requests = self.store.record_requests()
        asked: dict[str, dict[str, Any]] = {}
        orphans = [r for r, q in requests.items() if q.get("state") == "recording" and q.get("monitor") != self.ident]
        if orphans:
            alive = {h.get("id") for h in self.store.health() if h.get("kind") == "monitor"}
            for run in orphans:
                req = requests[run]
                if req.get("monitor") not in alive:
                    why = (
                        f"the monitor recording it ({req.get('monitor', 'unknown')}) stopped after {req.get('recorded', 0)} steps; "
                        f"what it wrote is in {req.get('path', '?')} (verified shards only); record again"
                    )
                    requests[run] = {**req, "state": "failed", "error": why}
                    self.store.set_record(run, requests[run])
                    log.warning("recording of run %r failed: %s", run, why)
        for run, req in requests.items():
            # taken by the monitor serving the run (with several, only that one records it); one for a
            # run not here yet is taken at the run's first frame here, so it starts from that frame
            if req.get("state") == "requested" and run not in self.recorders:
                if run in self.runs:
                    self._start_recording(run, req)
                else:
                    asked[run] = req
        self._record_asked = asked
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
                    run,
                    {
                        **req,
                        "steps": rec.max_steps,
                        "state": "recording",
                        "path": str(rec.dir),
                        "recorded": rec.steps,
                        "monitor": self.ident,
                    },
                )

    def _start_recording(self, run: str, req: dict[str, Any]) -> None:
        self._record_asked.pop(run, None)
        if self.data_dir is None:
            self.store.set_record(run, {**req, "state": "failed", "error": "this monitor has no --data-dir"})
            return
        folder = self.data_dir / "recordings" / f"{run.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.recorders[run] = Recorder(folder, run, max_steps=int(req["steps"]))
        self._record_req[run] = req
        self.store.set_record(run, {**req, "state": "recording", "path": str(folder), "recorded": 0, "monitor": self.ident})
        log.info("recording run %r for %d steps into %s", run, int(req["steps"]), folder)

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
            "write_failures": self.write_failures,
            "lag_s": round(self.lag_s, 4),
            "runs": len(self.runs),
            "leases": len(self.leases.held),
            "lease_events": dict(self.leases.counts),
            "control_key": self.control.public_key if self.control.endpoint else None,
            "control_events_dropped": self.control.dropped,
            "control_refused": dict(self.control.refused),
            "outbox": {
                "pending_bytes": self.outbox.pending_bytes,
                "limit_bytes": self.outbox.limit_bytes,
                "dropped": dict(self.outbox.dropped),
            },
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
        try:
            self.leases.release_all()  # the runs' next monitor need not wait for the TTL
        except Exception:
            log.debug("could not release leases", exc_info=True)
        if self.auto is not None:
            self.auto.close()
        if self.sink is not None:
            self.sink.close()
        try:
            self.store.clear_heartbeat("monitor", self.ident)
        except Exception:  # Redis may already be gone at shutdown
            log.debug("could not clear heartbeat", exc_info=True)
        self.close_sockets()
