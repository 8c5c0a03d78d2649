"""Where alerts go: a Redis stream (panel, `interlatent alerts --follow`), webhooks, the log.

Each webhook is a :class:`~monitor.alerts.receivers.Receiver` with its own bounded queue and
thread, so a dead or slow endpoint can never stall the monitor or another webhook: what does not
fit is dropped and counted, per receiver.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any

import redis

from monitor.alerts.receivers import Receiver
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
        self.unstored = 0  # events Redis could not take (the log has each)
        self.receivers = tuple(Receiver(hook, queue_size=queue_size) for hook in webhooks)

    # events over every receiver (each receiver counts its own: Receiver.sent, .failed, .dropped)
    @property
    def webhook_sent(self) -> int:
        return sum(r.sent for r in self.receivers)

    @property
    def webhook_failed(self) -> int:
        return sum(r.failed for r in self.receivers)

    @property
    def webhook_dropped(self) -> int:
        return sum(sum(r.dropped.values()) for r in self.receivers)

    def emit(self, alert: dict[str, Any]) -> None:
        """Record one alert event everywhere it goes; never raises."""
        self.counts[f"{alert['rule']}|{alert['state']}"] += 1
        (log.warning if alert["state"] == "firing" else log.info)("alert: %s", alert["text"])
        state = alert["state"]
        try:
            p = self.r.pipeline(transaction=False)
            p.xadd(keys.ALERTS, {"json": json.dumps(alert)}, maxlen=ALERTS_MAXLEN, approximate=True)
            if state in ("pending", "firing"):  # what is active now, and survives a monitor restart
                p.hset(keys.ALERTS_ACTIVE, alert["id"], json.dumps(alert))
            else:
                p.hdel(keys.ALERTS_ACTIVE, alert["id"])
            p.hincrby(keys.ALERTS_COUNT, f"{alert['rule']}|{state}", 1)
            p.execute()
        except redis.RedisError as e:
            self.unstored += 1
            log.warning("could not store alert %s (%d unstored so far): %s", alert["id"], self.unstored, e)
        if state not in ("pending", "inactive"):  # as Alertmanager: receivers hear firing and resolved (and steering)
            for receiver in self.receivers:
                receiver.offer(alert)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the receivers, giving what they hold up to ``timeout_s`` in all; the rest is counted dropped."""
        deadline = time.monotonic() + timeout_s
        for receiver in self.receivers:
            receiver.stop(deadline)
        for receiver in self.receivers:
            receiver.join(deadline)
