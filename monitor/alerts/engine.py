"""Alert rules evaluated on every activation row, per channel, with Prometheus's lifecycle:
inactive -> pending (the condition holds, ``for`` not reached) -> firing -> resolved.

One :class:`_Track` per (rule, run, tap) holds every channel's state as arrays, so a row costs a
few vector operations whatever the width. Only transitions become events: an alert goes pending
once, fires once (deduplicated by rule, run, tap and channel) and resolves once; a pending one
whose condition clears is ``inactive`` again. A run that stops resolves its alerts with a reason
(:meth:`AlertEngine.end_run`). Baselines (zscore's EW mean and variance, wake's rate) are frozen
while a channel is pending or firing.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any

import numpy as np

from monitor.alerts.rules import Rule, RulesFile
from monitor.stats.analytics import TapAnalytics
from monitor.store.keys import LATENT_PREFIX

__all__ = ["AlertEngine", "WARMUP_ROWS", "STATES"]

log = logging.getLogger(__name__)

WARMUP_ROWS = 20  # rows of baseline before zscore and wake rules may fire


class _Track:
    def __init__(self, rule: Rule, width: int) -> None:
        self.rule = rule
        self.cols = np.arange(width) if rule.channels is None else np.array([c for c in rule.channels if c < width], dtype=int)
        n = len(self.cols)
        self.hold = np.zeros(n, dtype=np.int64)
        self.firing = np.zeros(n, dtype=bool)
        self.pending = np.zeros(n, dtype=bool)
        self.last_true = np.zeros(n, dtype=np.int64)
        self.since = np.zeros(n, dtype=np.int64)  # step the channel went pending (or fired at once)
        self.quiet_until = np.full(n, -1, dtype=np.int64)
        self.mean = np.zeros(n)
        self.var = np.zeros(n)
        self.rate = np.zeros(n)
        self.seen = 0
        self.sign = np.zeros(n)  # corr_flip: sign of the last strong correlation

    def condition(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(condition, z) for one row of this track's channels; updates the baselines after, except
        where the channel is pending or firing (or its condition holds now): an excursion never
        becomes its own baseline, so it alerts for as long as it lasts."""
        r = self.rule
        z = np.zeros_like(x)
        if r.kind == "zscore":
            std = np.sqrt(self.var)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(std > 1e-12, (x - self.mean) / std, 0.0)
            cond = (z > r.z) & (self.seen >= WARMUP_ROWS)
        elif r.kind == "threshold":
            cond = np.zeros(len(x), dtype=bool)
            if r.above is not None:
                cond |= x > r.above
            if r.below is not None:
                cond |= x < r.below
        else:  # wake
            on = x > (r.above if r.above is not None else 0.0)
            cond = on & (self.rate < r.rare_below) & (self.seen >= WARMUP_ROWS)
        learn = ~(cond | self.firing | self.pending)
        a = r.baseline_alpha
        if r.kind == "wake":
            self.rate = np.where(learn, self.rate + a * (on - self.rate), self.rate)
        if self.seen == 0:
            self.mean[:] = x
        else:
            d = x - self.mean
            self.mean = np.where(learn, self.mean + a * d, self.mean)
            self.var = np.where(learn, (1 - a) * (self.var + a * d * d), self.var)
        self.seen += 1
        return cond, z

    def step(self, cond: np.ndarray, step: int) -> dict[str, np.ndarray]:
        """Advance the state machine one row: inactive -> pending (the condition holds, ``for`` not
        yet reached) -> firing -> resolved (after ``keep_firing_for``); a pending channel whose
        condition clears goes back to inactive. Returns the masks of each transition."""
        r = self.rule
        self.hold = np.where(cond, self.hold + 1, 0)
        self.since[cond & (self.hold == 1) & ~self.firing] = step
        may = step >= self.quiet_until  # not in its cooldown
        newly = ~self.firing & may & (self.hold >= max(1, r.for_steps))
        pending = ~self.firing & ~newly & may & cond & ~self.pending
        cleared = self.pending & ~cond
        self.pending = (self.pending | pending) & ~newly & ~cleared
        self.firing |= newly
        self.last_true[cond & self.firing] = step
        resolved = self.firing & ~cond & (step - self.last_true > r.keep_firing_for)
        self.firing &= ~resolved
        self.quiet_until[resolved] = step + r.cooldown
        return {"pending": pending, "firing": newly, "resolved": resolved, "inactive": cleared}

    def end(self) -> dict[str, np.ndarray]:
        """Everything pending or firing ends now (the run stopped)."""
        out = {"resolved": self.firing.copy(), "inactive": self.pending.copy()}
        self.firing[:] = False
        self.pending[:] = False
        self.hold[:] = 0
        return out

    def restore(self, ch: int, state: str, step: int, since: int) -> None:
        """Put back one channel's state from the alerts Redis keeps (a monitor restart)."""
        j = np.nonzero(self.cols == ch)[0]
        if not j.size:
            return
        if state == "firing":
            self.firing[j] = True
            self.hold[j] = max(1, self.rule.for_steps)
        else:
            self.pending[j] = True
            self.hold[j] = 1
        self.last_true[j], self.since[j] = step, since


