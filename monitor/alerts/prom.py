"""``/metrics`` in the Prometheus text format, served from a thread of the monitor's process."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["serve_metrics", "render"]

log = logging.getLogger(__name__)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(mon: Any) -> str:
    """The monitor's counters as Prometheus text (reads plain attributes; no locks needed)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    runs = list(mon.runs.values())
    metric("interlatent_up", "gauge", "1 while the monitor loop runs", [({}, 1)])
    metric("interlatent_frames_total", "counter", "frames received, accepted or not", [({}, mon.frames)])
    metric("interlatent_rows_total", "counter", "rows accepted", [({}, mon.rows)])
    metric(
        "interlatent_rejected_total",
        "counter",
        "frames rejected, by reason",
        [({"reason": k}, v) for k, v in dict(mon.rejected).items()],
    )
    metric(
        "interlatent_ingest_lag_seconds", "gauge", "receive time minus send time of the last frame", [({}, round(mon.lag_s, 6))]
    )
    metric("interlatent_run_steps", "gauge", "steps seen per run", [({"run": st.run}, st.steps) for st in runs])
    metric(
        "interlatent_run_drops",
        "gauge",
        "records the agent could not send, per run",
        [({"run": st.run}, st.drops) for st in runs],
    )
    metric(
        "interlatent_run_gaps_total", "counter", "messages lost in transit, per run", [({"run": st.run}, st.gaps) for st in runs]
    )
    if mon.sink is not None:
        metric(
            "interlatent_alerts_total",
            "counter",
            "alert events by rule and state",
            [({"rule": k.split("|")[0], "state": k.split("|")[1]}, v) for k, v in dict(mon.sink.counts).items()],
        )
        metric(
            "interlatent_webhook_failures_total",
            "counter",
            "webhook posts that failed after retries",
            [({}, mon.sink.webhook_failed)],
        )
        metric(
            "interlatent_webhook_dropped_total",
            "counter",
            "alerts not posted because the queue was full",
            [({}, mon.sink.webhook_dropped)],
        )
    return "\n".join(lines) + "\n"


def serve_metrics(mon: Any, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``/metrics`` for ``mon`` on ``host:port`` in a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics here")
                return
            try:
                body = render(mon).encode()
            except RuntimeError:  # a dict changed size while read: the next scrape gets it
                self.send_error(503, "busy, try again")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("metrics: " + fmt, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="interlatent-metrics", daemon=True).start()
    log.info("serving /metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
