"""One writer per run: a monitor serves a run only while it holds the run's lease in Redis.

The lease is ``keys.lease(run)``: the holder's id, with a TTL. A monitor takes it (SET NX PX)
when a run's first frame reaches it, and renews it inside the MULTI/EXEC that writes the run's
state, under WATCH of the lease and the run's counters: Redis refuses the whole write when either
changed, so a monitor that lost its lease (it could not renew in time, and another took the run)
writes nothing more, lets the run go from memory and counts it. The next owner restores the run
from Redis as a restarted monitor does, and the frames in between are the run's counted gaps.

A lease that expired with nobody taking it (Redis was away longer than the TTL) is taken back
only if the run's counters still name this monitor as their last writer; otherwise another
monitor wrote since and the state in memory is stale. A monitor restarted at the same host and
endpoint takes its previous incarnation's leases at once (it could bind the port, so that one is
gone). A monitor refused a run's lease marks the run wanted; the holder lets a run go that is both
wanted and quiet, so runs return to the monitor their agents moved back to. Every acquisition,
release, loss and handover is an entry in the capped stream ``keys.LEASES``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import redis

from monitor.store import keys
from monitor.store.records import Store

__all__ = ["Leases", "LeaseLost", "LEASE_S", "LEASES_MAXLEN", "lease_history", "lease_problem"]

log = logging.getLogger(__name__)

LEASES_MAXLEN = 100_000
LEASE_S = 5.0  # a run's lease lives this long unless renewed: how soon a dead monitor's runs can move
LEASE_FLUSHES = 3  # a lease lives at least this many flushes: it is renewed at every write
LEASE_MAX_S = 86_400.0


def lease_problem(lease_s: float, flush_s: float) -> str | None:
    """Why ``lease_s`` cannot be a monitor's lease with flushes every ``flush_s``, or None."""
    if not (LEASE_FLUSHES * flush_s <= lease_s * (1 + 1e-9) and lease_s <= LEASE_MAX_S):  # False for nan too
        return (
            f"must be at least {LEASE_FLUSHES} flushes ({LEASE_FLUSHES * flush_s:g} s: it is renewed at each) and at most "
            f"{LEASE_MAX_S:g} s (a killed monitor's runs wait that long), got {lease_s:g}"
        )
    return None


WRITER_FIELD = "monitor"  # the run's counters hash: the id of the monitor that wrote it last


class LeaseLost(RuntimeError):
    """Another monitor holds this run's lease now: this one must not write it."""