STATES = ("pending", "firing", "resolved", "inactive")  # the events; "inactive": a pending one that cleared


class AlertEngine:
    """Evaluates the rules of a :class:`RulesFile` against the frames a monitor receives.

    ``restore`` takes the pending and firing alerts a previous monitor left in Redis: their
    channels continue in that state, so a restarted monitor resolves what was firing."""

    def __init__(self, rules: RulesFile, restore: list[dict[str, Any]] | None = None) -> None:
        self.rules = rules
        self._tracks: dict[tuple[str, str, str], _Track | None] = {}
        self._restore: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for a in restore or ():
            try:
                self._restore.setdefault((a["rule"], a["run"], a["tap"]), []).append(a)
            except (KeyError, TypeError):
                continue

    def _track(self, rule: Rule, run: str, tap: str, width: int) -> _Track | None:
        key = (rule.name, run, tap)
        if key not in self._tracks:
            match = fnmatch.fnmatchcase(run, rule.run) and fnmatch.fnmatchcase(tap, rule.tap)
            tr = _Track(rule, width) if match else None
            self._tracks[key] = tr if tr is None or len(tr.cols) else None
            tr = self._tracks[key]
            for a in self._restore.pop(key, []):
                if tr is not None and a.get("state") in ("pending", "firing"):
                    try:
                        tr.restore(int(a["latent"]), a["state"], int(a["step"]), int(a.get("since", a["step"])))
                    except (KeyError, TypeError, ValueError):
                        log.warning("cannot restore alert %s", a.get("id"))
        return self._tracks[key]

    def on_rows(
        self, run: str, tap: str, data: np.ndarray, pos: np.ndarray, analytics: TapAnalytics | None
    ) -> list[dict[str, Any]]:
        """Events (pending, firing, resolved, inactive) caused by these activation rows, in order.
        corr_flip rules are evaluated by :meth:`on_paired`, once the rows have their metrics."""
        events: list[dict[str, Any]] = []
        width = data.shape[1]
        for rule in self.rules.rules:
            if rule.kind == "corr_flip":
                continue
            tr = self._track(rule, run, tap, width)
            if tr is None:
                continue
            x_all = data[:, tr.cols].astype(np.float64)
            steps = pos[:, 0]
            i = 0
            while i < len(data):  # one state-machine step per agent step: a vector env's rows are one step
                j = i + 1
                while j < len(data) and steps[j] == steps[i]:
                    j += 1
                conds, zs = zip(*(tr.condition(x_all[r]) for r in range(i, j)), strict=True)
                cond = np.logical_or.reduce(conds)
                # the row each channel is reported from: the first that meets the condition, else the last
                at = i + np.where(cond, np.argmax(np.stack(conds), axis=0), j - 1 - i)
                moved = tr.step(cond, int(steps[i]))
                for state in STATES:
                    for c in np.nonzero(moved[state])[0]:
                        r = int(at[c])
                        x, z = float(x_all[r, c]), float(zs[r - i][c])
                        events.append(self._event(tr, c, state, run, tap, int(steps[i]), int(pos[r, 1]), x, z, analytics))
                i = j
        return events

    def on_paired(self, run: str, tap: str, an: TapAnalytics, step: int, index: int = 0) -> list[dict[str, Any]]:
        """corr_flip rules against ``an``'s rolling correlation, evaluated each time new rows of
        the tap were paired with their metrics (``step`` the newest paired step)."""
        events: list[dict[str, Any]] = []
        for rule in self.rules.rules:
            if rule.kind != "corr_flip":
                continue
            tr = self._track(rule, run, tap, an.width)
            if tr is None or rule.metric not in an.metric_names or an.rolling.n < 3:
                continue
            r = an.rolling.get()[tr.cols, an.metric_names.index(rule.metric)]
            strong = np.abs(np.nan_to_num(r)) >= rule.min_abs
            sign = np.sign(np.nan_to_num(r))
            cond = strong & (tr.sign != 0) & (sign != tr.sign)
            tr.sign = np.where(strong, sign, tr.sign)
            moved = tr.step(cond, step)
            for state in STATES:
                for j in np.nonzero(moved[state])[0]:
                    events.append(self._event(tr, j, state, run, tap, step, index, float(r[j]), 0.0, an))
        return events

    def end_run(self, run: str, step: int, reason: str, analytics: dict[str, TapAnalytics] | None = None) -> list[dict[str, Any]]:
        """The run stopped (went quiet or detached): a last corr_flip evaluation, then every pending
        or firing alert of the run ends, resolved with ``reason``."""
        events: list[dict[str, Any]] = []
        for tap, an in (analytics or {}).items():
            events += self.on_paired(run, tap, an, step)
        for (_, r, tap), tr in list(self._tracks.items()):
            if tr is None or r != run:
                continue
            moved = tr.end()
            for state in ("resolved", "inactive"):
                for j in np.nonzero(moved[state])[0]:
                    e = self._event(tr, j, state, run, tap, step, 0, float("nan"), 0.0, None, reason=reason)
                    events.append(e)
        return events

    def forget_run(self, run: str) -> None:
        """Drop a finished run's state (its alerts have ended)."""
        for key in [k for k in self._tracks if k[1] == run]:
            del self._tracks[key]

    def _event(
        self,
        tr: _Track,
        j: int,
        state: str,
        run: str,
        tap: str,
        step: int,
        index: int,
        value: float,
        z: float,
        an: TapAnalytics | None,
        *,
        reason: str | None = None,
    ) -> dict[str, Any]:
        rule, ch = tr.rule, int(tr.cols[j])
        since = int(tr.since[j])
        unit = "latent" if tap.startswith(LATENT_PREFIX) else "channel"
        corrs: dict[str, float] = {}
        if an is not None and an.rolling.n >= 3 and state in ("pending", "firing"):
            r = an.rolling.get()[ch]
            order = [m for m in np.argsort(-np.abs(np.nan_to_num(r))) if np.isfinite(r[m])][:3]
            corrs = {an.metric_names[m]: round(float(r[m]), 4) for m in order}
        what = {
            "zscore": f"z={z:+.1f} over its baseline",
            "threshold": f"value {value:+.3f} crossed the threshold",
            "wake": "a rarely active channel woke up",
            "corr_flip": f"its correlation with {rule.metric} flipped to {value:+.2f}",
        }[rule.kind]
        where = f"{run} {tap} {unit} {ch} at step {step}"
        if state == "firing":
            text = f"[{rule.severity}] {rule.name} firing: {where}: {what}"
        elif state == "pending":
            text = f"[{rule.severity}] {rule.name} pending: {where}: {what} (fires after {rule.for_steps} steps)"
        elif reason is not None:
            text = f"[{rule.severity}] {rule.name} resolved: {where}: {reason} (since step {since})"
        elif state == "resolved":
            back = f"back to {value:+.3f}" if rule.kind != "corr_flip" else f"correlation with {rule.metric} {value:+.2f}"
            text = f"[{rule.severity}] {rule.name} resolved: {where}: {back} (since step {since})"
        else:
            text = f"[{rule.severity}] {rule.name} no longer pending: {where}"
        if corrs:
            text += "; tracks " + ", ".join(f"{m} (r={r:+.2f})" for m, r in corrs.items())
        finite = value == value and abs(value) != float("inf")
        return {
            "id": f"{rule.name}|{run}|{tap}|{ch}",
            "rule": rule.name,
            "kind": rule.kind,
            "state": state,
            "severity": rule.severity,
            "labels": dict(rule.labels),
            "run": run,
            "tap": tap,
            "unit": unit,
            "channel": ch,
            "latent": ch,  # the older name of "channel", kept for readers of the JSON
            "step": step,
            "since": since,
            "index": index,
            "value": round(value, 6) if finite else None,
            "z": round(z, 4),
            "correlations": corrs,
            "explanation": None,
            "reason": reason,
            "time": time.time(),
            "text": text,
        }

    def active(self) -> list[dict[str, Any]]:
        """(rule, run, tap, channel, state) of every pending or firing channel."""
        out = []
        for (name, run, tap), tr in self._tracks.items():
            if tr is None:
                continue
            for j in np.nonzero(tr.firing | tr.pending)[0]:
                out.append(
                    {
                        "rule": name,
                        "run": run,
                        "tap": tap,
                        "latent": int(tr.cols[j]),
                        "state": "firing" if tr.firing[j] else "pending",
                    }
                )
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """rule -> {"pending": n, "firing": n} now (every rule present, zeros included)."""
        out = {r.name: {"pending": 0, "firing": 0} for r in self.rules.rules}
        for (name, _, _), tr in self._tracks.items():
            if tr is not None:
                out[name]["pending"] += int(tr.pending.sum())
                out[name]["firing"] += int(tr.firing.sum())
        return out
