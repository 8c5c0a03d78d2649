"""Live steering of a running agent, for agents that opt in: ``attach(..., allow_control=True)``.

The control channel: the monitor binds an XPUB socket (by default at the data endpoint's port + 1,
:func:`agent_side.wire.control_endpoint`) and publishes, per run, the whole set of interventions
that run's agent should hold, with a version that counts its changes; it re-publishes every
second, since ZeroMQ drops what a subscriber that is still joining misses. A :class:`Controller`
holds an XSUB connected there, subscribed to its own run's topic exactly.

The channel is ZeroMQ CURVE, and the agent is given the monitor's public key (``monitor_key``:
the key, or the path of the monitor's ``DATA_DIR/curve/monitor.key``): a socket on that port that
cannot prove it holds the secret key never completes the handshake, so nothing it sends reaches
the agent (each such handshake is counted, ``counters()["control_unproven"]``). The agent's
reports travel back over the same authenticated connection (XSUB upstream): its subscription is
its opt-in, and ``hello`` / ``applied`` / ``reverted`` / ``refused`` / ``synced`` follow, so
nothing a process without the key sends on the data socket can make the monitor think an agent
accepts steering or holds a set.

Every message is checked before anything happens: its size before unpacking, the envelope's exact
keys and types (:func:`agent_side.wire.decode_control`), its run against this agent's exactly,
then each intervention with :meth:`Intervention.from_msg`. A message that fails is refused whole, counted under its reason
(``counters()["control_refused"]``) and reported; the agent never sees an exception. An accepted
set is applied on the agent's own thread at its next step boundary (the next env step of a wrapped
env or SB3 callback, or the next call of the attached module, whichever comes first), replacing
the set held before. A steer whose vector does not fit its tap's width is refused, before it is
registered where the width is known and otherwise at its first forward, which it leaves unchanged.
Steers stay on while the monitor is away (the wanted set lives in Redis, and a monitor that comes
back publishes the same set, which the agent ignores); ``detach()`` takes them all off.

Every change goes back to the monitor as a ``ctl`` frame on the control connection: ``hello`` and
``synced`` on every (re)connection, ``applied`` / ``reverted`` / ``refused`` per steer, and
``synced`` (the version now held and the ids active) after each change. The data socket carries
only the sender's ``hello`` greeting, which says whether the agent accepts control but is never
trusted to switch it on. A control message can do nothing but add, scale, ablate or clamp a
direction at a tap of the attached module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from agent_side import wire
from agent_side.sender import Sender
from agent_side.steer import Intervention, Steer, SteerError
from agent_side.taps import TapError, parse_tap, resolve

__all__ = ["Controller", "greeting", "load_monitor_key", "load_agent_key", "read_key", "default_key_path"]

log = logging.getLogger(__name__)

_MAX_RECV_BYTES = 64 * 1024 * 1024  # libzmq drops a connection sending more; below it, wire's limit counts it
_REPORT_EVERY_S = 0.1  # refused messages are all counted, but reported at most this often
_REPORTS = 1024  # reports waiting for the control thread to send them
_KEY_RETRY_S = 1.0  # how often a key file that is not there yet is looked for


def greeting(run: str, controller: Controller | None) -> Callable[[str, int, int, int], list[Any]]:
    """The ``hello`` a :class:`Sender` sends on every new connection: does this agent accept control?"""

    def build(pub: str, seq: int, drops: int, unwatched: int) -> list[Any]:
        event = {"event": "hello", "control": controller is not None, "version": controller.version if controller else -1}
        return wire.encode_ctl(run, pub, seq, drops, event, unwatched=unwatched)

    return build


def default_key_path() -> Path:
    """Where a monitor on this machine keeps its public key: ``DATA_DIR/curve/monitor.key``."""
    data_dir = os.environ.get("INTERLATENT_DATA_DIR") or str(Path.home() / ".interlatent")
    return Path(data_dir) / "curve" / "monitor.key"


def _z85_key(text: str | bytes) -> bytes | None:
    key = text.encode() if isinstance(text, str) else bytes(text)
    key = key.strip()
    if len(key) != 40:
        return None
    try:
        return key if len(z85.decode(key)) == 32 else None
    except (ValueError, KeyError, TypeError):
        return None


def load_monitor_key(given: str | bytes | Path | None) -> bytes | Path:
    """The monitor's public key as given (z85 text), or the path of a file holding it
    (``monitor.key`` as the monitor writes it, or the bare key), to be read when it exists.
    None: ``$INTERLATENT_MONITOR_KEY`` (either form), else :func:`default_key_path`."""
    if given is None:
        given = os.environ.get("INTERLATENT_MONITOR_KEY") or default_key_path()
    if not isinstance(given, Path):
        key = _z85_key(given)
        if key is not None:
            return key
        given = Path(given.decode() if isinstance(given, bytes) else given).expanduser()
    return given


def load_agent_key(path: str | Path | None) -> tuple[bytes, bytes] | None:
    """An agent's own keypair from its secret certificate file (``NAME.key_secret``), or None."""
    if not path:
        return None
    try:
        public, secret = zmq.auth.load_certificate(str(Path(path).expanduser()))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the agent's key {path}: {e}") from e
    if not secret:
        raise ValueError(f"{path} holds no secret key: pass the NAME.key_secret file")
    return public, secret


