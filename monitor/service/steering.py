"""The monitor's end of live steering: each run's wanted interventions, published to its agent.

State, not commands: ``interlatent steer`` writes a run's whole wanted set to Redis
(:func:`set_interventions`, :func:`clear_interventions`; ``keys.steer(run)`` with a version, and
the global ``keys.STEER_VERSION`` bumped). The monitor binds an XPUB socket with CURVE (by default
the data endpoint's port + 1; its keypair in ``DATA_DIR/curve``) and publishes each opted-in run's
set when that counter moves and again every ``republish_s`` (ZeroMQ drops what a subscriber that
is still joining misses; the agent ignores a set it already holds).

Opt-in is proven, never claimed: a run is opted in while an agent holding the monitor's public key
is connected to the control socket and subscribed to that run's topic exactly, and agents' reports
come back over that same authenticated connection (:mod:`agent_side.control`): ``hello`` and
``synced`` update ``keys.control(run)`` (the version held, the ids active); ``applied`` /
``reverted`` / ``refused`` go to the capped stream ``keys.STEER_EVENTS`` and, as alert events of
rule ``steering`` (kind ``steer``, state = the event), to the alerts stream, so ``interlatent
alerts`` and the panel show every change and its revert. A ``hello`` on the data socket, which
anyone can send, can only say that an agent does not accept control.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import redis
import zmq

from agent_side.wire import CtlFrame, WireError, control_topic, decode, encode_control
from agent_side.wire import name_problem as wire_name_problem
from monitor.alerts.sinks import AlertSink
from monitor.stats.intervals import diff_ci
from monitor.store import keys
from monitor.store.keys import LATENT_PREFIX
from monitor.store.records import ConfigError, Store

__all__ = [
    "ControlChannel",
    "build_intervention",
    "set_interventions",
    "clear_interventions",
    "steer_effects",
    "steer_id",
    "STEER_EVENTS_MAXLEN",
]

log = logging.getLogger(__name__)

STEER_EVENTS_MAXLEN = 10_000
BACKLOG = 4096  # agents' reports and subscriptions kept while Redis is away
REPORT_MAX_BYTES = 64 * 1024  # an agent's report is a few hundred bytes; libzmq drops a peer sending more


def describe_op(e: dict[str, Any], unknown: str = "") -> str:
    """A steering event's operation in words (``add alpha=-1``), or ``unknown`` for another op."""
    return {
        "add": f"add alpha={e.get('alpha', 0.0):+g}",
        "scale": f"scale factor={e.get('alpha', 0.0):g}",
        "ablate": "ablate",
        "clamp": f"clamp value={e.get('value', 0.0):g}",
    }.get(e.get("op", ""), unknown)


def steer_id(transcoder: str, latent: int) -> str:
    """The id of a steer along a transcoder latent: its latent tap and index, like explanations'."""
    return f"{LATENT_PREFIX}{transcoder}/{latent}"


