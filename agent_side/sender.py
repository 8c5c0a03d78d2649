"""The agent's side of the socket: never blocks, counts what it could not send.

A PUSH socket connects to the monitor's PULL. With ``IMMEDIATE`` set, a message is only queued
on a completed connection, so with no monitor a send fails at once (``zmq.Again``) and the
records are counted as dropped; when the monitor is slow, the high-water mark does the same.
A socket monitor tells whether a monitor is connected, so the hooks can skip copying entirely
while nobody listens; it is polled at most every ``poll_ms``.

This libzmq (4.3.5) does not send a bound SUB's subscription to peers that connect later, so
XPUB cannot learn about a listener here; connection events are the equivalent signal.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

import zmq

__all__ = ["Sender"]

log = logging.getLogger(__name__)

_COPY_THRESHOLD = 64 * 1024


class Sender:
    """One agent process's connection to a monitor.

    ``drops`` counts records (activation rows, metric rows, episodes) not handed to ZeroMQ;
    ``seq`` numbers every message handed to ZeroMQ, so the monitor can count what was lost after.
    """

    def __init__(self, endpoint: str, *, run: str, sndhwm: int = 128, poll_ms: float = 20.0) -> None:
        self.endpoint = endpoint
        self.run = run
        self.pub = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.drops = 0
        self.connected = False
        self._poll_s = poll_ms / 1000.0
        self._next_poll = 0.0
        self._lock = threading.Lock()
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._events = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._peers = 0
        sock.connect(endpoint)
        self._sock = sock
        self._closed = False

    def listening(self) -> bool:
        """Whether a monitor is connected; cheap enough to call on every forward."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self._poll_s
            self._drain_events()
        return self.connected

    def _drain_events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        with self._lock:
            if self._closed:
                return
            while self._events.poll(0):
                ev = recv_monitor_message(self._events)["event"]
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._peers += 1
                elif ev == zmq.EVENT_DISCONNECTED:
                    self._peers = max(0, self._peers - 1)
            was = self.connected
            self.connected = self._peers > 0
        if was != self.connected:
            log.info("monitor at %s %s", self.endpoint, "connected" if self.connected else "gone")

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Block until a monitor is connected (for scripts and tests that must not drop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._next_poll = 0.0
            if self.listening():
                return True
            if time.monotonic() >= deadline:
                return False
            self._events.poll(50)

    def send(self, build: Callable[[str, int, int], list[Any]], records: int) -> bool:
        """Build one message with ``build(pub, seq, drops)`` and hand it to ZeroMQ without blocking.

        On failure (no monitor, or the queue is full) the ``records`` it carried count as dropped.
        """
        with self._lock:
            if self._closed:
                self.drops += records
                return False
            parts = build(self.pub, self.seq, self.drops)
            nbytes = sum(memoryview(p).nbytes for p in parts)
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=nbytes < _COPY_THRESHOLD)
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
            self._sock.setsockopt(zmq.LINGER, linger_ms if self.connected else 0)
            self._sock.disable_monitor()
            self._events.close(linger=0)
            self._sock.close()
        self._ctx.term()
