"""Webhook receivers: one queue and thread each, Alertmanager-style grouping, retries, every event counted."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from helpers import wait_until

from agent_side.wire import encode_act
from monitor.alerts.receivers import Receiver, payload
from monitor.alerts.rules import RulesError, Webhook, parse_rules
from monitor.alerts.sinks import AlertSink
from monitor.service.ingest import Monitor
from monitor.store.records import Store


class Hook:
    """A local HTTP server standing in for a webhook. Replies ``statuses`` in turn (the last one from
    then on); while ``gate`` is given and not set, holds every request open. ``arrived`` counts
    requests as they come in, ``bodies`` keeps the bodies of the requests answered 2xx."""

    def __init__(self, statuses: tuple[int, ...] = (200,), *, gate: threading.Event | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = 0
        self.gate = gate
        lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    i = outer.arrived
                    outer.arrived += 1
                if gate is not None:
                    gate.wait(timeout=120)
                status = statuses[min(i, len(statuses) - 1)]
                if status < 300:
                    outer.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def _event(rule: str, run: str, latent: int, state: str, step: int = 0, **extra: Any) -> dict[str, Any]:
    """An alert event in the engine's shape (see AlertEngine._event)."""
    return {
        "id": f"{rule}|{run}|t|{latent}",
        "rule": rule,
        "kind": "threshold",
        "state": state,
        "severity": "warning",
        "labels": {"team": "rl"},
        "run": run,
        "tap": "t",
        "latent": latent,
        "step": step,
        "index": 0,
        "value": 1.0,
        "z": 0.0,
        "correlations": {},
        "explanation": None,
        "time": time.time(),
        "text": f"[warning] {rule} {state}: {run} t #{latent} at step {step}",
        **extra,
    }


def _fingerprints(body: dict[str, Any]) -> list[str]:
    return [a["fingerprint"] for a in body["alerts"]]


def _fp(rule: str, run: str, latent: int) -> str:
    return payload("x", "firing", {}, [_event(rule, run, latent, "firing")], fresh=1)["alerts"][0]["fingerprint"]


def _pos(steps: list[int]) -> np.ndarray:
    s = np.asarray(steps)
    return np.stack([s, np.zeros_like(s)], axis=1).astype(np.int64)


def test_a_dead_webhook_holds_back_no_other(store: Store) -> None:
    """The dead endpoint holds its first POST open; the healthy one gets everything meanwhile."""
    gate = threading.Event()
    dead, ok = Hook((500,), gate=gate), Hook()
    timing = {"group_wait": 0, "group_interval": 0}
    rules = parse_rules(
        {
            "rules": [{"name": "hot", "kind": "threshold", "above": 0.5}],
            "webhooks": [
                {"url": dead.url, "name": "dead", "timeout_s": 60, "retries": 1, **timing},
                {"url": ok.url, "name": "ok", **timing},
            ],
        }
    )
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    runs, width = 3, 4
    try:
        for r in range(runs):  # every channel fires at step 0 and resolves at step 1
            x = np.zeros((2, width), np.float32)
            x[0] = 1.0
            assert mon.handle(encode_act(f"run{r}", "p", 0, 0, "t", x, _pos([0, 1])))
        events = 2 * runs * width
        dead_r, ok_r = mon.sink.receivers
        wait_until(lambda: ok_r.sent == events, what="every alert at the healthy receiver")
        wait_until(lambda: dead.arrived == 1, what="the dead receiver's first POST")
        assert (dead_r.sent, dead_r.failed, dead_r.pending) == (0, 0, events)  # still stuck on its first POST
        assert not gate.is_set() and ok_r.failed == 0 and sum(ok_r.dropped.values()) == 0
        seen = {(fp, b["status"]) for b in ok.bodies for fp in _fingerprints(b)}
        assert seen == {(_fp("hot", f"run{r}", c), s) for r in range(runs) for c in range(width) for s in ("firing", "resolved")}
        for b in ok.bodies:  # grouped by rule and run: a message never mixes runs
            assert b["groupLabels"] == {"rule": "hot", "run": b["alert"]["run"]}
            assert {a["labels"]["run"] for a in b["alerts"]} == {b["alert"]["run"]}
        gate.set()  # the dead endpoint answers now: 500, every time
        wait_until(lambda: dead_r.failed == events, what="the dead receiver giving up on everything")
        assert dead_r.sent == 0 and dead_r.posts_failed >= 1 and dead.arrived == 2 * dead_r.posts_failed  # one retry each
        assert (mon.sink.webhook_sent, mon.sink.webhook_failed, mon.sink.webhook_dropped) == (events, events, 0)
    finally:
        mon.close()
        dead.close()
        ok.close()


