"""One webhook receiver: its own bounded queue and thread, alerts grouped as by an Alertmanager route.

A :class:`Receiver` takes alert events without blocking (:meth:`Receiver.offer`), gathers them
into groups by ``Webhook.group_by`` and POSTs one message per group and state, in the shape of
Alertmanager's webhook payload (version 4) plus the ``text`` and ``alert`` fields that Slack-style
hooks and older consumers read::

    {"version": "4", "status": "firing", "receiver": "ops", "groupKey": "{}:{rule=\\"hot\\", run=\\"r\\"}",
     "groupLabels": {...}, "commonLabels": {...}, "commonAnnotations": {...}, "externalURL": "",
     "truncatedAlerts": 0, "alerts": [{"status", "labels", "annotations", "startsAt", "endsAt",
     "generatorURL", "fingerprint"}, ...], "text": "one line per alert", "alert": {the first event}}

Timing follows Alertmanager: a new group waits ``group_wait`` for company, later changes to it
go out at most every ``group_interval``, and a group still firing is sent again after
``repeat_interval``. Unlike Alertmanager, firing and resolved alerts travel in separate messages,
and an alert that fired and resolved within one wait is in both: a one-step spike is still news.
Events of other states (the steering events) are passed on once, never repeated; ``pending``
and ``inactive`` (pending, then cleared without firing) are not posted at all, as Prometheus
never sends pending alerts to an Alertmanager.

Every event offered is counted exactly once per receiver: ``sent``, ``failed`` (its message
failed after the retries), or ``dropped[reason]`` (``queue_full``, or ``shutdown`` when
:meth:`Receiver.join` ran out of time). A dead endpoint only ever holds back its own receiver.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from monitor.alerts.rules import GROUP_FIELDS, Webhook

__all__ = ["Receiver", "payload", "BACKOFF_S", "BACKOFF_MAX_S", "TEXT_LINES", "QUIET_STATES"]

log = logging.getLogger(__name__)

BACKOFF_S = 0.25  # the first retry waits this long, each next one twice as long
BACKOFF_MAX_S = 8.0
TEXT_LINES = 10  # alerts spelled out in a message's text; the rest are counted
_NOT_ENDED = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing
_WAKE = object()  # put on the queue by stop(), so a worker waiting for alerts looks up
QUIET_STATES = ("pending", "inactive")  # transitions no receiver is told about


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _labels(e: dict[str, Any]) -> dict[str, str]:
    """An event's labels as Alertmanager has them: the rule's labels, then its own fields (which win)."""
    own = {k: e.get(k) for k in GROUP_FIELDS}
    out = {str(k): str(v) for k, v in (e.get("labels") or {}).items()}
    out.update({"alertname": str(e.get("rule", ""))} | {k: str(v) for k, v in own.items() if v is not None})
    return out


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    if not dicts:
        return {}
    return {k: v for k, v in dicts[0].items() if all(d.get(k) == v for d in dicts[1:])}


def payload(
    receiver: str,
    status: str,
    group_labels: dict[str, str],
    events: list[dict[str, Any]],
    *,
    fresh: int,
    starts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The body of one message: ``events`` (one per alert, the ``fresh`` new ones first; the rest
    still firing from before, or all of them on a repeat when ``fresh`` is 0) in ``status``.
    ``starts`` gives a resolved alert's firing time for its ``startsAt``."""
    starts = starts or {}
    alerts: list[dict[str, Any]] = []
    for e in events:
        t = float(e.get("time", 0.0))
        start = starts.get(e.get("id", ""), t)
        alerts.append(
            {
                "status": status,
                "labels": _labels(e),
                "annotations": {
                    "summary": str(e.get("text", "")),
                    "step": str(e.get("step", "")),
                    "value": str(e.get("value", "")),
                },
                "startsAt": _iso(start),
                "endsAt": _NOT_ENDED if status == "firing" else _iso(t),
                "generatorURL": "",
                "fingerprint": hashlib.sha256(str(e.get("id", "")).encode()).hexdigest()[:16],
            }
        )
    shown = events[:fresh] if fresh else events
    lines = [("(repeat) " if not fresh else "") + str(e.get("text", "")) for e in shown[:TEXT_LINES]]
    if len(shown) > TEXT_LINES:
        lines.append(f"... and {len(shown) - TEXT_LINES} more")
    if fresh and len(events) > fresh:
        lines.append(f"({len(events) - fresh} more still firing in this group)")
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in group_labels.items()) + "}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": "",
        "alerts": alerts,
        "text": "\n".join(lines),
        "alert": events[0] if events else None,
    }


