"""A recording replayed through alert rules, as the monitor would have evaluated them live.

Rows go through the rules in step order, a chunk of steps at a time: activation rows first (the
threshold, zscore and wake rules), then the same steps' metric rows, which are paired with them so
corr_flip rules see the correlation the monitor would have had. The run ends at the last step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.alerts.engine import AlertEngine
from monitor.alerts.rules import RulesFile
from monitor.stats.analytics import AnalyticsConfig, Joiner, TapAnalytics
from monitor.store.recording import Recording

__all__ = ["replay_rules"]


def replay_rules(
    rules: RulesFile, rec: Recording, *, run: str, analytics: AnalyticsConfig | None = None, chunk: int = 256
) -> list[dict[str, Any]]:
    """Every event (pending, firing, resolved, inactive) the rules raise over the recording, in order."""
    cfg = analytics or AnalyticsConfig()
    engine = AlertEngine(rules)
    taps = {name: rec.tap(name) for name in rec.taps}
    met, met_pos = rec.metrics()
    names = rec.metric_names
    joiner = Joiner(names, capacity=max(8192, 4 * cfg.window_steps))
    tap_an = {t: TapAnalytics(d.shape[1], names, cfg) for t, (d, _) in taps.items() if names and d.shape[1] <= cfg.max_channels}
    last = max([int(p[:, 0].max()) for _, p in taps.values() if len(p)] + [int(met_pos[:, 0].max()) if len(met_pos) else -1])
    events: list[dict[str, Any]] = []
    for lo in range(0, last + 1, chunk):
        hi = lo + chunk
        for t, (d, p) in taps.items():
            at = (p[:, 0] >= lo) & (p[:, 0] < hi)
            if at.any():
                rows, pos = d[at], p[at]
                order = np.lexsort((pos[:, 1], pos[:, 0]))
                rows, pos = rows[order], pos[order]
                events += engine.on_rows(run, t, rows, pos, tap_an.get(t))
                if t in tap_an:
                    tap_an[t].offer(rows, pos, joiner)
        at = (met_pos[:, 0] >= lo) & (met_pos[:, 0] < hi)
        if names and at.any():
            joiner.add(met[at], met_pos[at], names)
            for t, an in tap_an.items():
                an.retry(joiner)
                events += engine.on_paired(run, t, an, an.rolling.newest)
    events += engine.end_run(run, last, "the recording ended")
    return events
