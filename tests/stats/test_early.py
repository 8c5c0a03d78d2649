"""Early warning: the channels that rise before failures, and how well rules foretold them."""

from __future__ import annotations

import numpy as np

from agent_side.wire import encode_act, encode_ep
from monitor.service.ingest import Monitor
from monitor.stats.analytics import AnalyticsConfig
from monitor.stats.early import evaluate_alerts
from monitor.store.records import Store


def test_evaluate_alerts_precision_recall_and_lead() -> None:
    episodes = [
        {"step": 50, "index": 0, "terminated": 1},
        {"step": 120, "index": 0, "terminated": 1},
        {"step": 200, "index": 0, "terminated": 0},
        {"step": 90, "index": 1, "terminated": 1},
    ]
    alerts = [
        {"rule": "good", "state": "firing", "step": 45, "index": 0},  # 5 before the failure at 50
        {"rule": "good", "state": "firing", "step": 110, "index": 0},  # 10 before 120
        {"rule": "good", "state": "resolved", "step": 111, "index": 0},
        {"rule": "noisy", "state": "firing", "step": 10, "index": 0},  # nothing fails within 20 steps
        {"rule": "noisy", "state": "firing", "step": 85, "index": 0},  # env 1 fails at 90, not env 0
        {"rule": "noisy", "state": "firing", "step": 80, "index": 1},  # 10 before env 1's failure
    ]
    res = evaluate_alerts(alerts, episodes, k=20)
    assert (res["episodes"], res["failures"]) == (4, 3)
    assert res["rules"]["good"] == {"alerts": 2, "precision": 1.0, "recall": round(2 / 3, 4), "median_lead_steps": 7.5}
    assert res["rules"]["noisy"] == {
        "alerts": 3,
        "precision": round(1 / 3, 4),
        "recall": round(1 / 3, 4),
        "median_lead_steps": 10,
    }


def test_monitor_suggests_the_channel_that_rises_before_failures(store: Store) -> None:
    rng = np.random.default_rng(0)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", analytics=AnalyticsConfig(window_steps=200, early_k=10))
    try:
        seq, step = 0, 0
        for _ in range(12):
            length = int(rng.integers(40, 80))
            x = rng.normal(0, 1, (length, 4)).astype(np.float32)
            x[-10:, 2] += 4.0  # channel 2 rises over the last 10 steps of every failing episode
            steps = np.arange(step, step + length)
            pos = np.stack([steps, np.zeros_like(steps)], axis=1)
            # the agent's order: the episode end can arrive before the last rows of the tap
            mon.handle(encode_act("r", "p", seq, 0, "h:out", x[:-5], pos[:-5]))
            mon.handle(encode_ep("r", "p", seq + 1, 0, [[steps[-1], 0, float(length), length, 1, 0]]))
            mon.handle(encode_act("r", "p", seq + 2, 0, "h:out", x[-5:], pos[-5:]))
            seq += 3
            step += length
        mon.flush(final=True)
        (best, *_) = store.suggestions("r")
        assert (best["channel"], best["direction"], best["failures"], best["moved_in"]) == (2, "above", 12, 1.0)
        assert best["rule"]["kind"] == "threshold" and best["rule"]["channels"] == [2] and best["rule"]["tap"] == "h:out"
        assert 0.5 < best["rule"]["above"] < 4.0
        assert best["score_std"] > 1.5  # in lifetime std, which the rise itself inflates
    finally:
        mon.close()
