"""When the monitor files explain jobs by itself: a latent has enough paired examples, it first
fires an alert, or its correlations drift by more than ``drift`` since it was last filed."""

from __future__ import annotations

import logging

import numpy as np
import redis

from monitor.store.jobs import file_job

__all__ = ["JobFiler"]

log = logging.getLogger(__name__)


class JobFiler:
    def __init__(self, r: redis.Redis, *, min_examples: int = 500, drift: float = 0.3, prefix: str = "latents:") -> None:
        self.r = r
        self.min_examples = min_examples
        self.drift = drift
        self.prefix = prefix  # only these taps are explained unasked (raw taps: `interlatent explain`)
        self.filed_corr: dict[tuple[str, str], np.ndarray] = {}  # corr matrix when last filed
        self.alerted: set[tuple[str, str, int]] = set()
        self.written: set[tuple[str, str]] = set()  # taps whose analytics are in Redis (the explainer needs them)
        self.deferred: dict[tuple[str, str], set[int]] = {}  # alerted before that: filed once they are

    def on_analytics(self, run: str, tap: str, paired: int, corr: np.ndarray) -> int:
        """Called when a tap's analytics are written; returns jobs filed."""
        if paired > 0:
            self.written.add((run, tap))
            for latent in sorted(self.deferred.pop((run, tap), ())):
                file_job(self.r, run, tap, latent, reason="first alert")
        if not tap.startswith(self.prefix) or paired < self.min_examples:
            return 0
        key = (run, tap)
        before = self.filed_corr.get(key)
        if before is None:
            channels = range(corr.shape[0])
            reason = "enough examples"
        else:
            delta = np.nan_to_num(np.abs(corr - before), nan=0.0).max(axis=1)
            channels = np.nonzero(delta > self.drift)[0]
            reason = "correlations drifted"
        n = sum(file_job(self.r, run, tap, int(c), reason=reason) for c in channels)
        if before is None or n:
            self.filed_corr[key] = corr.copy()
        if n:
            log.info("filed %d explain jobs for %s %s (%s)", n, run, tap, reason)
        return n

    def on_alert(self, run: str, tap: str, latent: int) -> bool:
        key = (run, tap, latent)
        if key in self.alerted:
            return False
        self.alerted.add(key)
        if (run, tap) not in self.written:  # an alert in a run's first moments: its analytics are not written yet
            self.deferred.setdefault((run, tap), set()).add(latent)
            return False
        return file_job(self.r, run, tap, latent, reason="first alert")
