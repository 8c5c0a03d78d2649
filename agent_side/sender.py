"""The agent's side of the socket: never blocks, counts what it could not send.

A PUSH socket connects to the monitor's PULL. With ``IMMEDIATE`` set a message is only queued
on a completed connection, so with no monitor a send fails at once (``zmq.Again``) and its
records are counted as dropped; when the monitor is slow, the high-water mark does the same.

A watcher thread blocks on the socket's connection events (ZeroMQ releases the GIL while it
waits, so it costs the agent nothing) and keeps ``connected`` current; the attachment uses it
to put its hooks on only while a monitor listens. :meth:`Sender.wait_settled` waits for the
first connection attempt to end either way (a refused one ends at once), so ``attach()`` can
give a monitor that already listens the agent's first step. This libzmq (4.3.5) does not send a bound
SUB's subscription to peers that connect later, so XPUB cannot learn about a listener here;
connection events are the equivalent signal. On every new connection the sender first sends its
``greeting`` (the agent's control ``hello``), so a monitor that starts later still learns it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["Sender", "COPY_THRESHOLD"]

log = logging.getLogger(__name__)

COPY_THRESHOLD = 64 * 1024  # larger messages are sent zero-copy
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class Sender:
    """One agent process's connection to a monitor.

    ``drops`` counts records (activation rows, metric rows, episodes) not handed to ZeroMQ;
    ``unwatched`` the steps the agent ran while no monitor was connected (kept by the attachment);
    ``seq`` numbers the messages handed to ZeroMQ, so the monitor can count what was lost after.
    ``on_change(connected)`` is called from the watcher thread when a monitor comes or goes;
    ``greeting(pub, seq, drops, unwatched)`` builds a message sent first on every new connection.
    ``curve_serverkey`` (z85, with the agent's own ``curve_keypair``) makes the data channel
    CURVE: only a monitor holding that key's secret completes the handshake.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        sndhwm: int = 128,
        on_change: Callable[[bool], None] | None = None,
        greeting: Callable[[str, int, int, int], list[Any]] | None = None,
        curve_serverkey: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.pub = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.drops = 0
        self.unwatched = 0
        self.connected = False
        self.handshake_failures = 0  # a peer that could not prove the monitor's key, or refused ours
        self._on_change = on_change
        self._greeting = greeting
        self._up = threading.Event()
        self._settled = threading.Event()  # the first connection attempt ended: connected, refused or failed
        self._lock = threading.Lock()
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve_serverkey is not None:
            public, secret = curve_keypair or zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve_serverkey, public, secret
        events = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_MONITOR_STOPPED
            | zmq.EVENT_CONNECT_RETRIED
            | _HANDSHAKE_FAILED
        )
        sock.connect(endpoint)
        self._sock = sock
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, args=(events,), name="interlatent-sender", daemon=True)
        self._watcher.start()

    def _watch(self, events: zmq.Socket) -> None:
        peers = 0
        try:
            while True:
                ev = recv_monitor_message(events)["event"]
                if ev == zmq.EVENT_MONITOR_STOPPED:
                    return
                if ev & _HANDSHAKE_FAILED:
                    self.handshake_failures += 1
                if ev != zmq.EVENT_HANDSHAKE_SUCCEEDED and ev != zmq.EVENT_DISCONNECTED:
                    self._settled.set()  # refused (nobody listens) or not proven: do not wait for it
                    continue
                peers = peers + 1 if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED else max(0, peers - 1)
                if (peers > 0) != self.connected:
                    self.connected = peers > 0
                    log.info("monitor at %s %s", self.endpoint, "connected" if self.connected else "gone")
                    if self._on_change is not None:
                        self._on_change(self.connected)
                    (self._up.set if self.connected else self._up.clear)()
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    if self._greeting is not None:
                        self._greet()
                    self._settled.set()
        except zmq.ZMQError:
            return  # context terminated under us at close
        finally:
            events.close(linger=0)

    def _greet(self) -> None:
        for _ in range(20):  # the new pipe may take a moment to attach; retries are not drops
            if self.send(self._greeting, 0) or self._closed:
                return
            time.sleep(0.01)
        with self._lock:
            self.drops += 1

    def wait_settled(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a monitor that already listens (True once a send would be
        taken); returns at once, False, when the first connection attempt was refused or failed."""
        deadline = time.monotonic() + timeout_s
        if not self._settled.wait(timeout_s) or not self.connected:
            return False
        return self.wait_connected(max(0.0, deadline - time.monotonic()))

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Block until a monitor is connected and a send would be taken (for scripts and tests
        that must not drop): the handshake event can come before the new pipe is attached, and a
        send in between would find no peer and count as a drop."""
        deadline = time.monotonic() + timeout_s
        if not self._up.wait(timeout_s):
            return False
        while time.monotonic() < deadline:
            with self._lock:
                if self._closed:
                    return False
                if self._sock.poll(0, zmq.POLLOUT):
                    return True
            time.sleep(0.005)
        return False

    def send(self, build: Callable[[str, int, int, int], list[Any]], records: int) -> bool:
        """Build one message with ``build(pub, seq, drops, unwatched)`` and hand it to ZeroMQ without blocking.

        On failure (no monitor, or the queue is full) the ``records`` it carried count as dropped.
        """
        with self._lock:
            if self._closed:
                self.drops += records
                return False
            parts = build(self.pub, self.seq, self.drops, self.unwatched)
            nbytes = sum(memoryview(p).nbytes for p in parts)
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=nbytes < COPY_THRESHOLD)
            except zmq.Again:
                # libzmq throttles command processing inside send, so a pipe that has just
                # attached can be missed; a zero-timeout poll processes the commands, never blocks
                try:
                    if not (self.connected and self._sock.poll(0, zmq.POLLOUT)):
                        raise zmq.Again()
                    self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=nbytes < COPY_THRESHOLD)
                except zmq.Again:
                    self.drops += records
                    return False
            self.seq += 1
            return True

    def close(self, *, linger_ms: int = 500) -> None:
        """Close the socket, giving queued messages up to ``linger_ms`` to leave."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # with IMMEDIATE nothing is queued for a peer that is not connected, so lingering costs
            # nothing then; and a connection flag that is briefly stale must not drop the last frames
            self._sock.setsockopt(zmq.LINGER, linger_ms)
            self._sock.disable_monitor()  # the watcher sees MONITOR_STOPPED and returns
        self._watcher.join(timeout=2)
        self._sock.close()
        self._ctx.term()
