"""A run's state in Redis: what the monitor writes every flush, and reads back when a run it does
not hold returns (after a restart, or an eviction). The store itself only reads and writes
records; rates, rule suggestions and job filing are decided here, beside the service."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import numpy as np
import redis

from monitor.service.leases import LeaseLost, Leases
from monitor.service.runstate import MetricState, RunState, TapState
from monitor.service.runstate import recent_rows as tap_recent_rows
from monitor.stats.analytics import AnalyticsConfig
from monitor.stats.early import suggest_rules
from monitor.stats.moments import Moments, Recent
from monitor.store import keys
from monitor.store.records import EPISODES_MAXLEN, Store, pack_recent, unpack_analytics, unpack_recent

__all__ = ["load_run", "write_run"]


def write_run(
    store: Store, st: RunState, *, analytics: bool = True, on_analytics: Any = None, leases: Leases | None = None
) -> None:
    """Write one run's registry entry, counters, taps, statistics and recent rows
    (and, with ``analytics``, every tap's live analytics).

    At least once: the run's outbox (episodes, tokens) is let go only after the write succeeded,
    so a write that fails (Redis away) is sent again whole by the next flush. The write is one
    MULTI/EXEC: a connection lost before EXEC applies none of it; a reply lost after, or a command
    Redis refuses inside it (a key of the wrong type), can make the next flush write records twice.

    With ``leases`` the write renews the run's lease in the same transaction and is refused whole
    (:class:`LeaseLost`) when another monitor holds the run. Every key written here carries the
    run's hash tag, so on a Redis Cluster the transaction is one slot's; the run registry, a global
    key, is updated after it."""
    p = leases.begin(st.run) if leases is not None else store.r.pipeline(transaction=True)
    mean_ret = float(np.mean(st.returns)) if st.returns else 0.0
    st.rates(time.time())
    p.hset(
        keys.run(st.run),
        mapping={
            "steps": st.steps,
            "gaps": st.gaps,
            "frames": st.frames,
            "episodes": st.episodes,
            "first_seen": st.first_seen,
            "last_seen": st.last_seen,
            "return_mean_100": mean_ret,
            "returns": json.dumps(st.returns),
            "rows": st.rows,
            "lag_s": round(st.lag_s, 4),
            "steps_per_s": round(st.steps_per_s, 2),
            "rows_per_s": round(st.rows_per_s, 2),
            "lost_episodes": st.lost["episodes"],
            "lost_tokens": st.lost["tokens"],
            "early_dropped": st.early_dropped,
            "unwatched": st.unwatched,
            "greetings": st.greetings,
        },
    )
    changed = {t: s for t, s in st.taps.items() if s.dirty}
    if changed:
        p.hset(keys.run_taps(st.run), mapping={t: json.dumps(s.info()) for t, s in changed.items()})
        for tap, s in changed.items():
            p.set(keys.tap_stats(st.run, tap), msgpack.packb(s.moments.to_state(), use_bin_type=True))
            p.set(keys.recent(st.run, tap), pack_recent(s.recent))
    if st.pubs:
        p.hset(keys.run_pubs(st.run), mapping={k: json.dumps(v) for k, v in st.pubs.items()})
    if st.metrics.names:
        m = st.metrics
        p.set(
            keys.run_metrics(st.run),
            msgpack.packb(
                {
                    "names": m.names,
                    "rows": m.rows,
                    "moments": {n: m.moments[n].to_state() for n in m.names},
                    "recent": [{"names": list(k), "blob": pack_recent(r)} for k, r in m.recent.items()],
                },
                use_bin_type=True,
            ),
        )
    if analytics and st.analytics_dirty:
        for tap, an in st.analytics.items():
            p.set(keys.analytics(st.run, tap), msgpack.packb(an.to_state(), use_bin_type=True))
        suggested = []
        for tap, prof in st.failure_profiles.items():
            mom = st.taps[tap].moments.get()
            suggested += suggest_rules(tap, prof, mom["mean"], mom["std"])
        if suggested:
            p.set(keys.suggestions(st.run), json.dumps(sorted(suggested, key=lambda x: -x["score_std"])))
    evicted, tokens, episodes = list(st.evicted_tokens), dict(st.new_tokens), list(st.new_episodes)
    if evicted:  # before the new ones: a step evicted once may have come again
        p.hdel(keys.tokens(st.run), *map(str, evicted))
    if tokens:
        p.hset(keys.tokens(st.run), mapping={str(k): v for k, v in tokens.items()})
    for e in episodes:
        p.xadd(
            keys.episodes(st.run),
            {
                "step": int(e[0]),
                "index": int(e[1]),
                "return": e[2],
                "length": int(e[3]),
                "terminated": int(e[4]),
                "truncated": int(e[5]),
            },
            maxlen=EPISODES_MAXLEN,
            approximate=True,
        )
    try:
        p.execute()
    except redis.WatchError as e:  # the lease or the run's counters changed under the write: none of it applied
        raise LeaseLost(f"run {st.run!r} changed hands during the write") from e
    if leases is not None:
        leases.confirmed(st.run)
    st.written(len(episodes), tokens, len(evicted))
    store.r.zadd(keys.RUNS, {st.run: st.last_seen})
    if analytics and st.analytics_dirty and on_analytics is not None:
        for tap, an in st.analytics.items():  # after the write: a job filed here finds the analytics in Redis
            on_analytics(st.run, tap, an)
    if analytics:
        st.analytics_dirty = False
    for s in changed.values():
        s.dirty = False
    st.dirty = False


def _restore_recent(blob: bytes | None, capacity: int, width: int, dtype: Any) -> Recent:
    ring = Recent(capacity, width, dtype)
    if blob:
        data, pos = unpack_recent(blob)
        if data.ndim == 2 and data.shape[1] == width:
            ring.update(data.astype(dtype, copy=False), pos)
    return ring


def load_run(store: Store, run: str, *, recent_rows: int, analytics_cfg: AnalyticsConfig | None = None) -> RunState | None:
    """A run's state as the last monitor left it (with ``analytics_cfg``, its live analytics too),
    or None for a new run. Two pipelined round trips, whatever the number of taps."""
    p = store.r.pipeline(transaction=False)
    for key in (keys.run(run), keys.run_pubs(run), keys.run_taps(run)):
        p.hgetall(key)
    p.get(keys.run_metrics(run))
    p.hkeys(keys.tokens(run))
    h_raw, pubs, taps_raw, metrics_blob, token_keys = p.execute()
    h = {k.decode(): v.decode() for k, v in h_raw.items()}
    if not h:
        return None
    st = RunState(
        run=run,
        steps=int(h.get("steps", 0)),
        gaps=int(h.get("gaps", 0)),
        frames=int(h.get("frames", 0)),
        episodes=int(h.get("episodes", 0)),
        first_seen=float(h.get("first_seen", time.time())),
        last_seen=float(h.get("last_seen", 0.0)),
        returns=json.loads(h.get("returns", "[]")),
        rows=int(h.get("rows", 0)),
        early_dropped=int(h.get("early_dropped", 0)),
        greetings=int(h.get("greetings", 0)),
    )
    st.lost.update({k: int(h[f"lost_{k}"]) for k in ("episodes", "tokens") if int(h.get(f"lost_{k}", 0))})
    st.pubs = {k.decode(): json.loads(v) for k, v in pubs.items()}
    infos = {t.decode(): json.loads(v) for t, v in taps_raw.items()}
    p = store.r.pipeline(transaction=False)
    for tap in infos:
        p.get(keys.tap_stats(run, tap))
        p.get(keys.recent(run, tap))
        p.get(keys.analytics(run, tap))
    blobs = p.execute() if infos else []
    kept: dict[str, dict[str, Any]] = {}
    for i, (tap, info) in enumerate(infos.items()):
        mom, recent, analytics = blobs[3 * i : 3 * i + 3]
        st.taps[tap] = TapState(
            width=info["width"],
            dtype=info["dtype"],
            rows=info["rows"],
            frames=info["frames"],
            lead=info.get("lead", []),
            moments=Moments.from_state(msgpack.unpackb(mom, raw=False)) if mom else Moments(info["width"]),
            recent=_restore_recent(recent, min(recent_rows, tap_recent_rows(info["width"])), info["width"], np.float32),
        )
        if analytics:
            kept[tap] = unpack_analytics(analytics)
    if metrics_blob:
        d = msgpack.unpackb(metrics_blob, raw=False)
        st.metrics = MetricState(
            names=d["names"], rows=d["rows"], moments={n: Moments.from_state(s) for n, s in d["moments"].items()}
        )
        for item in d["recent"]:
            st.metrics.recent[tuple(item["names"])] = _restore_recent(item["blob"], recent_rows, len(item["names"]), np.float64)
    st.tokens = dict.fromkeys(sorted(int(k) for k in token_keys))
    if analytics_cfg is not None:
        st.analytics_cfg = analytics_cfg
        st.restore_analytics(kept)
    return st
