"""Live steering of a running agent, for agents that opt in: ``attach(..., allow_control=True)``.

The control channel: the monitor binds a PUB socket (by default at the data endpoint's port + 1,
:func:`agent_side.wire.control_endpoint`) and publishes, per run, the whole set of interventions
that run's agent should hold, with a version that counts its changes; it re-publishes every
second, since ZeroMQ drops what a subscriber that is still joining misses. A :class:`Controller`
holds a SUB connected there (a connecting SUB gets its subscription through on this libzmq; see
:mod:`agent_side.sender`), subscribed to its own run.

Every message is checked before anything happens: its size before unpacking, the envelope's exact
keys and types (:func:`agent_side.wire.decode_control`), the run, then each intervention with
:meth:`Intervention.from_msg`. A message that fails is refused whole, counted under its reason
(``counters()["control_refused"]``) and reported; the agent never sees an exception. An accepted
set is applied on the agent's own thread at its next step boundary (the next env step of a wrapped
env or SB3 callback, or the next call of the attached module, whichever comes first), replacing
the set held before. A steer whose vector does not fit its tap's width is refused, before it is
registered where the width is known and otherwise at its first forward, which it leaves unchanged.
Steers stay on while the monitor is away (the wanted set lives in Redis, and a monitor that comes
back publishes the same set, which the agent ignores); ``detach()`` takes them all off.

Every change goes back to the monitor as a ``ctl`` frame on the data socket: ``hello`` (on every
connection: whether this agent accepts control), ``applied`` / ``reverted`` / ``refused`` per
steer, and ``synced`` (the version now held and the ids active). A control message can do nothing
but add, scale, ablate or clamp a direction at a tap of the attached module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import zmq

from agent_side import wire
from agent_side.sender import Sender
from agent_side.steer import Intervention, Steer, SteerError
from agent_side.taps import TapError, parse_tap, resolve

__all__ = ["Controller", "greeting"]

log = logging.getLogger(__name__)

_MAX_RECV_BYTES = 64 * 1024 * 1024  # libzmq drops a connection sending more; below it, wire's limit counts it
_REPORT_EVERY_S = 0.1  # refused messages are all counted, but reported at most this often


def greeting(run: str, controller: Controller | None) -> Callable[[str, int, int], list[Any]]:
    """The ``hello`` a :class:`Sender` sends on every new connection: does this agent accept control?"""

    def build(pub: str, seq: int, drops: int) -> list[Any]:
        event = {"event": "hello", "control": controller is not None, "version": controller.version if controller else -1}
        return wire.encode_ctl(run, pub, seq, drops, event)

    return build


class Controller:
    """The agent's end of the control channel (see the module docstring).

    ``width_of(tap)`` gives a tap's width where the attachment has seen it, ``step_of()`` the
    agent's current step (both called on the agent's thread or the control thread; cheap reads).
    """

    def __init__(
        self, root: torch.nn.Module, *, run: str, endpoint: str, width_of: Callable[[str], int | None], step_of: Callable[[], int]
    ) -> None:
        self.root, self.run, self.endpoint = root, run, endpoint
        self.version = -1  # the version of the set held now; -1: none received yet
        self.messages = 0  # accepted messages that changed the set
        self.refused: Counter[str] = Counter()  # reason -> refused messages and steers
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
        """Connect to the control endpoint and listen on a daemon thread; reports go out on ``sender``."""
        self._sender = sender
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 64)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_RECV_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SUBSCRIBE, wire.control_topic(self.run))
        sock.connect(self.endpoint)
        self._thread = threading.Thread(target=self._listen, args=(sock,), name="interlatent-control", daemon=True)
        self._thread.start()
        log.info("run %r accepts steering from %s", self.run, self.endpoint)

    # -- the control thread ---------------------------------------------------------------------
    def _listen(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                try:
                    parts = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    self._receive(parts)
                except Exception:  # a bug of ours must cost one message, never the agent
                    log.exception("control message handling failed")
        except zmq.ZMQError:
            log.debug("control socket closed", exc_info=True)
        finally:
            sock.close(linger=0)

    def _receive(self, parts: list[bytes]) -> None:
        if len(parts) == 2 and parts[1] == self._last_body:
            return  # the monitor's periodic re-publication of the set already taken
        try:
            msg = wire.decode_control(parts)  # its run is its topic, which is ours
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
                    try:
                        self._active[id_] = (iv, iv.apply(self.root, on_error=lambda e, id_=id_: self._failed_in_forward(id_, e)))
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
        for e in events:
            (log.warning if e["event"] == "refused" else log.info)("steering %s: %s", e["event"], e)
            self._report(e)
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
        if self._sender is None:
            return
        event = {**event, "step": int(self._step_of())}
        run = self.run
        self._sender.send(lambda pub, seq, drops: wire.encode_ctl(run, pub, seq, drops, event), 1)

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
        }

    def close(self) -> None:
        """Stop listening and take every steer off the model (reported as reverted)."""
        with self._lock:
            self._closed = True
            self._pending = None
            boundary, self._boundary = self._boundary, None
        if boundary is not None:
            boundary.remove()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._ctx.term()
        with self._apply_lock:
            active, self._active = self._active, {}
        for iv, steer in active.values():
            steer.remove()
            self._report(self._event("reverted", iv, self.version, "the agent detached"))
        if active:
            self._report({"event": "synced", "version": self.version, "active": []})