def read_key(path: Path) -> bytes | None:
    """The public key in a certificate file or a bare-key file; None while there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    key = _z85_key(text)
    if key is not None:
        return key
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError):
        return None
    return _z85_key(public) if public else None


class Controller:
    """The agent's end of the control channel (see the module docstring).

    ``width_of(tap)`` gives a tap's width where the attachment has seen it, ``step_of()`` the
    agent's current step (both called on the agent's thread or the control thread; cheap reads).
    """

    def __init__(
        self,
        root: torch.nn.Module,
        *,
        run: str,
        endpoint: str | Sequence[str],
        width_of: Callable[[str], int | None],
        step_of: Callable[[], int],
        monitor_key: bytes | Path | None = None,
        keypair: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.root, self.run = root, run
        # several monitors: one XSUB connects to every one's XPUB (reports go to all of them)
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self.endpoint = ", ".join(self.endpoints)
        self._keypair = keypair  # this agent's own (for a monitor with --allow-keys), else one made per connection
        self.monitor_key = load_monitor_key(monitor_key) if not isinstance(monitor_key, (bytes, Path)) else monitor_key
        self.version = -1  # the version of the set held now; -1: none received yet
        self.messages = 0  # accepted messages that changed the set
        self.refused: Counter[str] = Counter()  # reason -> refused messages and steers
        self.unproven = 0  # control peers that could not prove the monitor's key (handshakes failed)
        self._reports: deque[dict[str, Any]] = deque(maxlen=_REPORTS)  # sent by the control thread
        self._seq = 0
        self._width_of, self._step_of = width_of, step_of
        self._active: dict[str, tuple[Intervention, Steer]] = {}
        self._failed: dict[str, Intervention] = {}  # refused as they are: not tried again until they change
        self._pending: tuple[int, list[Intervention]] | None = None
        self._lock = threading.Lock()  # _pending and _boundary, shared with the control thread
        self._apply_lock = threading.Lock()  # _active and _failed
        self._boundary: Any = None  # one-shot forward pre-hook on root while a set is pending
        self._last_body = b""
        self._last_report = 0.0
        self._stop = threading.Event()
        self._closed = False
        self._sender: Sender | None = None
        self._thread: threading.Thread | None = None

    def start(self, sender: Sender) -> None:
        """Connect to the control endpoint and listen on a daemon thread (once the monitor's key
        is known: a key file that is not there yet is looked for every second)."""
        self._sender = sender
        self._ctx = zmq.Context(io_threads=1)
        self._thread = threading.Thread(target=self._listen, name="interlatent-control", daemon=True)
        self._thread.start()
        log.info("run %r accepts steering from %s", self.run, self.endpoint)

    # -- the control thread ---------------------------------------------------------------------
    def _key(self) -> bytes | None:
        if isinstance(self.monitor_key, bytes):
            return self.monitor_key
        waited = False
        while not self._stop.is_set():
            key = read_key(self.monitor_key)
            if key is not None:
                return key
            if not waited:
                waited = True
                log.warning("steering waits for the monitor's public key at %s (pass monitor_key=)", self.monitor_key)
            self._stop.wait(_KEY_RETRY_S)
        return None

    def _socket(self, key: bytes) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self._ctx.socket(zmq.XSUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 64)
        sock.setsockopt(zmq.SNDHWM, _REPORTS)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_RECV_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        public, secret = self._keypair or zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = key, public, secret
        events = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        for endpoint in self.endpoints:
            sock.connect(endpoint)
        sock.send(b"\x01" + wire.control_topic(self.run))  # XSUB sends it again on every reconnection
        return sock, events

    def _listen(self) -> None:
        key = self._key()
        if key is None:
            return
        sock, events = self._socket(key)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(50))
                if events in ready:
                    ev = recv_monitor_message(events)["event"]
                    if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # (re)connected: say who we are and what we hold
                        with self._apply_lock:
                            active = list(self._active)
                        self._reports.appendleft({"event": "synced", "version": self.version, "active": active})
                        self._reports.appendleft({"event": "hello", "control": True, "version": self.version})
                    else:
                        self.unproven += 1
                        if self.unproven == 1:
                            log.warning(
                                "a control socket at %s could not prove the monitor's key: not listened to", self.endpoint
                            )
                if sock in ready:
                    try:
                        self._receive(sock.recv_multipart(flags=zmq.NOBLOCK))
                    except zmq.Again:
                        pass
                    except Exception:  # a bug of ours must cost one message, never the agent
                        log.exception("control message handling failed")
                self._send_reports(sock)
                if self._stop.is_set():
                    self._send_reports(sock)  # the reverts close() queued
                    return
        except zmq.ZMQError:
            log.debug("control socket closed", exc_info=True)
        finally:
            sock.disable_monitor()
            events.close(linger=0)
            sock.close(linger=200)

    def _send_reports(self, sock: zmq.Socket) -> None:
        while self._reports:
            event = self._reports.popleft()
            self._seq += 1
            try:
                sock.send_multipart(wire.encode_ctl(self.run, self._pub(), self._seq, 0, event), flags=zmq.NOBLOCK)
            except zmq.Again:
                return

    def _pub(self) -> str:
        return self._sender.pub if self._sender is not None else "control"

    def _receive(self, parts: list[bytes]) -> None:
        if len(parts) == 2 and parts[1] == self._last_body:
            return  # the monitor's periodic re-publication of the set already taken
        try:
            msg = wire.decode_control(parts)
            if msg.run != self.run:  # a topic this subscription matched by prefix, or a forgery: never ours
                raise wire.WireError("wrong_run", f"control message for run {msg.run!r:.80}, this agent is {self.run!r:.80}")
            ivs = [Intervention.from_msg(m) for m in msg.interventions]
            ids = [iv.id for iv in ivs]
            if not all(ids) or len(set(ids)) != len(ids):
                raise SteerError(f"each intervention needs its own non-empty id, got {ids[:8]}")
        except wire.WireError as e:
            self._refuse_message(e.reason, str(e))
            return
        except SteerError as e:
            self._refuse_message("bad_intervention", str(e))
            return
        self._last_body = parts[1]
        with self._lock:
            self._pending = (msg.version, ivs)
            if self._boundary is None and not self._closed:
                # torch snapshots a module's hooks per call, so registering from this thread is safe
                self._boundary = self.root.register_forward_pre_hook(self._at_boundary)

    def _refuse_message(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._last_report >= _REPORT_EVERY_S:
            self._last_report = now
            log.warning("refused a control message (%s): %s", reason, detail[:200])
            self._report({"event": "refused", "reason": detail[:1000]})

    # -- the agent's thread -----------------------------------------------------------------------
    def _at_boundary(self, module: torch.nn.Module, args: tuple) -> None:
        self.step()

    def step(self) -> None:
        """At a step boundary: apply a set that arrived since the last one (nearly free otherwise)."""
        if self._pending is None:
            return
        with self._lock:
            pending, self._pending = self._pending, None
            boundary, self._boundary = self._boundary, None
        if boundary is not None:
            boundary.remove()
        if pending is not None:
            self._apply(*pending)

    def _apply(self, version: int, ivs: list[Intervention]) -> None:
        want = {iv.id: iv for iv in ivs}
        events: list[dict[str, Any]] = []
        with self._apply_lock:
            for id_, (iv, steer) in list(self._active.items()):
                if want.get(id_) != iv:
                    steer.remove()
                    del self._active[id_]
                    events.append(self._event("reverted", iv, version))
            self._failed = {k: v for k, v in self._failed.items() if want.get(k) == v}
            for id_, iv in want.items():
                if id_ in self._active or id_ in self._failed:
                    continue
                reason = self._misfit(iv)
                if reason is None:

                    def failed(err: SteerError, id_: str = id_) -> None:
                        self._failed_in_forward(id_, err)

                    try:
                        self._active[id_] = (iv, iv.apply(self.root, on_error=failed))
                    except SteerError as e:
                        reason = str(e)
                if reason is None:
                    events.append(self._event("applied", iv, version))
                else:
                    self._failed[id_] = iv
                    self.refused["cannot_apply"] += 1
                    events.append(self._event("refused", iv, version, reason))
            self.version = version
            self.messages += 1
            active = list(self._active)
        for ev in events:
            (log.warning if ev["event"] == "refused" else log.info)("steering %s: %s", ev["event"], ev)
            self._report(ev)
        self._report({"event": "synced", "version": version, "active": active})

    def _misfit(self, iv: Intervention) -> str | None:
        """Why ``iv`` cannot fit its tap (a width known before any forward), or None."""
        checks = [(iv.tap, len(iv.direction), "direction")]
        if iv.w_enc is not None:
            checks.append((iv.source or iv.tap, len(iv.w_enc), "w_enc"))
        for tap, n, what in checks:
            width = self._width(tap)
            if width is not None and width != n:
                return f"{iv.op} at {iv.tap!r}: {what} has {n} entries but {tap!r} is {width} wide"
        return None

    def _width(self, tap: str) -> int | None:
        known = self._width_of(tap)
        if known is not None and known > 0:
            return known
        try:
            spec = parse_tap(tap)
            feat = getattr(resolve(self.root, spec), "in_features" if spec.site == "in" else "out_features", None)
        except TapError:
            return None  # apply() says what is wrong with the tap
        return feat if isinstance(feat, int) else None

    def _failed_in_forward(self, id_: str, err: SteerError) -> None:
        with self._apply_lock:
            entry = self._active.pop(id_, None)
            if entry is None:
                return
            self._failed[id_] = entry[0]
            active = list(self._active)
        self.refused["forward_error"] += 1
        log.warning("steering %s refused at a forward: %s", id_, err)
        self._report(self._event("refused", entry[0], self.version, str(err)))
        self._report({"event": "synced", "version": self.version, "active": active})

    # -- both -------------------------------------------------------------------------------------
    def _event(self, kind: str, iv: Intervention, version: int, reason: str = "") -> dict[str, Any]:
        e = {
            "event": kind,
            "id": iv.id[:1000],
            "op": iv.op,
            "tap": iv.tap[:1000],
            "version": version,
            "alpha": iv.alpha,
            "value": iv.value,
        }
        if reason:
            e["reason"] = reason[:1000]
        return e

    def _report(self, event: dict[str, Any]) -> None:
        """Queue a report for the control thread, which sends it on the authenticated connection."""
        self._reports.append({**event, "step": int(self._step_of())})

    @property
    def active(self) -> list[str]:
        """The ids of the steers on the model now."""
        return list(self._active)

    def counters(self) -> dict[str, Any]:
        return {
            "control": True,
            "control_version": self.version,
            "control_active": len(self._active),
            "control_messages": self.messages,
            "control_refused": sum(self.refused.values()),
            "control_refused_by": dict(self.refused),
            "control_unproven": self.unproven,
        }

    def close(self) -> None:
        """Stop listening and take every steer off the model (reported as reverted)."""
        with self._lock:
            self._closed = True
            self._pending = None
            boundary, self._boundary = self._boundary, None
        if boundary is not None:
            boundary.remove()
        with self._apply_lock:
            active, self._active = self._active, {}
        for iv, steer in active.values():
            steer.remove()
            self._report(self._event("reverted", iv, self.version, "the agent detached"))
        if active:
            self._report({"event": "synced", "version": self.version, "active": []})
        self._stop.set()  # the control thread sends what is queued, then closes
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._ctx.term()