def test_a_group_is_one_post_in_alertmanagers_shape(store: Store) -> None:
    hook = Hook()
    sink = AlertSink(store.r, (Webhook(url=hook.url, name="ops", group_wait_s=60),))
    (rec,) = sink.receivers
    try:
        evs = [_event("hot", "a", c, "firing", step=7) for c in range(3)]
        evs += [_event("hot", "b", 0, "firing"), _event("cold", "a", 5, "firing")]
        for e in evs:
            sink.emit(e)
        sink.emit(_event("hot", "a", 9, "pending"))  # never posted, as Prometheus never sends pending alerts
        sink.emit(_event("hot", "a", 9, "inactive"))
        assert hook.bodies == [] and rec.pending == len(evs)  # group_wait (60 s) holds them
        sink.close(timeout_s=30)  # close sends what is held at once
        assert (rec.sent, rec.posts_sent, rec.pending) == (len(evs), 3, 0)
        by_group = {(b["groupLabels"]["rule"], b["groupLabels"]["run"]): b for b in hook.bodies}
        assert sorted(by_group) == [("cold", "a"), ("hot", "a"), ("hot", "b")]
        body = by_group[("hot", "a")]
        assert {k: body[k] for k in ("version", "status", "receiver", "groupLabels", "truncatedAlerts")} == {
            "version": "4",
            "status": "firing",
            "receiver": "ops",
            "groupLabels": {"rule": "hot", "run": "a"},
            "truncatedAlerts": 0,
        }
        assert body["groupKey"] == '{}:{rule="hot", run="a"}'
        assert body["commonLabels"] == {
            "alertname": "hot",
            "rule": "hot",
            "kind": "threshold",
            "severity": "warning",
            "run": "a",
            "tap": "t",
            "team": "rl",
        }
        assert [a["labels"]["latent"] for a in body["alerts"]] == ["0", "1", "2"]
        first = body["alerts"][0]
        assert first["status"] == "firing" and first["endsAt"] == "0001-01-01T00:00:00Z" and first["startsAt"].endswith("Z")
        assert first["annotations"] == {"summary": evs[0]["text"], "step": "7", "value": "1.0"}
        assert body["text"].splitlines() == [e["text"] for e in evs[:3]]  # Slack-style hooks read `text`
        assert body["alert"] == evs[0]  # older consumers read `alert`: the first event, as emitted
    finally:
        sink.close()
        hook.close()


def test_changes_to_a_sent_group_wait_for_group_interval(store: Store) -> None:
    hook = Hook()
    sink = AlertSink(store.r, (Webhook(url=hook.url, group_wait_s=0, group_interval_s=60),))
    try:
        sink.emit(_event("hot", "a", 0, "firing"))
        wait_until(lambda: len(hook.bodies) == 1, what="the first message of the group")
        spike = _event("hot", "a", 2, "firing")
        for e in (_event("hot", "a", 1, "firing"), spike, _event("hot", "a", 2, "resolved")):
            sink.emit(e)
        assert len(hook.bodies) == 1  # held until group_interval (60 s) after the first message
        sink.close(timeout_s=30)
        firing, resolved = hook.bodies[1:]
        # new alerts first, then the one still firing from before; the spike that came and went is in both
        assert firing["status"] == "firing" and _fingerprints(firing) == [
            _fp("hot", "a", 1),
            _fp("hot", "a", 2),
            _fp("hot", "a", 0),
        ]
        assert firing["text"].splitlines()[-1] == "(1 more still firing in this group)"
        assert resolved["status"] == "resolved" and _fingerprints(resolved) == [_fp("hot", "a", 2)]
        (gone,) = resolved["alerts"]
        assert gone["status"] == "resolved" and gone["endsAt"] != "0001-01-01T00:00:00Z" and gone["startsAt"] <= gone["endsAt"]
        assert sink.receivers[0].sent == 4
    finally:
        sink.close()
        hook.close()


