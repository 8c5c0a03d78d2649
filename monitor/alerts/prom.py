"""``/metrics`` for Prometheus, served by prometheus_client from a thread of the monitor's process.

One :class:`MonitorCollector` on its own registry reads the monitor's plain attributes at scrape
time (no locks: a value a frame old is fine), so every series exists from the first scrape:

- ``mon.frames``, ``mon.rows``, ``mon.rejected`` (reason -> n), ``mon.lag_s``;
- ``mon.runs`` (values with ``.run``, ``.steps``, ``.drops``, ``.gaps``, and where present ``.unwatched``,
  ``.early_dropped``, ``.lost``); ``mon.outbox`` (``.dropped`` kind -> n, ``.pending_bytes``);
- ``mon.alerts`` (the engine: ``.rules.rules``, ``.counts()`` or else ``.active()``), ``mon.sink`` (``.counts``,
  ``.receivers``), ``mon.encoders.broken``; each may be missing or None.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["serve_metrics", "render", "MonitorCollector", "MetricsPortError", "DEFAULT_PORT"]

log = logging.getLogger(__name__)

# Prometheus's exporter range (9100-9999, github.com/prometheus/prometheus/wiki/Default-port-allocations)
# is fully allocated, 9108 to the Graphite exporter; 5559 follows the monitor's own 5557 (data) and 5558 (control).
DEFAULT_PORT = 5559

EVENT_STATES = ("firing", "pending", "resolved", "inactive")  # alert events pre-created per rule (others appear once counted)
ACTIVE_STATES = ("firing", "pending")  # the states AlertEngine.active() reports

T = TypeVar("T")


class MetricsPortError(OSError):
    """``/metrics`` could not listen (the port is taken, or the address is not this host's)."""


def _read(fn: Callable[[], T]) -> T:
    """``fn()``, read again when the monitor thread changed a dict under it (RuntimeError)."""
    for _ in range(4):
        try:
            return fn()
        except RuntimeError:
            continue
    return fn()


def _copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return _read(lambda: dict(d))


class MonitorCollector(Collector):
    """The monitor's counters and gauges, built from its attributes at each scrape."""

    def __init__(self, mon: Any) -> None:
        self.mon = mon

    def collect(self) -> Iterable[Metric]:
        mon = self.mon
        runs = _read(lambda: list(mon.runs.values()))
        yield GaugeMetricFamily("interlatent_up", "1 while the monitor serves", value=1)
        yield CounterMetricFamily("interlatent_frames", "frames received, accepted or not", value=mon.frames)
        yield CounterMetricFamily("interlatent_rows", "rows accepted", value=mon.rows)
        rejected = CounterMetricFamily("interlatent_rejected", "frames rejected, by reason", labels=["reason"])
        for reason, n in sorted(_copy(mon.rejected).items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily(
            "interlatent_ingest_lag_seconds", "receive time minus send time of the last frame", value=mon.lag_s
        )
        steps = GaugeMetricFamily("interlatent_run_steps", "steps seen per run", labels=["run"])
        drops = CounterMetricFamily("interlatent_run_drops", "records the agent could not send, per run", labels=["run"])
        gaps = CounterMetricFamily("interlatent_run_gaps", "messages lost in transit, per run", labels=["run"])
        unwatched = CounterMetricFamily(
            "interlatent_run_unwatched", "steps the agent ran with no monitor connected, per run", labels=["run"]
        )
        early = CounterMetricFamily(
            "interlatent_run_early_dropped", "rows let go past the pre-metrics buffer's byte budget, per run", labels=["run"]
        )
        lost = CounterMetricFamily(
            "interlatent_run_lost", "records the full outbox let go while Redis was away, per run", labels=["run", "kind"]
        )
        for st in runs:
            steps.add_metric([st.run], st.steps)
            drops.add_metric([st.run], st.drops)
            gaps.add_metric([st.run], st.gaps)
            unwatched.add_metric([st.run], getattr(st, "unwatched", 0))
            early.add_metric([st.run], getattr(st, "early_dropped", 0))
            for kind in ("episodes", "tokens"):
                lost.add_metric([st.run, kind], _copy(getattr(st, "lost", {})).get(kind, 0))
        yield from (steps, drops, gaps, unwatched, early, lost)
        outbox = getattr(mon, "outbox", None)
        dropped = CounterMetricFamily(
            "interlatent_outbox_dropped", "records not written to Redis: the outbox was full (by kind)", labels=["kind"]
        )
        held = _copy(outbox.dropped) if outbox is not None else {}
        for kind in sorted({"episodes", "tokens", "control", *held}):
            dropped.add_metric([kind], held.get(kind, 0))
        yield dropped
        yield GaugeMetricFamily(
            "interlatent_outbox_pending_bytes",
            "memory held by records waiting for Redis",
            value=outbox.pending_bytes if outbox is not None else 0,
        )
        leases = getattr(mon, "leases", None)
        yield GaugeMetricFamily(
            "interlatent_leases_held", "runs this monitor holds the lease of (serves)", value=len(leases.held) if leases else 0
        )
        events = CounterMetricFamily(
            "interlatent_lease_events", "lease acquisitions, releases, losses and handovers", labels=["event"]
        )
        counts = _copy(leases.counts) if leases is not None else {}
        for ev in sorted({"acquired", "released", "lost", "handed_over", "refused", "renewed", *counts}):
            events.add_metric([ev], counts.get(ev, 0))
        yield events
        yield from self._alerts()
        yield from self._webhooks()
        encoders = getattr(mon, "encoders", None)
        broken = len(_copy(encoders.broken)) if encoders is not None else 0
        yield GaugeMetricFamily(
            "interlatent_transcoders_broken", "registered transcoders that cannot load or encode", value=broken
        )

    def _alerts(self) -> Iterable[Metric]:
        engine = getattr(self.mon, "alerts", None)
        sink = getattr(self.mon, "sink", None)
        rules = [r.name for r in engine.rules.rules] if engine is not None else []
        events: Counter[tuple[str, str]] = Counter({(r, s): 0 for r in rules for s in EVENT_STATES})
        if sink is not None:
            for key, n in _copy(sink.counts).items():
                rule, _, state = key.partition("|")
                events[(rule, state)] += n
        total = CounterMetricFamily("interlatent_alerts", "alert events by rule and state", labels=["rule", "state"])
        for (rule, state), n in sorted(events.items()):
            total.add_metric([rule, state], n)
        yield total
        unstored = getattr(sink, "unstored", 0) if sink is not None else 0
        yield CounterMetricFamily("interlatent_alerts_unstored", "alert events Redis could not take", value=unstored)
        now: Counter[tuple[str, str]] = Counter({(r, s): 0 for r in rules for s in ACTIVE_STATES})
        counts = getattr(engine, "counts", None)
        if callable(counts):  # rule -> {"pending": n, "firing": n}
            for rule, by_state in _read(counts).items():
                for state, n in by_state.items():
                    now[(rule, state)] += n
        elif engine is not None:  # an engine without counts(): one entry per active channel
            for a in _read(engine.active):
                now[(a["rule"], a["state"])] += 1
        active = GaugeMetricFamily(
            "interlatent_alerts_active", "channels pending or firing now, by rule", labels=["rule", "state"]
        )
        for (rule, state), n in sorted(now.items()):
            active.add_metric([rule, state], n)
        yield active

    def _webhooks(self) -> Iterable[Metric]:
        receivers = getattr(getattr(self.mon, "sink", None), "receivers", ())
        sent = CounterMetricFamily("interlatent_webhook_sent", "alert events delivered, per receiver", labels=["receiver"])
        failed = CounterMetricFamily(
            "interlatent_webhook_failed", "alert events whose POST failed after every retry", labels=["receiver"]
        )
        dropped = CounterMetricFamily(
            "interlatent_webhook_dropped", "alert events never posted (queue_full, shutdown)", labels=["receiver", "reason"]
        )
        posts = CounterMetricFamily(
            "interlatent_webhook_posts", "POSTs by result, repeats included", labels=["receiver", "result"]
        )
        pending = GaugeMetricFamily("interlatent_webhook_pending", "alert events queued or being sent", labels=["receiver"])
        for r in receivers:
            sent.add_metric([r.name], r.sent)
            failed.add_metric([r.name], r.failed)
            for reason, n in sorted(_copy(r.dropped).items()):
                dropped.add_metric([r.name, reason], n)
            posts.add_metric([r.name, "sent"], r.posts_sent)
            posts.add_metric([r.name, "failed"], r.posts_failed)
            pending.add_metric([r.name], r.pending)
        yield from (sent, failed, dropped, posts, pending)


def _registry(mon: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(MonitorCollector(mon))
    ProcessCollector(registry=registry)  # the monitor's own CPU and memory (Linux; empty elsewhere)
    return registry


def render(mon: Any) -> str:
    """The text a scrape of ``mon`` returns now."""
    return generate_latest(_registry(mon)).decode()


def serve_metrics(mon: Any, port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve ``/metrics`` for ``mon`` on ``host:port`` (0: any free port) from a daemon thread.

    Returns the server (``server_address[1]`` is the port; ``shutdown()`` then ``server_close()``
    stop it). Raises :class:`MetricsPortError` (an OSError) with a one-line message when it
    cannot listen.
    """
    try:
        server, _ = start_http_server(port, addr=host, registry=_registry(mon))
    except OSError as e:
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        err = MetricsPortError(f"cannot serve /metrics on {host}:{port}: {why}")  # one argument: str() is the line
        err.errno = e.errno
        raise err from e
    log.info("serving /metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