def _update(r: redis.Redis, run: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> int:
    """Apply ``change`` to a run's wanted set atomically (optimistic lock); the new version."""

    def tx(pipe: redis.client.Pipeline) -> int:
        blob = pipe.get(keys.steer(run))
        cur = json.loads(blob) if blob else {"version": 0, "interventions": []}
        version = int(cur["version"]) + 1
        pipe.multi()
        pipe.set(keys.steer(run), json.dumps({"version": version, "interventions": change(cur["interventions"])}))
        return version

    version = r.transaction(tx, keys.steer(run), value_from_callable=True)
    r.incr(keys.STEER_VERSION)  # after: a monitor that sees the bump reads the new set (another slot on a cluster)
    return int(version)


def set_interventions(r: redis.Redis, run: str, msgs: list[dict[str, Any]]) -> int:
    """Add these interventions (``Intervention.to_msg()``) to a run's set, replacing any of the same id."""
    ids = {m["id"] for m in msgs}
    return _update(r, run, lambda cur: [m for m in cur if m["id"] not in ids] + list(msgs))


def clear_interventions(r: redis.Redis, run: str, ids: list[str] | None = None) -> int:
    """Remove these ids (default: all) from a run's set."""
    return _update(r, run, lambda cur: [] if ids is None else [m for m in cur if m["id"] not in ids])


class ControlChannel:
    """Publishes wanted sets to agents and records what they report (see the module docstring).

    An XPUB socket with CURVE (``keypair``: the monitor's, :func:`monitor.service.curve.monitor_keypair`):
    only an agent given the monitor's public key connects. Its exact subscription to its run's
    topic is its opt-in, and its reports come back over the same connection; what arrives on the
    data socket (``on_data_event``) can only say that an agent does *not* accept control.
    ``endpoint=None`` publishes nothing and hears nothing (steering off).
    """

    def __init__(
        self,
        store: Store,
        ctx: zmq.Context,
        endpoint: str | None,
        *,
        sink: AlertSink,
        keypair: tuple[bytes, bytes] | None = None,
        republish_s: float = 1.0,
        lost: Counter[str] | None = None,
    ) -> None:
        self.store, self.sink = store, sink
        self._lost = lost  # where a dropped backlog entry is counted too (the monitor's outbox, kind "control")
        self.endpoint = endpoint
        self._republish_s = republish_s
        self._sock: zmq.Socket | None = None
        public, secret = keypair or zmq.curve_keypair()
        self.public_key = public.decode()
        if endpoint is not None:
            sock = ctx.socket(zmq.XPUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe, so they can be counted per run
            sock.setsockopt(zmq.MAXMSGSIZE, REPORT_MAX_BYTES)
            sock.setsockopt(zmq.RCVHWM, 4096)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = public, secret
            try:
                sock.bind(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            self._sock = sock
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            log.info("steering control channel on %s (CURVE, monitor key %s)", self.endpoint, self.public_key)
        self.opted: set[str] = set()
        self._subs: Counter[str] = Counter()  # run -> live authenticated subscriptions to its topic
        self._backlog: deque[tuple[str, Any]] = deque()  # what agents said, written to Redis in order
        self.dropped = 0  # backlog entries let go while Redis was away (counted)
        self.refused: Counter[str] = Counter()  # control-channel messages refused, by reason
        self._seen = -1  # keys.STEER_VERSION when the bodies below were read
        self._bodies: dict[str, list[bytes]] = {}
        self._due: set[str] = set()
        self._next = 0.0
        self.published = 0
        # the runs this monitor serves (holds the lease of): agents' reports reach every monitor
        # they are connected to, and only the serving one writes them
        self.serves: Callable[[str], bool] = lambda run: True
        self.elsewhere = 0  # reports of runs another monitor serves, left to it

    # -- what agents report -----------------------------------------------------------------------
    def on_data_event(self, frame: CtlFrame) -> None:
        """A ``ctl`` frame from the data socket (anyone may send one): only an agent's ``hello``
        saying it does not accept control is kept, and only for a run no authenticated agent holds."""
        if frame.event.get("event") == "hello" and not frame.event.get("control"):
            self._queue(("declined", frame))

    def _queue(self, item: tuple[str, Any]) -> None:
        if len(self._backlog) >= BACKLOG:  # Redis has been away for long: the oldest go, counted
            self._backlog.popleft()
            self.dropped += 1
            if self._lost is not None:
                self._lost["control"] += 1
        self._backlog.append(item)

    def poll(self, *, limit: int = 4096) -> None:
        """Read what agents sent on the control channel (subscriptions and reports), then write
        it to Redis in order; an entry whose write fails stays for the next call."""
        if self._sock is not None:
            for _ in range(limit):
                try:
                    parts = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._read(parts)
        while self._backlog:
            kind, item = self._backlog[0]
            run = item[0] if kind == "sub" else item.run
            if not self.serves(run):
                if kind != "sub":  # a subscription is kept in `opted`, and written when the run comes here
                    self.elsewhere += 1  # the agent reports to every monitor it reaches; the serving one keeps it
            elif kind == "sub":
                self._write_subscription(*item)
            elif kind == "declined":
                if item.run not in self.opted:
                    self.store.r.hset(keys.control(item.run), mapping={"control": 0, "pub": item.pub, "hello": time.time()})
            else:
                self.on_event(item)
            self._backlog.popleft()

    def now_serving(self, run: str) -> None:
        """This monitor took ``run`` over: its agent's subscription here is written now."""
        if run in self.opted:
            self._queue(("sub", (run, True)))

    def _read(self, parts: list[bytes]) -> None:
        if len(parts) == 1 and parts[0][:1] in (b"\x00", b"\x01"):  # a subscription or its end
            topic = parts[0][1:]
            run = topic[:-1].decode("utf-8", errors="replace") if topic.endswith(b"\0") else ""
            if not run or wire_name_problem(run) is not None or control_topic(run) != topic:
                self.refused["bad_topic"] += 1
                return
            if parts[0][:1] == b"\x01":
                self._subs[run] += 1
                if self._subs[run] == 1:
                    self.opted.add(run)
                    self._due.add(run)
                    self._queue(("sub", (run, True)))
            elif self._subs[run] > 0:
                self._subs[run] -= 1
                if self._subs[run] == 0:
                    del self._subs[run]
                    self.opted.discard(run)
                    self._queue(("sub", (run, False)))
            return
        try:
            frame = decode(parts)
        except WireError as e:
            self.refused[e.reason] += 1
            return
        if not isinstance(frame, CtlFrame) or frame.run not in self._subs:
            self.refused["not_subscribed"] += 1  # a report for a run no connection here subscribed to
            return
        self._queue(("event", frame))

    def _write_subscription(self, run: str, on: bool) -> None:
        now = time.time()
        self.store.r.hset(keys.control(run), mapping={"control": int(on), "hello": now, "time": now})
        log.info(
            "run %r %s steering (authenticated control connection %s)", run, "accepts" if on else "left", "up" if on else "gone"
        )

    def on_event(self, frame: CtlFrame) -> None:
        """One report from an agent's authenticated control connection (validated by the wire decoder)."""
        ev, run, now = frame.event, frame.run, time.time()
        kind = ev["event"]
        if kind == "hello":
            self.store.r.hset(
                keys.control(run),
                mapping={"pub": frame.pub, "hello": now, "version": int(ev.get("version", -1)), "time": now},
            )
            return
        if kind == "synced":
            self.store.r.hset(
                keys.control(run),
                mapping={"version": int(ev.get("version", -1)), "active": json.dumps(ev.get("active", [])), "time": now},
            )
            return
        record = {"run": run, "pub": frame.pub, "time": now, **ev}
        self.store.r.xadd(keys.STEER_EVENTS, {"json": json.dumps(record)}, maxlen=STEER_EVENTS_MAXLEN, approximate=True)
        self.sink.emit(_alert(record))

    # -- what the monitor publishes ---------------------------------------------------------------
    def publish(self) -> None:
        """Send the wanted set of every opted-in run that is due (called on every monitor flush)."""
        if self._sock is None or not self.opted:
            return
        now = time.monotonic()
        version = int(self.store.r.get(keys.STEER_VERSION) or 0)
        if version != self._seen:
            self._seen = version
            self._bodies.clear()
        if not self._bodies or now >= self._next:
            self._next = now + self._republish_s
            self._due |= self.opted
        for run in self._due & self.opted:
            parts = self._bodies.get(run)
            if parts is None:
                want = self.store.steering(run)
                parts = self._bodies[run] = encode_control(run, want["version"], want["interventions"])
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
                self.published += 1
            except zmq.Again:
                log.debug("control message to %r dropped at the high-water mark", run)
        self._due.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


def _returns(x: Any) -> dict[str, Any]:
    return {"episodes": int(len(x)), "mean_return": round(float(x.mean()), 3) if len(x) else None}


def steer_effects(store: Store, run: str) -> list[dict[str, Any]]:
    """The live effect of each steer the agent applied: the returns of the episodes that ended
    while it was active (some began before it), beside those that ended between the previous
    steering change and it, with a Welch interval on the difference. An observation, not a
    controlled test: ``interlatent sweep`` is that."""
    events = [e for e in store.steer_events(run) if e["event"] in ("applied", "reverted", "refused")]
    eps = store.episodes(run)
    ends = np.array([e["step"] for e in eps], dtype=np.float64)
    rets = np.array([e["return"] for e in eps], dtype=np.float64)
    out = []
    for i, e in enumerate(events):
        if e["event"] != "applied":
            continue
        # it ends when reverted, or when the agent dropped it (a forward it failed in: refused)
        until = next((f["step"] for f in events[i + 1 :] if f["event"] != "applied" and f.get("id") == e.get("id")), None)
        since = max((f["step"] for f in events[:i] if f["step"] < e["step"]), default=0)  # a change at the same step: a re-steer
        during = rets[(ends >= e["step"]) & (ends < (np.inf if until is None else until))]
        before = rets[(ends >= since) & (ends < e["step"])]
        out.append(
            {
                "id": e.get("id"),
                "op": e.get("op"),
                "applied_step": e["step"],
                "reverted_step": until,
                "before": _returns(before),
                "during": _returns(during),
                "difference": diff_ci(before.tolist(), during.tolist()) if len(before) and len(during) else None,
            }
        )
    return out


def _alert(e: dict[str, Any]) -> dict[str, Any]:
    """A steering event in the shape of an alert event (see :mod:`monitor.alerts.engine`)."""
    kind, ident, tap = e["event"], e.get("id", ""), e.get("tap", "")
    latent_tap, _, j = ident.rpartition("/")
    latent = int(j) if j.isdigit() and latent_tap else None
    severity = "warning" if kind == "refused" else "info"
    what = describe_op(e, "a control message")
    text = f"[{severity}] steering {kind}: {e['run']} {ident or ''} {what}" + (f" at {tap}" if tap else "")
    text += f" (version {e['version']}, step {e.get('step', 0)})" if "version" in e else f" (step {e.get('step', 0)})"
    if e.get("reason"):
        text += f": {e['reason']}"
    return {
        "id": f"steering|{e['run']}|{ident}",
        "rule": "steering",
        "kind": "steer",
        "state": kind,
        "severity": severity,
        "labels": {},
        "run": e["run"],
        "tap": latent_tap if latent is not None else tap,
        "latent": latent,
        "step": int(e.get("step", 0)),
        "index": 0,
        "value": float(e.get("alpha", 0.0)),
        "z": 0.0,
        "correlations": {},
        "explanation": None,
        "time": e["time"],
        "text": text,
        "steer": {k: e[k] for k in ("id", "op", "tap", "version") if k in e},
    }


def _transcoder(store: Store, run: str, tap: str | None, name: str | None) -> dict[str, Any]:
    """The registry entry to steer with: ``name``, else the run's one transcoder that writes ``tap``."""
    infos = store.transcoders()
    if name:
        info = next((t for t in infos if t["name"] == name), None)
        if info is None:
            raise ConfigError(f"no transcoder {name!r}; `interlatent transcoders` lists them")
        if tap is not None and tap != info["target"]:
            raise ConfigError(
                f"transcoder {name} writes {info['target']!r}, so its decoder directions fit there, not at {tap!r}: "
                f"pass --tap {info['target']}"
            )
        return info
    if tap is None:
        raise ConfigError("say where to steer: --tap TAP (with the run's transcoder that writes it) or --transcoder NAME")
    mine = [t for t in infos if t.get("run") in (run, "*")]
    hits = [t for t in mine if t["target"] == tap]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConfigError(
            f"several transcoders of run {run!r} write {tap!r}: {', '.join(t['name'] for t in hits)}; "
            "pick one with --transcoder NAME"
        )
    readers = [
        f"{t['name']} reads {tap!r} and writes {t['target']!r} (steer at --tap {t['target']})" for t in mine if t["source"] == tap
    ]
    listing = ", ".join(f"{t['name']} ({t['source']} -> {t['target']})" for t in mine) or "none; `interlatent train` makes some"
    raise ConfigError(
        f"no transcoder of run {run!r} writes {tap!r}: "
        + ("; ".join(readers) if readers else f"the run's transcoders: {listing}")
    )


def build_intervention(
    store: Store,
    run: str,
    *,
    latent: int | None,
    op: str,
    tap: str | None = None,
    transcoder: str | None = None,
    alpha: float | None = None,
    value: float | None = None,
    steer_id_: str | None = None,
) -> dict[str, Any]:
    """The control message that steers ``latent`` of a registered transcoder at the tap it writes
    (``interlatent steer`` and the panel's form); a :class:`ConfigError` says what to fix."""
    from agent_side.steer import SteerError, from_transcoder
    from monitor.transcoders.artifacts import ArtifactError, load_artifact

    if latent is None:
        raise ConfigError("pass --latent J (or --clear)")
    if op in ("add", "scale") and alpha is None:
        raise ConfigError(f"--op {op} needs --alpha" + (" (the factor)" if op == "scale" else ""))
    if op == "clamp" and value is None:
        raise ConfigError("--op clamp needs --value (what to hold the latent at)")
    info = _transcoder(store, run, tap, transcoder)
    tap = info["target"]
    try:
        model, _ = load_artifact(info["path"])
        source = info["source"] if op == "clamp" and info["source"] != tap else None
        iv = from_transcoder(model, latent, tap=tap, op=op, alpha=alpha or 0.0, value=value or 0.0, source=source)
        iv = dataclasses.replace(iv, id=steer_id_ or steer_id(info["name"], latent))
    except (ArtifactError, SteerError) as e:
        raise ConfigError(str(e)) from e
    width = store.taps(run).get(tap, {}).get("width")
    if width is not None and width != len(iv.direction):
        raise ConfigError(
            f"run {run!r} streams {tap!r} {width} wide, but {info['name']}'s directions are {len(iv.direction)} wide"
        )
    return iv.to_msg()
