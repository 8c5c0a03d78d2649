"""/metrics: scraped over real HTTP, parsed by prometheus_client's own parser, every series there from the start."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
from helpers import free_endpoint, wait_until
from prometheus_client.parser import text_string_to_metric_families

from agent_side.wire import encode_act
from monitor.alerts.prom import MetricsPortError, serve_metrics
from monitor.alerts.rules import parse_rules
from monitor.service.ingest import Monitor
from monitor.store.records import Store


def _scrape(port: int) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """family name -> (type, {sorted labels: value}) of the samples named like the family (plus _total)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        names = {fam.name, fam.name + "_total"}
        out[fam.name] = (fam.type, {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name in names})
    return out


def _pos(steps: list[int]) -> np.ndarray:
    s = np.asarray(steps)
    return np.stack([s, np.zeros_like(s)], axis=1).astype(np.int64)


def test_every_series_is_there_from_the_start_and_counts_up(store: Store) -> None:
    dead = free_endpoint().replace("tcp://", "http://") + "/hook"  # nothing listens: every POST fails
    rules = parse_rules(
        {
            "rules": [{"name": "hot", "kind": "threshold", "above": 0.5}, {"name": "spiky", "kind": "zscore"}],
            "webhooks": [{"url": dead, "name": "ops", "retries": 0, "group_wait": 0}],
        }
    )
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    server = serve_metrics(mon, 0)
    port = server.server_address[1]
    zero = {(r, s): 0.0 for r in ("hot", "spiky") for s in ("firing", "pending", "resolved", "inactive")}
    try:
        m = _scrape(port)
        assert m["interlatent_up"] == ("gauge", {(): 1.0})
        assert m["interlatent_frames"] == ("counter", {(): 0.0}) and m["interlatent_rows"] == ("counter", {(): 0.0})
        assert m["interlatent_alerts"] == ("counter", {(("rule", r), ("state", s)): v for (r, s), v in zero.items()})
        active = {(("rule", r), ("state", s)): 0.0 for r in ("hot", "spiky") for s in ("firing", "pending")}
        assert m["interlatent_alerts_active"] == ("gauge", active)
        assert m["interlatent_webhook_sent"] == ("counter", {(("receiver", "ops"),): 0.0})
        assert m["interlatent_webhook_failed"] == ("counter", {(("receiver", "ops"),): 0.0})
        assert m["interlatent_webhook_dropped"] == (
            "counter",
            {(("reason", "queue_full"), ("receiver", "ops")): 0.0, (("reason", "shutdown"), ("receiver", "ops")): 0.0},
        )
        assert m["interlatent_webhook_posts"][1] == {(("receiver", "ops"), ("result", r)): 0.0 for r in ("failed", "sent")}
        assert m["interlatent_webhook_pending"] == ("gauge", {(("receiver", "ops"),): 0.0})
        assert m["interlatent_transcoders_broken"] == ("gauge", {(): 0.0})
        assert m["interlatent_alerts_unstored"] == ("counter", {(): 0.0})
        assert m["interlatent_run_drops"] == ("counter", {}) and m["interlatent_run_gaps"][0] == "counter"
        assert m["interlatent_leases_held"] == ("gauge", {(): 0.0})
        assert m["interlatent_lease_events"][1][(("event", "lost"),)] == 0.0

        x = np.zeros((3, 2), np.float32)
        x[1:, 1] = 1.0  # channel 1 fires at step 1 and is still firing
        assert mon.handle(encode_act("r", "p", 0, 0, "t", x[:1], _pos([0])))
        assert mon.handle(encode_act("r", "p", 3, 7, "t", x[1:], _pos([1, 2])))  # seq 1, 2 lost; 7 records dropped
        wait_until(lambda: mon.sink.receivers[0].failed == 1, what="the POST given up")
        m = _scrape(port)
        assert m["interlatent_frames"][1] == {(): 2.0} and m["interlatent_rows"][1] == {(): 3.0}
        assert m["interlatent_leases_held"][1] == {(): 1.0} and m["interlatent_lease_events"][1][(("event", "acquired"),)] == 1.0
        fired = zero | {("hot", "firing"): 1.0}
        assert m["interlatent_alerts"][1] == {(("rule", r), ("state", s)): v for (r, s), v in fired.items()}
        assert m["interlatent_alerts_active"][1][(("rule", "hot"), ("state", "firing"))] == 1.0
        assert m["interlatent_run_drops"] == ("counter", {(("run", "r"),): 7.0})
        assert m["interlatent_run_gaps"][1] == {(("run", "r"),): 2.0}
        assert m["interlatent_run_steps"][0] == "gauge"
        assert m["interlatent_webhook_failed"][1] == {(("receiver", "ops"),): 1.0}
        assert m["interlatent_webhook_posts"][1][(("receiver", "ops"), ("result", "failed"))] == 1.0
    finally:
        server.shutdown()
        server.server_close()
        mon.close()


def test_a_busy_port_is_an_error_with_one_line(store: Store) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
        try:
            with pytest.raises(MetricsPortError) as e:
                serve_metrics(mon, port)
        finally:
            mon.close()
    assert isinstance(e.value, OSError) and str(e.value) == f"cannot serve /metrics on 127.0.0.1:{port}: the port is in use"


def test_a_monitor_without_rules_serves_empty_alert_families(store: Store) -> None:
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    server = serve_metrics(mon, 0)
    try:
        m = _scrape(server.server_address[1])
        assert m["interlatent_alerts"] == ("counter", {}) and m["interlatent_webhook_sent"] == ("counter", {})
        assert m["interlatent_up"][1] == {(): 1.0}
    finally:
        server.shutdown()
        server.server_close()
        mon.close()


def test_the_monitor_command_refuses_a_busy_metrics_port_in_one_line(redis_url: str) -> None:
    import subprocess
    import sys

    from helpers import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "monitor", "monitor", "--redis", redis_url, "--endpoint", free_endpoint()]
        r = subprocess.run(
            [*cmd, "--metrics-port", str(port), "--idle-exit-s", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("interlatent:")]
    assert f"127.0.0.1:{port}" in line and "in use" in line and "-1 for none" in line