class Leases:
    """The leases one monitor holds. ``owner`` is unique per monitor process; its ``home`` (host
    and endpoint) is what a restart at the same address shares."""

    def __init__(self, store: Store, owner: str, home: str, *, ttl_s: float = LEASE_S, retry_s: float = 0.25) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease_s must be positive, got {ttl_s}")
        self.store, self.owner, self.home = store, owner, home
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.ttl_s = ttl_s
        self._retry_s = retry_s
        self._value = f"{home}|{owner}"
        self.held: dict[str, float] = {}  # run -> monotonic time the lease was last confirmed
        self._refused_until: dict[str, float] = {}
        self.counts: Counter[str] = Counter()  # acquired, released, lost, refused, handed_over, renewed (idle)

    # -- taking ----------------------------------------------------------------------------------
    def acquire(self, run: str) -> bool:
        """Take ``run``'s lease if it is free (or held by this monitor's previous incarnation);
        False, without asking Redis again for ``retry_s``, when another monitor holds it."""
        if run in self.held:
            return True
        now = time.monotonic()
        if now < self._refused_until.get(run, 0.0):
            self.counts["refused"] += 1
            return False
        key = keys.lease(run)
        r = self.store.r
        took = bool(r.set(key, self._value, nx=True, px=self.ttl_ms))
        if not took:
            took = self._take_from_previous(key)
        if not took:
            self._refused_until[run] = now + self._retry_s
            self.counts["refused"] += 1
            r.zadd(keys.LEASES_WANTED, {run: time.time()})  # one key for all: holders read it in one command
            return False
        self._refused_until.pop(run, None)
        self.held[run] = now
        self.counts["acquired"] += 1
        self._event(run, "acquired")
        return True

    def _take_from_previous(self, key: str) -> bool:
        with self.store.r.pipeline(transaction=True) as p:
            try:
                p.watch(key)
                holder = p.get(key)
                prev = holder.decode(errors="replace") if holder is not None else ""
                if not prev.startswith(self.home + "|") or prev == self._value:
                    return False
                p.multi()
                p.set(key, self._value, px=self.ttl_ms)
                p.execute()
                log.info("took the lease of %s from this address's previous monitor %s", key, prev)
                return True
            except redis.WatchError:
                return False

    # -- the guarded write -----------------------------------------------------------------------
    def begin(self, run: str) -> Any:
        """A MULTI pipeline for writing ``run``'s state, with the lease renewed first; the write
        fails whole (``redis.WatchError``) if the lease or the run's counters change before EXEC.
        :class:`LeaseLost` (and the run let go) when this monitor may not write it."""
        key, run_key = keys.lease(run), keys.run(run)
        p = self.store.r.pipeline(transaction=True)
        try:
            p.watch(key, run_key)
            holder = p.get(key)
            if holder is None or holder.decode(errors="replace") != self._value:
                writer = p.hget(run_key, WRITER_FIELD)
                if holder is not None or (writer is not None and writer.decode(errors="replace") != self.owner):
                    raise LeaseLost(f"run {run!r} is leased to {holder!r}, last written by {writer!r}")
            p.multi()
            p.set(key, self._value, px=self.ttl_ms)
            p.hset(run_key, WRITER_FIELD, self.owner)
        except BaseException:
            p.reset()
            raise
        return p

    def confirmed(self, run: str) -> None:
        self.held[run] = time.monotonic()

    def lost(self, run: str, why: str) -> None:
        if self.held.pop(run, None) is not None:
            self.counts["lost"] += 1
            log.warning("lost the lease of run %r (%s): no longer writing it", run, why)
            self._event(run, "lost", why=why[:200])

    def due(self, run: str) -> bool:
        """The lease of a run with nothing new to write needs renewing now (a third of its TTL gone)."""
        return time.monotonic() - self.held.get(run, 0.0) > self.ttl_s / 3

    # -- letting go ------------------------------------------------------------------------------
    def wanted(self, runs: list[str]) -> list[str]:
        """Those of ``runs`` (held here) another monitor asked for lately; one command, however many runs."""
        if not runs:
            return []
        now = time.time()
        r = self.store.r
        asked = {m.decode(errors="replace") for m in r.zrangebyscore(keys.LEASES_WANTED, now - max(2.0, 2 * self.ttl_s), "+inf")}
        if r.zcard(keys.LEASES_WANTED) > len(asked):
            r.zremrangebyscore(keys.LEASES_WANTED, "-inf", now - max(2.0, 2 * self.ttl_s))  # asks nobody repeated
        return [run for run in runs if run in asked]

    def renew(self, run: str) -> None:
        """Renew the lease of a run with nothing new to write (six commands, no state); :class:`LeaseLost`
        when another monitor holds it now."""
        p = self.begin(run)
        try:
            p.execute()
        except redis.WatchError as e:
            raise LeaseLost(f"run {run!r} changed hands during the renewal") from e
        finally:
            p.reset()
        self.confirmed(run)
        self.counts["renewed"] += 1

    def release(self, run: str, *, event: str = "released") -> None:
        """Give ``run``'s lease back (only if it is still this monitor's)."""
        if self.held.pop(run, None) is None:
            return
        key = keys.lease(run)
        with self.store.r.pipeline(transaction=True) as p:
            try:
                p.watch(key)
                holder = p.get(key)
                if holder is not None and holder.decode(errors="replace") == self._value:
                    p.multi()
                    p.delete(key)
                    p.execute()
            except redis.WatchError:
                pass
        self.counts[event] += 1
        self._event(run, event)

    def release_all(self) -> None:
        for run in list(self.held):
            try:
                self.release(run)
            except redis.RedisError:
                log.debug("could not release the lease of %r", run, exc_info=True)
                self.held.pop(run, None)

    def _event(self, run: str, event: str, **extra: Any) -> None:
        record = {"run": run, "monitor": self.owner, "home": self.home, "event": event, "time": time.time(), **extra}
        try:
            self.store.r.xadd(keys.LEASES, {"json": json.dumps(record)}, maxlen=LEASES_MAXLEN, approximate=True)
        except redis.RedisError:
            log.debug("could not record lease event %s", record, exc_info=True)


def lease_history(store: Store, run: str | None = None, count: int = LEASES_MAXLEN) -> list[dict[str, Any]]:
    """The lease events (oldest first), of one run or all."""
    out = [json.loads(f[b"json"]) for _, f in store.r.xrange(keys.LEASES, count=count)]
    return [e for e in out if run is None or e["run"] == run]