def test_a_still_firing_group_repeats_until_it_resolves(store: Store) -> None:
    hook = Hook()
    sink = AlertSink(store.r, (Webhook(url=hook.url, group_wait_s=0, group_interval_s=0, repeat_interval_s=0.05),))
    (rec,) = sink.receivers
    a = _fp("hot", "a", 0)
    try:
        sink.emit(_event("hot", "a", 0, "firing"))
        # the server holds a body before the receiver has read the reply, so wait on the receiver's own count
        wait_until(lambda: rec.posts_sent >= 3, what="two repeats")
        assert all(b["status"] == "firing" and _fingerprints(b) == [a] for b in hook.bodies[:3])
        assert hook.bodies[1]["text"].startswith("(repeat) [warning] hot firing")
        assert rec.sent == 1  # a repeat carries no new event
        sink.emit(_event("hot", "a", 0, "resolved"))
        wait_until(lambda: any(b["status"] == "resolved" for b in hook.bodies), what="the resolution")
        sink.emit(_event("hot", "a", 9, "firing"))  # the same group again, after it resolved
        wait_until(lambda: any(_fp("hot", "a", 9) in _fingerprints(b) for b in hook.bodies), what="the new alert")
        after = hook.bodies[next(i for i, b in enumerate(hook.bodies) if b["status"] == "resolved") + 1 :]
        assert after and all(a not in _fingerprints(b) for b in after)  # resolved: neither repeated nor "still firing"
    finally:
        sink.close()
        hook.close()


def test_other_states_pass_once_and_pending_never() -> None:
    hook = Hook()
    rec = Receiver(Webhook(url=hook.url, group_wait_s=60, repeat_interval_s=0.01))
    try:
        rec.offer(_event("steering", "a", 0, "refused") | {"id": "steering|a|x", "kind": "steer"})
        rec.offer(_event("hot", "a", 1, "pending"))
        rec.offer(_event("hot", "a", 1, "inactive"))
        rec.close(timeout_s=30)
        assert [(b["status"], len(b["alerts"])) for b in hook.bodies] == [("refused", 1)]
        assert (rec.sent, rec.posts_sent, rec.pending) == (1, 1, 0)
    finally:
        rec.close()
        hook.close()


def test_retries_back_off_on_5xx_but_not_on_4xx() -> None:
    flaky, bad = Hook((500, 503, 200)), Hook((400,))
    r1 = Receiver(Webhook(url=flaky.url, retries=2, group_wait_s=0))
    r2 = Receiver(Webhook(url=bad.url, retries=5, group_wait_s=0))
    try:
        r1.offer(_event("hot", "a", 0, "firing"))
        r2.offer(_event("hot", "a", 0, "firing"))
        wait_until(lambda: r1.sent == 1, what="delivery on the third try")
        assert (flaky.arrived, r1.posts_sent, r1.failed) == (3, 1, 0)
        wait_until(lambda: r2.failed == 1, what="the 400 given up")
        assert (bad.arrived, r2.posts_failed, r2.sent) == (1, 1, 0)  # a 4xx would only fail again
    finally:
        r1.close()
        r2.close()
        flaky.close()
        bad.close()


def test_a_full_queue_drops_and_counts() -> None:
    gate = threading.Event()
    slow = Hook(gate=gate)
    rec = Receiver(Webhook(url=slow.url, group_wait_s=0, group_interval_s=0), queue_size=2)
    try:
        rec.offer(_event("hot", "a", 0, "firing"))
        wait_until(lambda: slow.arrived == 1, what="the worker stuck on its first POST")
        for c in range(1, 6):
            rec.offer(_event("hot", "a", c, "firing"))
        assert (rec.dropped["queue_full"], rec.pending) == (3, 3)  # two fit the queue
        gate.set()
        wait_until(lambda: rec.sent == 3, what="the queued ones")
        assert rec.pending == 0 and rec.failed == 0
    finally:
        rec.close()
        slow.close()


