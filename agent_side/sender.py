"""The agent's side of the sockets: never blocks, counts what it could not send, fails over.

One PUSH socket per monitor endpoint connects to that monitor's PULL. With ``IMMEDIATE`` set a
message is only queued on a completed connection, so with no monitor a send fails at once
(``zmq.Again``) and its records are counted as dropped; when the monitor is slow, the high-water
mark does the same.

A watcher thread per socket blocks on its connection events (ZeroMQ releases the GIL while it
waits, so it costs the agent nothing) and keeps the routing current; the attachment uses
``connected`` to put its hooks on only while a monitor listens. :meth:`Sender.wait_settled`
waits for the first connection attempt to end either way (a refused one ends at once), so
``attach()`` can give a monitor that already listens the agent's first step. This libzmq (4.3.5)
does not send a bound SUB's subscription to peers that connect later, so XPUB cannot learn about
a listener here; connection events are the equivalent signal. On every new connection to the
target (below), and whenever the target changes, the sender first sends its ``greeting`` (the
agent's control ``hello``) there, so the monitor serving the run, and one that starts later,
learns it; monitors that are not the target never hear it.

Routing over several endpoints (given in the run's order, :func:`agent_side.routing.rendezvous`):
messages go to one *target* at a time, the first endpoint in order that is eligible:

- the target stays the target while it is connected, and for ``failover_s`` after it was last
  connected (a monitor never reached counts as gone since the sender started): a brief blip does
  not move the run, and what is sent meanwhile is dropped and counted, as with one monitor gone;
- past that, the next connected endpoint in order becomes the target;
- an endpoint before the target becomes the target again once it has stayed connected for
  ``settle_s`` = max(0.5 s, failover_s / 3), so a monitor that restarts in a loop does not pull
  the run back and forth.

All sockets share one publisher id and one ``seq`` / ``drops`` / ``unwatched``: to the monitors a
failover is a gap in one publisher's sequence, never a new publisher or a sequence going back.
With one endpoint all this reduces to the single socket it always was.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from agent_side.routing import DEFAULT_FAILOVER_S

__all__ = ["Sender", "COPY_THRESHOLD", "SETTLE_MIN_S"]

log = logging.getLogger(__name__)

COPY_THRESHOLD = 64 * 1024  # larger messages are sent zero-copy
MAX_FAILOVER_S = 86_400.0  # a day: past that a dead monitor's runs would never move
SETTLE_MIN_S = 0.5  # the least time an earlier monitor must stay connected before the run moves back
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH

Build = Callable[[str, int, int, int], list[Any]]


class _Link:
    """One endpoint's socket and what its watcher knows of it."""

    __slots__ = ("endpoint", "sock", "watcher", "connected", "since", "settled", "connections", "greeted")

    def __init__(self, endpoint: str, sock: zmq.Socket, since: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.watcher: threading.Thread | None = None
        self.connected = False
        self.since = since  # when ``connected`` last changed (the sender's start for one never reached)
        self.settled = threading.Event()  # the first connection attempt ended: connected, refused or failed
        self.connections = 0  # handshakes completed
        self.greeted = 0  # the connection the greeting went out on last


class Sender:
    """One agent process's connection to its monitors (one, or a tier in the run's order).

    ``drops`` counts records (activation rows, metric rows, episodes) not handed to ZeroMQ;
    ``unwatched`` the steps the agent ran while no monitor was connected (kept by the attachment);
    ``seq`` numbers the messages handed to ZeroMQ, so the monitor can count what was lost after.
    ``connected`` is True while the target (see the module docstring) is connected; ``target`` is
    its endpoint (None once the last one has been gone ``failover_s`` with no other connected),
    ``failovers`` counts the moves from one endpoint to another.
    ``on_change(connected)`` is called from a watcher thread when ``connected`` changes;
    ``greeting(pub, seq, drops, unwatched)`` builds a message sent first to the target on every
    new connection and on every move.
    ``curve_serverkey`` (z85, with the agent's own ``curve_keypair``) makes the data channel
    CURVE: only a monitor holding that key's secret completes the handshake. ``run`` names the
    run in the log lines about moves.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        sndhwm: int = 128,
        on_change: Callable[[bool], None] | None = None,
        greeting: Build | None = None,
        curve_serverkey: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
        failover_s: float = DEFAULT_FAILOVER_S,
        run: str = "",
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("a Sender needs at least one endpoint")
        if isinstance(failover_s, bool) or not isinstance(failover_s, int | float) or not 0 <= failover_s <= MAX_FAILOVER_S:
            raise ValueError(
                f"failover_s (or $INTERLATENT_FAILOVER_S) must be a number of seconds in [0, {MAX_FAILOVER_S:g}], got {failover_s!r}"
            )
        self.failover_s = float(failover_s)
        self.settle_s = max(SETTLE_MIN_S, self.failover_s / 3)
        self.run = run
        self.pub = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.drops = 0
        self.unwatched = 0
        self.connected = False
        self.failovers = 0
        self.handshake_failures = 0  # a peer that could not prove the monitor's key, or refused ours
        self._on_change = on_change
        self._greeting = greeting
        self._up = threading.Event()
        self._lock = threading.Lock()  # the sockets' sends, seq and drops
        self._route_lock = threading.Lock()  # the routing state, changed by the watchers and the timer
        self._closed = False
        self._ctx = zmq.Context(io_threads=1)
        now = time.monotonic()
        self._links = [_Link(ep, self._socket(ep, sndhwm, curve_serverkey, curve_keypair), now) for ep in self.endpoints]
        self._route: _Link | None = self._links[0]  # the target: starts on the first, as if it had just gone
        self._last = self._links[0]  # the last target that was not None, to count moves
        self._link: _Link | None = self._route  # what send() uses: the target, None once closed
        self._wake = threading.Event()
        self._wake_at = math.inf
        for link in self._links:
            events = link.sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_MONITOR_STOPPED
                | zmq.EVENT_CONNECT_RETRIED
                | _HANDSHAKE_FAILED
            )
            link.sock.connect(link.endpoint)
            link.watcher = threading.Thread(target=self._watch, args=(link, events), name="interlatent-sender", daemon=True)
            link.watcher.start()
        self._timer = threading.Thread(target=self._time, name="interlatent-router", daemon=True)
        self._timer.start()

    @property
    def endpoint(self) -> str:
        """The run's first choice (the only one, with one endpoint)."""
        return self.endpoints[0]

    @property
    def target(self) -> str | None:
        """The endpoint messages go to now, or None when there is none."""
        route = self._route
        return route.endpoint if route is not None else None

    def _socket(self, endpoint: str, sndhwm: int, serverkey: bytes | None, keypair: tuple[bytes, bytes] | None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if serverkey is not None:
            public, secret = keypair or zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = serverkey, public, secret
        return sock

    # -- watchers and routing (never on the agent's thread) ----------------------------------------
    def _watch(self, link: _Link, events: zmq.Socket) -> None:
        peers = 0
        try:
            while True:
                ev = recv_monitor_message(events)["event"]
                if ev == zmq.EVENT_MONITOR_STOPPED:
                    return
                if ev & _HANDSHAKE_FAILED:
                    with self._route_lock:
                        self.handshake_failures += 1
                if ev != zmq.EVENT_HANDSHAKE_SUCCEEDED and ev != zmq.EVENT_DISCONNECTED:
                    link.settled.set()  # refused (nobody listens) or not proven: do not wait for it
                    continue
                peers = peers + 1 if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED else max(0, peers - 1)
                if (peers > 0) != link.connected:
                    with self._route_lock:
                        link.connected, link.since = peers > 0, time.monotonic()
                        log.info("monitor at %s %s", link.endpoint, "connected" if link.connected else "gone")
                        self._reroute()
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    with self._route_lock:
                        link.connections += 1
                        self._greet_target()
                    link.settled.set()
        except zmq.ZMQError:
            return  # context terminated under us at close
        finally:
            events.close(linger=0)

    def _time(self) -> None:
        """Re-route when time alone changes the choice: a grace ending, an earlier monitor settling."""
        while True:
            with self._route_lock:
                self._reroute()  # the first pass times the grace of a target not reached yet
                self._wake.clear()  # after: its own reroute must not wake it again
                if self._closed:  # close() sets _closed before _wake
                    return
                wait_s = self._wake_at - time.monotonic()
            self._wake.wait(None if wait_s == math.inf else max(0.001, wait_s))

    def _choose(self, now: float) -> tuple[_Link | None, float]:
        """The target now (module docstring) and when, at the latest, to look again."""
        route, wake_at = self._route, math.inf
        after = route is None  # endpoints after the target (all, with none) need only be connected
        for link in self._links:
            if link is route:
                if link.connected:
                    return link, wake_at
                if now - link.since < self.failover_s:
                    return link, min(wake_at, link.since + self.failover_s)
                after = True
            elif link.connected:
                if after or now - link.since >= self.settle_s:
                    return link, wake_at
                wake_at = min(wake_at, link.since + self.settle_s)
        return None, wake_at

    def _reroute(self) -> None:
        """Apply :meth:`_choose` (the caller holds ``_route_lock``, so on_change calls stay in order)."""
        route, self._wake_at = self._choose(time.monotonic())
        self._wake.set()  # the timer sleeps until the new wake_at
        if route is not self._route:
            with self._lock:
                self._route = route
                if not self._closed:
                    self._link = route
            if route is None:
                log.info("run %r: no monitor reachable of %s", self.run, self.endpoints)
            elif route is not self._last:
                self.failovers += 1
                log.info("run %r moves from %s to %s", self.run, self._last.endpoint, route.endpoint)
                self._last = route
        self._greet_target()
        connected = route is not None and route.connected
        if connected != self.connected:
            self.connected = connected
            if self._on_change is not None:
                self._on_change(connected)
            (self._up.set if connected else self._up.clear)()

    def _greet_target(self) -> None:
        """Greet the target once per connection (the caller holds ``_route_lock``): only the
        monitor the run's messages go to hears the hello, so the others never count it."""
        link = self._route
        if self._greeting is None or link is None or not link.connected or link.greeted == link.connections:
            return
        link.greeted = link.connections
        self._greet(link, self._greeting)

    def _greet(self, link: _Link, greeting: Build) -> None:
        for _ in range(20):  # the new pipe may take a moment to attach; retries are not drops
            with self._lock:
                if self._closed or self._hand(link, greeting, 0):
                    return
            time.sleep(0.01)
        with self._lock:
            self.drops += 1

    # -- the agent's thread ----------------------------------------------------------------------
    def wait_settled(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a monitor that already listens (True once a send would be
        taken); returns at once, False, when the first connection attempt to the target was
        refused or failed."""
        deadline = time.monotonic() + timeout_s
        link = self._route or self._links[0]
        if not link.settled.wait(timeout_s) or not self.connected:
            return False
        return self.wait_connected(max(0.0, deadline - time.monotonic()))

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Block until the target is connected and a send would be taken (for scripts and tests
        that must not drop): the handshake event can come before the new pipe is attached, and a
        send in between would find no peer and count as a drop."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._up.wait(left):
                return False
            with self._lock:
                if self._closed:
                    return False
                link = self._link
                if link is not None and link.sock.poll(0, zmq.POLLOUT):
                    return True
            time.sleep(0.005)

    def send(self, build: Build, records: int) -> bool:
        """Build one message with ``build(pub, seq, drops, unwatched)`` and hand it to ZeroMQ without blocking.

        On failure (no monitor, or the queue is full) the ``records`` it carried count as dropped.
        """
        with self._lock:
            link = self._link
            if link is None:  # closed, or no monitor to send to
                self.drops += records
                return False
            return self._hand(link, build, records)

    def _hand(self, link: _Link, build: Build, records: int) -> bool:
        """Send on ``link`` (the caller holds ``_lock``); count ``records`` as dropped if ZeroMQ refuses."""
        parts = build(self.pub, self.seq, self.drops, self.unwatched)
        nbytes = sum(memoryview(p).nbytes for p in parts)
        try:
            link.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=nbytes < COPY_THRESHOLD)
        except zmq.Again:
            # libzmq throttles command processing inside send, so a pipe that has just
            # attached can be missed; a zero-timeout poll processes the commands, never blocks
            try:
                if not (link.connected and link.sock.poll(0, zmq.POLLOUT)):
                    raise zmq.Again() from None
                link.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=nbytes < COPY_THRESHOLD)
            except zmq.Again:
                self.drops += records
                return False
        self.seq += 1
        return True

    def close(self, *, linger_ms: int = 500) -> None:
        """Close the sockets, giving queued messages up to ``linger_ms`` to leave."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._link = None
            for link in self._links:
                # with IMMEDIATE nothing is queued for a peer that is not connected, so lingering costs
                # nothing then; and a connection flag that is briefly stale must not drop the last frames
                link.sock.setsockopt(zmq.LINGER, linger_ms)
                link.sock.disable_monitor()  # its watcher sees MONITOR_STOPPED and returns
        self._wake.set()
        for link in self._links:
            if link.watcher is not None:
                link.watcher.join(timeout=2)
        self._timer.join(timeout=2)
        for link in self._links:
            link.sock.close()
        self._ctx.term()
