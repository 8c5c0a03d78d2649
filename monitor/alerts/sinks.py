"""Where alerts go: a Redis stream (panel, `interlatent alerts --follow`), webhooks, the log.

Webhooks are posted from a background thread through a bounded queue with bounded retries, so
a dead or slow endpoint can never stall the monitor: what does not fit is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import redis

from monitor.alerts.rules import Webhook
from monitor.store import keys

__all__ = ["AlertSink", "ALERTS_MAXLEN"]

log = logging.getLogger(__name__)

ALERTS_MAXLEN = 10_000


class AlertSink:
    def __init__(self, client: redis.Redis, webhooks: tuple[Webhook, ...] = (), *, queue_size: int = 1000) -> None:
        self.r = client
        self.webhooks = webhooks
        self.counts: Counter[str] = Counter()  # "rule|state" -> events
        self.webhook_sent = 0
        self.webhook_failed = 0
        self.webhook_dropped = 0
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        if webhooks:
            self._thread = threading.Thread(target=self._post_loop, name="interlatent-webhooks", daemon=True)
            self._thread.start()

    def emit(self, alert: dict[str, Any]) -> None:
        """Record one alert event everywhere it goes; never raises."""
        self.counts[f"{alert['rule']}|{alert['state']}"] += 1
        (log.warning if alert["state"] == "firing" else log.info)("alert: %s", alert["text"])
        try:
            p = self.r.pipeline(transaction=False)
            p.xadd(keys.ALERTS, {"json": json.dumps(alert)}, maxlen=ALERTS_MAXLEN, approximate=True)
            if alert["state"] == "firing":
                p.hset(keys.ALERTS_ACTIVE, alert["id"], json.dumps(alert))
            else:
                p.hdel(keys.ALERTS_ACTIVE, alert["id"])
            p.hincrby(keys.ALERTS_COUNT, f"{alert['rule']}|{alert['state']}", 1)
            p.execute()
        except redis.RedisError as e:
            log.warning("could not store alert %s: %s", alert["id"], e)
        if self.webhooks:
            try:
                self._q.put_nowait(alert)
            except queue.Full:
                self.webhook_dropped += 1

    def _post_loop(self) -> None:
        while True:
            alert = self._q.get()
            if alert is None:
                return
            body = json.dumps({"text": alert["text"], "alert": alert}).encode()
            for hook in self.webhooks:
                self._post(hook, body)

    def _post(self, hook: Webhook, body: bytes) -> None:
        for attempt in range(hook.retries + 1):
            try:
                req = urllib.request.Request(hook.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(req, timeout=hook.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        self.webhook_sent += 1
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                err = e
            else:
                err = RuntimeError("non-2xx reply")
            if attempt < hook.retries:
                time.sleep(min(2.0, 0.1 * 2**attempt))
        self.webhook_failed += 1
        log.warning("webhook %s failed after %d tries: %s", hook.url, hook.retries + 1, err)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the webhook thread, giving queued posts up to ``timeout_s``."""
        if self._thread is not None:
            try:
                self._q.put(None, timeout=timeout_s)
            except queue.Full:
                pass
            self._thread.join(timeout=timeout_s)
            self._thread = None