@dataclass
class _Group:
    labels: dict[str, str]
    firing: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> the event it fired with
    new: list[dict[str, Any]] = field(default_factory=list)  # events since the last message
    first_at: float = 0.0  # when the oldest of ``new`` arrived
    sent_at: float | None = None  # when the last message about this group went out

    def due(self, hook: Webhook) -> float | None:
        if self.new:
            if self.sent_at is None:
                return self.first_at + hook.group_wait_s
            return max(self.sent_at + hook.group_interval_s, self.first_at + hook.group_wait_s)
        if self.firing and self.sent_at is not None and hook.repeat_interval_s > 0:
            return self.sent_at + hook.repeat_interval_s
        return None


@dataclass(frozen=True)
class _Message:
    status: str
    alerts: int
    events: int  # the offered events this message accounts for (0 on a repeat)
    body: bytes


class Receiver:
    """Posts alerts to one webhook from its own thread; see the module docstring.

    >>> r = Receiver(Webhook(url="http://127.0.0.1:9000/hook"))  # doctest: +SKIP
    >>> r.offer(alert); r.close(timeout_s=2.0)                   # doctest: +SKIP
    """

    def __init__(self, hook: Webhook, *, queue_size: int = 1000) -> None:
        self.hook = hook
        self.name = hook.name or urlsplit(hook.url).netloc.rpartition("@")[2]
        self.sent = 0  # events delivered (in a 2xx reply)
        self.failed = 0  # events whose message failed after every retry
        self.dropped: Counter[str] = Counter({"queue_full": 0, "shutdown": 0})  # events never posted, by reason
        self.posts_sent = 0  # messages (repeats included)
        self.posts_failed = 0
        self.pending = 0  # events offered and not yet counted above
        self._cap = queue_size  # events the worker holds in its groups at most; then the queue fills
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._abandoned = False
        self._groups: dict[tuple[tuple[str, str], ...], _Group] = {}
        self._held = 0  # events in self._groups (worker thread only)
        self._thread = threading.Thread(target=self._run, name=f"interlatent-webhook-{self.name}", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------------
    def offer(self, alert: dict[str, Any]) -> None:
        """Queue one event; never blocks (a full queue drops it, counted). Pending and inactive are ignored."""
        if alert.get("state") in QUIET_STATES:
            return
        with self._lock:
            if self._closing.is_set():
                self.dropped["shutdown"] += 1
                return
            try:
                self._q.put_nowait(alert)
            except queue.Full:
                self.dropped["queue_full"] += 1
                return
            self.pending += 1

    def stop(self, deadline: float) -> None:
        """Take no more events; send what is queued and grouped now, until ``deadline`` (time.monotonic())."""
        with self._lock:
            self._deadline = min(self._deadline, deadline)
            self._closing.set()
        try:
            self._q.put_nowait(_WAKE)
        except queue.Full:  # the worker has work, so it is not waiting: it sees _closing next
            pass

    def join(self, deadline: float) -> None:
        """Wait for the sends until ``deadline``; what is still unsent is counted dropped for shutdown."""
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self.dropped["shutdown"] += self.pending
            self.pending = 0
            self._abandoned = True  # a send that finishes later is not counted twice

    def close(self, timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        self.stop(deadline)
        self.join(deadline)

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._abandoned:
                if self._closing.is_set():
                    self._drain()
                    return
                self._take(self._wait_s())
                now = time.monotonic()
                for key, g in list(self._groups.items()):
                    due = g.due(self.hook)
                    if due is not None and due <= now:
                        self._send_group(key, g, now)
        except Exception:  # a bug here must not pass silently: what is left counts as dropped at close
            log.exception("webhook %s: the sender stopped", self.name)

    def _wait_s(self) -> float | None:
        dues = [d for g in self._groups.values() if (d := g.due(self.hook)) is not None]
        return None if not dues else max(0.0, min(dues) - time.monotonic())

    def _take(self, timeout: float | None) -> None:
        if self._held >= self._cap:  # hold no more: the queue fills up and offer() drops, counted
            self._closing.wait(timeout)
            return
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return
        self._add(item)
        while self._held < self._cap:  # what else is waiting, so that a burst is one pass
            try:
                self._add(self._q.get_nowait())
            except queue.Empty:
                return

    def _drain(self) -> None:
        while True:
            try:
                self._add(self._q.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for key, g in list(self._groups.items()):
            if g.new:
                self._send_group(key, g, now)

    def _add(self, e: Any) -> None:
        if e is _WAKE:
            return
        if self.hook.group_by == ("...",):
            labels = _labels(e)
        else:
            labels = {}
            for k in self.hook.group_by:
                v = e.get(k) if k in GROUP_FIELDS else (e.get("labels") or {}).get(k)
                labels[k] = "" if v is None else str(v)
        key = tuple(sorted(labels.items()))
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(labels)
        if not g.new:
            g.first_at = time.monotonic()
        g.new.append(e)
        self._held += 1

    def _send_group(self, key: tuple[tuple[str, str], ...], g: _Group, now: float) -> None:
        messages = self._messages(g)
        g.sent_at = now
        if not g.firing:
            del self._groups[key]
        for m in messages:
            self._deliver(m)

    def _messages(self, g: _Group) -> list[_Message]:
        """The messages for a group's new events (or its repeat), updating what it holds as firing."""
        events, g.new = g.new, []
        self._held -= len(events)
        if not events:
            firing = list(g.firing.values())
            return [self._message(g, "firing", firing, fresh=0, events=0)]
        last = {e["id"]: e["state"] for e in events if e.get("state") in ("firing", "resolved")}
        fired: dict[str, dict[str, Any]] = {}  # id -> its first firing event in this window
        resolved: dict[str, dict[str, Any]] = {}  # id -> its last resolved event, if that is its state now
        others: dict[str, list[dict[str, Any]]] = {}  # one-shot events by state
        count: Counter[str] = Counter()
        for e in events:
            state = e.get("state")
            if state == "firing":
                fired.setdefault(e["id"], e)
                count["firing"] += 1
            elif state == "resolved" and last[e["id"]] == "resolved":
                resolved[e["id"]] = e
                count["resolved"] += 1
            elif state == "resolved":  # fired again later in the window: the firing message covers it
                count["firing"] += 1
            else:
                others.setdefault(str(state), []).append(e)
        starts = {i: float((g.firing.get(i) or fired.get(i) or e).get("time", 0.0)) for i, e in resolved.items()}
        still = [e for i, e in g.firing.items() if i not in fired and i not in resolved]
        for i in resolved:
            g.firing.pop(i, None)
        g.firing.update({i: e for i, e in fired.items() if last[i] == "firing"})
        out = []
        if fired:
            out.append(self._message(g, "firing", [*fired.values(), *still], fresh=len(fired), events=count["firing"]))
        if resolved:
            out.append(
                self._message(
                    g, "resolved", list(resolved.values()), fresh=len(resolved), events=count["resolved"], starts=starts
                )
            )
        for state, evs in others.items():
            out.append(self._message(g, state, evs, fresh=len(evs), events=len(evs)))
        return out

    def _message(self, g: _Group, status: str, evs: list[dict[str, Any]], *, fresh: int, events: int, **kw: Any) -> _Message:
        body = json.dumps(payload(self.name, status, g.labels, evs, fresh=fresh, **kw), default=str).encode()
        return _Message(status, len(evs), events, body)

    def _deliver(self, m: _Message) -> None:
        err = ""
        tries = self.hook.retries + 1
        for attempt in range(tries):
            timeout = self.hook.timeout_s
            if self._closing.is_set():
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._count(m, "shutdown")
                    return
                timeout = min(timeout, left)
            ok, retry, err = self._post(m.body, timeout)
            if ok:
                self._count(m, "sent")
                return
            if not retry:
                tries = attempt + 1
                break
            if attempt + 1 < tries:
                self._closing.wait(min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt))  # at shutdown: on at once, to the deadline
        self._count(m, "failed")
        log.warning("webhook %s: a %s message of %d alerts failed after %d tries: %s", self.name, m.status, m.alerts, tries, err)

    def _post(self, body: bytes, timeout: float) -> tuple[bool, bool, str]:
        """(delivered, worth retrying, why not) for one POST."""
        headers = {"Content-Type": "application/json", "User-Agent": "interlatent"}
        req = urllib.request.Request(self.hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                code = resp.status
        except urllib.error.HTTPError as e:
            e.close()
            return False, e.code >= 500 or e.code == 429, f"HTTP {e.code}"  # another 4xx would fail again
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            return False, True, str(getattr(e, "reason", e))
        return (True, False, "") if 200 <= code < 300 else (False, False, f"HTTP {code}")

    def _count(self, m: _Message, outcome: str) -> None:
        with self._lock:
            if self._abandoned:
                return
            self.pending -= m.events
            if outcome == "sent":
                self.sent += m.events
                self.posts_sent += 1
            elif outcome == "failed":
                self.failed += m.events
                self.posts_failed += 1
            else:
                self.dropped[outcome] += m.events
