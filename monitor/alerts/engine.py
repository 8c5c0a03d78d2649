"""Alert rules evaluated on every activation row: pending -> firing -> resolved, per channel.

One :class:`_Track` per (rule, run, tap) holds every channel's state as arrays, so a row costs a
few vector operations whatever the width. Only transitions become events: an alert fires once
(deduplicated by rule, run, tap and channel) and resolves once; ``pending`` is visible in
:meth:`AlertEngine.active` but not sent.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Any

import numpy as np

from monitor.alerts.rules import Rule, RulesFile
from monitor.stats.analytics import TapAnalytics

__all__ = ["AlertEngine", "WARMUP_ROWS"]

log = logging.getLogger(__name__)

WARMUP_ROWS = 20  # rows of baseline before zscore and wake rules may fire


class _Track:
    def __init__(self, rule: Rule, width: int) -> None:
        self.rule = rule
        self.cols = np.arange(width) if rule.channels is None else np.array([c for c in rule.channels if c < width], dtype=int)
        n = len(self.cols)
        self.hold = np.zeros(n, dtype=np.int64)
        self.firing = np.zeros(n, dtype=bool)
        self.last_true = np.zeros(n, dtype=np.int64)
        self.quiet_until = np.full(n, -1, dtype=np.int64)
        self.mean = np.zeros(n)
        self.var = np.zeros(n)
        self.rate = np.zeros(n)
        self.seen = 0
        self.sign = np.zeros(n)  # corr_flip: sign of the last strong correlation

    def condition(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(condition, z) for one row of this track's channels; updates the baselines after."""
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
            self.rate += r.baseline_alpha * (on - self.rate)
        a = r.baseline_alpha
        if self.seen == 0:
            self.mean[:] = x
        else:
            d = x - self.mean
            self.mean += a * d
            self.var = (1 - a) * (self.var + a * d * d)
        self.seen += 1
        return cond, z

    def step(self, cond: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance the state machine one row; returns (newly firing, newly resolved) masks."""
        r = self.rule
        self.hold = np.where(cond, self.hold + 1, 0)
        newly = ~self.firing & (self.hold >= max(1, r.for_steps)) & (step >= self.quiet_until)
        self.firing |= newly
        self.last_true[cond & self.firing] = step
        resolved = self.firing & ~cond & (step - self.last_true > r.keep_firing_for)
        self.firing &= ~resolved
        self.quiet_until[resolved] = step + r.cooldown
        return newly, resolved


class AlertEngine:
    """Evaluates the rules of a :class:`RulesFile` against the frames a monitor receives."""

    def __init__(self, rules: RulesFile) -> None:
        self.rules = rules
        self._tracks: dict[tuple[str, str, str], _Track | None] = {}

    def _track(self, rule: Rule, run: str, tap: str, width: int) -> _Track | None:
        key = (rule.name, run, tap)
        if key not in self._tracks:
            match = fnmatch.fnmatchcase(run, rule.run) and fnmatch.fnmatchcase(tap, rule.tap)
            tr = _Track(rule, width) if match else None
            self._tracks[key] = tr if tr is None or len(tr.cols) else None
        return self._tracks[key]

    def on_rows(
        self, run: str, tap: str, data: np.ndarray, pos: np.ndarray, analytics: TapAnalytics | None
    ) -> list[dict[str, Any]]:
        """Events (firing or resolved alerts) caused by these activation rows, in order."""
        events: list[dict[str, Any]] = []
        width = data.shape[1]
        for rule in self.rules.rules:
            tr = self._track(rule, run, tap, width)
            if tr is None:
                continue
            if rule.kind == "corr_flip":
                events += self._corr_flip(tr, run, tap, int(pos[-1, 0]), int(pos[-1, 1]), analytics)
                continue
            x_all = data[:, tr.cols].astype(np.float64)
            for i in range(len(data)):
                x = x_all[i]
                cond, z = tr.condition(x)
                newly, resolved = tr.step(cond, int(pos[i, 0]))
                for j in np.nonzero(newly | resolved)[0]:
                    events.append(
                        self._event(
                            rule,
                            run,
                            tap,
                            int(tr.cols[j]),
                            "firing" if newly[j] else "resolved",
                            int(pos[i, 0]),
                            int(pos[i, 1]),
                            float(x[j]),
                            float(z[j]),
                            analytics,
                        )
                    )
        return events

    def _corr_flip(self, tr: _Track, run: str, tap: str, step: int, index: int, an: TapAnalytics | None) -> list[dict[str, Any]]:
        rule = tr.rule
        if an is None or rule.metric not in an.metric_names or an.rolling.n < 3:
            return []
        r = an.rolling.get()[tr.cols, an.metric_names.index(rule.metric)]
        strong = np.abs(np.nan_to_num(r)) >= rule.min_abs
        sign = np.sign(np.nan_to_num(r))
        cond = strong & (tr.sign != 0) & (sign != tr.sign)
        tr.sign = np.where(strong, sign, tr.sign)
        newly, resolved = tr.step(cond, step)
        return [
            self._event(rule, run, tap, int(tr.cols[j]), "firing" if newly[j] else "resolved", step, index, float(r[j]), 0.0, an)
            for j in np.nonzero(newly | resolved)[0]
        ]

    def _event(
        self,
        rule: Rule,
        run: str,
        tap: str,
        ch: int,
        state: str,
        step: int,
        index: int,
        value: float,
        z: float,
        an: TapAnalytics | None,
    ) -> dict[str, Any]:
        corrs: dict[str, float] = {}
        if an is not None and an.rolling.n >= 3:
            r = an.rolling.get()[ch]
            order = [j for j in np.argsort(-np.abs(np.nan_to_num(r))) if np.isfinite(r[j])][:3]
            corrs = {an.metric_names[j]: round(float(r[j]), 4) for j in order}
        what = {
            "zscore": f"z={z:+.1f} over its baseline",
            "threshold": f"value {value:+.3f} crossed the threshold",
            "wake": "a rarely active channel woke up",
            "corr_flip": f"its correlation with {rule.metric} flipped to {value:+.2f}",
        }[rule.kind]
        text = f"[{rule.severity}] {rule.name} {state}: {run} {tap} #{ch} at step {step}: {what}"
        if corrs:
            text += "; tracks " + ", ".join(f"{m} (r={r:+.2f})" for m, r in corrs.items())
        return {
            "id": f"{rule.name}|{run}|{tap}|{ch}",
            "rule": rule.name,
            "kind": rule.kind,
            "state": state,
            "severity": rule.severity,
            "labels": dict(rule.labels),
            "run": run,
            "tap": tap,
            "latent": ch,
            "step": step,
            "index": index,
            "value": round(value, 6),
            "z": round(z, 4),
            "correlations": corrs,
            "explanation": None,
            "time": time.time(),
            "text": text,
        }

    def active(self) -> list[dict[str, Any]]:
        """(rule, run, tap, channel, state) of every pending or firing channel."""
        out = []
        for (name, run, tap), tr in self._tracks.items():
            if tr is None:
                continue
            for j in np.nonzero(tr.firing | (tr.hold > 0))[0]:
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