def test_close_is_bounded_and_counts_what_it_abandons(store: Store) -> None:
    gate = threading.Event()
    hung, ok = Hook(gate=gate), Hook()
    sink = AlertSink(
        store.r,
        (
            Webhook(url=hung.url, name="hung", timeout_s=600, group_wait_s=0, group_interval_s=0),
            Webhook(url=ok.url, name="ok", group_wait_s=60),
        ),
    )
    hung_r, ok_r = sink.receivers
    try:
        for run in "abcd":
            sink.emit(_event("hot", run, 0, "firing"))
        wait_until(lambda: hung.arrived == 1, what="the hung POST")
        sink.close(timeout_s=3)  # returns although a POST is still open (its timeout is 600 s)
        assert (ok_r.sent, ok_r.pending) == (4, 0)  # the healthy one sent what group_wait held
        assert (hung_r.sent, hung_r.failed, hung_r.dropped["shutdown"], hung_r.pending) == (0, 0, 4, 0)
        sink.emit(_event("hot", "e", 0, "firing"))  # after close: counted, not queued
        assert hung_r.dropped["shutdown"] == 5 and ok_r.dropped["shutdown"] == 1
    finally:
        gate.set()
        sink.close()
        hung.close()
        ok.close()


def test_the_example_and_old_rules_files_get_the_defaults() -> None:
    rules = parse_rules({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": [{"url": "https://hooks.example.com/x"}]})
    (hook,) = rules.webhooks
    assert (hook.name, hook.timeout_s, hook.retries, hook.group_by) == ("hooks.example.com", 2.0, 2, ("rule", "run"))
    assert (hook.group_wait_s, hook.group_interval_s, hook.repeat_interval_s) == (1.0, 10.0, 3600.0)
    labelled = parse_rules(
        {
            "rules": [{"name": "a", "kind": "zscore", "labels": {"team": "rl"}}],
            "webhooks": [{"url": "http://u:secret@h:9000/x", "group_by": ["team", "severity"], "repeat_interval": 0}],
        }
    )
    assert labelled.webhooks[0].name == "h:9000" and labelled.webhooks[0].group_by == ("team", "severity")


@pytest.mark.parametrize(
    "hook, message",
    [
        ({"url": "http://h/x", "group_wiat": 1}, "webhook #1: unknown field 'group_wiat' (known: group_by, group_interval,"),
        ({"url": "http:///x"}, "webhook #1: field 'url' must be an http(s) URL"),
        ({"url": "http://h:port/x"}, "webhook #1: field 'url' must be an http(s) URL"),
        ({"url": "http://h/x", "name": ""}, "webhook #1: field 'name' must be a non-empty string"),
        ({"url": "http://h/x", "timeout_s": 0}, "webhook #1: field 'timeout_s' must be a number of seconds > 0, got 0"),
        ({"url": "http://h/x", "retries": 1.5}, "webhook #1: field 'retries' must be an integer, got 1.5"),
        ({"url": "http://h/x", "retries": -1}, "webhook #1: field 'retries' must be >= 0"),
        (
            {"url": "http://h/x", "group_wait": "30s"},
            "webhook #1: field 'group_wait' must be a number of seconds >= 0, got '30s'",
        ),
        ({"url": "http://h/x", "group_interval": -1}, "webhook #1: field 'group_interval' must be a number of seconds >= 0"),
        ({"url": "http://h/x", "repeat_interval": True}, "webhook #1: field 'repeat_interval' must be a number of seconds"),
        ({"url": "http://h/x", "group_by": "run"}, "webhook #1: field 'group_by' must be a list"),
        ({"url": "http://h/x", "group_by": ["rnu"]}, "webhook #1: field 'group_by' names 'rnu', neither an alert field"),
        ({"url": "http://h/x", "group_by": ["...", "run"]}, "webhook #1: field 'group_by' takes '...'"),
    ],
)
def test_webhook_errors_name_the_field(hook: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError) as e:
        parse_rules({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": [hook]})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_two_webhooks_need_two_names() -> None:
    hooks = [{"url": "http://127.0.0.1:9000/a"}, {"url": "http://127.0.0.1:9000/b"}]
    with pytest.raises(RulesError, match=r"^webhook #2: name '127.0.0.1:9000' is used twice \(set field 'name'"):
        parse_rules({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": hooks})
    hooks[1]["name"] = "second"
    assert [h.name for h in parse_rules({"rules": [{"name": "a", "kind": "zscore"}], "webhooks": hooks}).webhooks] == [
        "127.0.0.1:9000",
        "second",
    ]
