"""Nothing waits forever: `interlatent record` notices its monitor died (by its health key) and
stops with a reason; the next monitor fails the orphaned request with one."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from helpers import AGENT_DIR, free_endpoint, spawn, spawn_monitor, wait_until

from monitor.store.records import Store


@pytest.mark.timeout(240)
def test_record_stops_when_its_monitor_dies_and_the_next_monitor_fails_the_request(
    redis_url: str, store: Store, tmp_path: Path
) -> None:
    """Before: `record` polled the request forever once its monitor was gone, and a new monitor
    left the request "recording" for good."""
    ep = free_endpoint()
    data = ["--data-dir", str(tmp_path)]
    mon = spawn_monitor(redis_url, ep, *data)
    agent = spawn(
        [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "200000", "--run", "rec", "--sleep-ms", "2"],
        stdout=subprocess.DEVNULL,
    )
    record = None
    try:
        wait_until(lambda: "rec" in store.runs(), timeout_s=60, what="the run")
        record = spawn(
            ["-m", "monitor", "record", "--redis", redis_url, *data, "--run", "rec", "--steps", "1000000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: store.record_requests().get("rec", {}).get("recorded", 0) > 0, timeout_s=60, what="recording")
        by = store.record_requests()["rec"]["monitor"]
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        _, err = record.communicate(timeout=120)  # health TTL (5 s) + MONITOR_GONE_S (15 s), with room
        assert record.returncode == 2 and "Traceback" not in err
        line = [x for x in err.splitlines() if x.startswith("interlatent:")][-1]
        assert by in line and "no health key" in line
        mon = spawn_monitor(redis_url, ep, *data)
        req = wait_until(
            lambda: (q := store.record_requests()["rec"]).get("state") == "failed" and q, timeout_s=60, what="the request failed"
        )
        assert by in req["error"] and "stopped after" in req["error"] and req["path"] in req["error"]
    finally:
        for p in (agent, record, mon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
