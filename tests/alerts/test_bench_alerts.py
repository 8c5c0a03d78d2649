"""`interlatent bench alerts`: every planted spike is stored and posted, and latencies are reported
(their values are the benchmark's to report, not a test's to assert)."""

from __future__ import annotations

from monitor.tools.bench import bench_alerts


def test_every_planted_alert_reaches_redis_and_the_webhook() -> None:
    res = bench_alerts(alerts=40, every=5, rate=1000.0, flush_ms=(10.0,))
    (v,) = res["variants"]
    assert v["alerts_planted"] == v["alerts_stored"] == v["alerts_posted"] == 40
    for where in ("redis_ms", "webhook_ms"):
        q = v[where]
        assert q["p50"] is not None and 0 < q["p50"] <= q["p99"] <= q["max"]
