"""Run-level views for the panel, read from Redis as plain tables (no Streamlit here): the runs
newest first with a live/ended badge, their rate history, episodes with how each ended, alerts
with their current explanations, and "what the agent is thinking" now.

Every function reads; none writes. :class:`Sampler` keeps, in the panel's own memory, what Redis
holds only as a current value (steps/s, drops, lag), so the panel can draw its recent history.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from monitor.store import keys
from monitor.store.keys import LATENT_PREFIX
from monitor.store.records import Store

__all__ = [
    "LIVE_S",
    "Sampler",
    "active_alerts",
    "alert_rows",
    "alert_timeline",
    "episodes_table",
    "explanations_for",
    "fmt_time",
    "run_rows",
    "runs_newest_first",
    "thinking",
    "unit_of",
]

LIVE_S = 10.0  # a run that sent something this recently is live; after that, ended (or paused)
STATES = ("pending", "firing", "resolved", "inactive", "applied", "reverted", "refused")
STATE_COLORS = ("#e9a23b", "#d62728", "#2ca02c", "#9e9e9e", "#1f77b4", "#9467bd", "#000000")


def fmt_time(t: float | None) -> str:
    """A unix time in the panel's local zone, with the zone named (``2026-12-01 14:15:02 UTC``)."""
    if t is None or not math.isfinite(t) or t <= 0:
        return ""
    dt = datetime.fromtimestamp(t).astimezone()
    return f"{dt:%Y-%m-%d %H:%M:%S} {dt.tzname() or format(dt, '%z')}"


def unit_of(tap: str) -> str:
    """What one unit of a tap is called: a latent of a transcoder's latents, a channel of a raw tap."""
    return "latent" if tap.startswith(LATENT_PREFIX) else "channel"


def runs_newest_first(store: Store) -> list[str]:
    """Run names, the most recently seen first."""
    return [r.decode() for r in store.r.zrevrange(keys.RUNS, 0, -1)]


def run_rows(store: Store, runs: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per run, newest first: live or ended, counters, rates, lag, drops and taps with widths."""
    runs = runs_newest_first(store) if runs is None else runs
    p = store.r.pipeline(transaction=False)
    for run in runs:
        p.hgetall(keys.run(run))
        p.hvals(keys.run_pubs(run))
        p.hgetall(keys.run_taps(run))
    got = p.execute()
    now = time.time()
    out = []
    for i, run in enumerate(runs):
        h = {k.decode(): v.decode() for k, v in got[3 * i].items()}
        if not h:
            continue
        last_seen = float(h.get("last_seen", 0.0))
        age = max(0.0, now - last_seen)
        live = age < LIVE_S
        taps = {t.decode(): json.loads(v) for t, v in got[3 * i + 2].items()}
        out.append(
            {
                "run": run,
                "status": "live" if live else "ended",
                "steps": int(h.get("steps", 0)),
                "steps/s": round(float(h.get("steps_per_s", 0.0)), 1) if live else 0.0,
                "drops": sum(int(json.loads(v).get("drops", 0)) for v in got[3 * i + 1]),
                "gaps": int(h.get("gaps", 0)),
                "lag ms": round(1000 * float(h.get("lag_s", 0.0)), 1),
                "episodes": int(h.get("episodes", 0)),
                "return (last 100)": round(float(h.get("return_mean_100", 0.0)), 1),
                "last seen": fmt_time(last_seen),
                "last seen s": round(age, 1),
                "taps": {t: int(v["width"]) for t, v in sorted(taps.items())},
            }
        )
    return out


class Sampler:
    """The recent history of each run's steps/s, drops and lag, sampled from the rows the panel
    reads (at most every ``every_s``, the last ``keep`` samples); one per panel process, shared by
    its viewers, so the sparklines start when the panel does."""

    FIELDS = ("steps/s", "drops", "lag ms")

    def __init__(self, *, every_s: float = 1.0, keep: int = 120) -> None:
        self.every_s, self.keep = every_s, keep
        self._lock = threading.Lock()
        self._series: dict[str, dict[str, deque[float]]] = {}
        self._last: dict[str, float] = {}
        self.modes: dict[str, dict[int, str]] = {}  # run -> episode end step -> how it ended, as seen

    def sample(self, rows: list[dict[str, Any]], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for row in rows:
                run = row["run"]
                if now - self._last.get(run, -math.inf) < self.every_s:
                    continue
                self._last[run] = now
                series = self._series.setdefault(run, {f: deque(maxlen=self.keep) for f in self.FIELDS})
                for f in self.FIELDS:
                    series[f].append(float(row[f]))

    def series(self, run: str) -> dict[str, list[float]]:
        with self._lock:
            got = self._series.get(run)
            return {f: list(got[f]) if got else [] for f in self.FIELDS}

    def remember_modes(self, run: str, modes: dict[int, str]) -> dict[int, str]:
        """Add what the newest rows told of how episodes ended; everything remembered for ``run``."""
        with self._lock:
            known = self.modes.setdefault(run, {})
            known.update(modes)
            if len(known) > 5000:
                for step in sorted(known)[: len(known) - 5000]:
                    del known[step]
            return dict(known)


# -- episodes -------------------------------------------------------------------------------------
def _cartpole_end(obs: dict[str, float], x_max: float = 2.4, theta_max: float = 12 * 2 * math.pi / 360) -> str:
    """How a terminated CartPole episode ended, from the observation its last action was taken
    on: gymnasium's Euler step moves x by 0.02 x_dot and theta by 0.02 theta_dot, so the end state
    is exact (the labels of :func:`monitor.experiments.failure_modes.cartpole`)."""
    x = obs["cart_pos"] + 0.02 * obs["cart_vel"]
    theta = obs["pole_angle"] + 0.02 * obs["angle_vel"]
    if abs(x) > x_max:
        return "cart_out"
    if abs(theta) > theta_max:
        return "pole_left" if theta < 0 else "pole_right"
    return "terminated"


def end_modes(store: Store, run: str, episodes: list[dict[str, Any]]) -> dict[int, str]:
    """How the terminated episodes whose last step is still among the recent metric rows ended,
    where the run logs CartPole's observations by name (``tap.wrap(env, obs_names=...)``)."""
    met = store.recent_metrics(run)
    need = ("cart_pos", "cart_vel", "pole_angle", "angle_vel")
    if not all(n in met for n in need):
        return {}
    pos = met[need[0]][1]
    at = {(int(s), int(i)): r for r, (s, i) in enumerate(pos)}
    out = {}
    for e in episodes:
        key = (int(e["step"]), int(e["index"]))
        if int(e["terminated"]) and key in at:
            out[key[0]] = _cartpole_end({n: float(met[n][0][at[key]]) for n in need})
    return out


def episodes_table(store: Store, run: str, *, last: int = 500, modes: dict[int, str] | None = None) -> pd.DataFrame | None:
    """The newest ``last`` episode ends: step, return, length, and how each ended (survived when
    truncated, the failure mode where known, else failed)."""
    eps = store.episodes(run, count=last)
    if not eps:
        return None
    modes = modes or {}
    rows = []
    for e in eps:
        step = int(e["step"])
        end = "survived" if int(e["truncated"]) or not int(e["terminated"]) else modes.get(step, "failed")
        rows.append({"step": step, "return": float(e["return"]), "length": int(e["length"]), "end": end, "env": int(e["index"])})
    return pd.DataFrame(rows)


# -- alerts ---------------------------------------------------------------------------------------
def explanations_for(store: Store, run: str, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The current explanations of these (tap, latent) pairs of ``run`` (one read), where written."""
    pairs = list(dict.fromkeys(pairs))
    if not pairs:
        return {}
    blobs = store.r.hmget(keys.explanations(run), [f"{t}/{j}" for t, j in pairs])
    out = {}
    for pair, blob in zip(pairs, blobs, strict=True):
        if blob:
            e = json.loads(blob)
            if not e.get("error"):
                out[pair] = e
    return out


def short(tap: str, chars: int = 36) -> str:
    """A long tap name (a transcoder's latents) cut to its last ``chars`` characters."""
    return tap if len(tap) <= chars else "…" + tap[-(chars - 1) :]


def _where(a: dict[str, Any]) -> str:
    if a.get("latent") is None:
        return ""
    return f"{a.get('unit') or unit_of(a.get('tap') or '')} {a['latent']}"


def alert_rows(store: Store, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alert events as table rows, each with its latent's explanation as it is now (an alert that
    fired before its latent was explained gets the label written since)."""
    by_run: dict[str, list[tuple[str, int]]] = {}
    for a in alerts:
        if a.get("latent") is not None and a.get("tap"):
            by_run.setdefault(a.get("run", ""), []).append((a["tap"], int(a["latent"])))
    known = {run: explanations_for(store, run, pairs) for run, pairs in by_run.items()}
    rows = []
    for a in alerts:
        e = a.get("explanation") or {}
        if a.get("latent") is not None:
            e = known.get(a.get("run", ""), {}).get((a.get("tap"), int(a["latent"])), e)
        rows.append(
            {
                "time": fmt_time(a.get("time")),
                "state": a.get("state"),
                "severity": a.get("severity"),
                "rule": a.get("rule"),
                "run": a.get("run"),
                "unit": _where(a),
                "step": a.get("step"),
                "explanation": e.get("label", ""),
                "tap": a.get("tap"),
                "_tap": a.get("tap"),
                "_latent": a.get("latent"),
            }
        )
    return rows


def alert_timeline(alerts: list[dict[str, Any]]) -> pd.DataFrame | None:
    """(step, time, rule, what, state) per alert event, for a timeline coloured by state."""
    if not alerts:
        return None
    return pd.DataFrame(
        [
            {
                "step": int(a.get("step", 0)),
                "time": fmt_time(a.get("time")),
                "rule": str(a.get("rule")),
                "what": f"{a.get('rule')} · {short(str(a.get('tap')))} {_where(a)}".strip(),
                "tap": str(a.get("tap")),
                "state": str(a.get("state")),
                "run": str(a.get("run")),
            }
            for a in alerts
        ]
    )


def active_alerts(store: Store, run: str | None = None) -> list[dict[str, Any]]:
    """The alerts pending or firing now (what the monitors hold), of ``run`` or all runs."""
    out = []
    for v in store.r.hvals(keys.ALERTS_ACTIVE):
        try:
            a = json.loads(v)
        except ValueError:
            continue
        if isinstance(a, dict) and (run is None or a.get("run") == run):
            out.append(a)
    return out


# -- what the agent is thinking -------------------------------------------------------------------
def thinking(store: Store, run: str, *, top: int = 4) -> list[dict[str, Any]]:
    """The run's most active latents at its newest step, across its latent taps: how far each
    stands above its usual level (z against its lifetime moments), its explanation's label and
    scores, and the alerts pending or firing on it. Latents at or below 0 are not active."""
    found = []
    for tap in sorted(t for t in store.taps(run) if t.startswith(LATENT_PREFIX)):
        got, mom = store.recent(run, tap), store.tap_moments(run, tap)
        if got is None or len(got[0]) == 0:
            continue
        rows, pos = got
        newest = int(pos[:, 0].max())
        v = rows[pos[:, 0] == newest].mean(axis=0).astype(float)
        mean = np.asarray(mom["mean"], dtype=float) if mom else np.zeros_like(v)
        std = np.asarray(mom["std"], dtype=float) if mom else np.ones_like(v)
        z = (v - mean) / np.where(std > 1e-12, std, np.inf)
        for j in np.nonzero(v > 0)[0]:
            peak = float(mom["max"][j]) if mom else float(v[j])
            found.append(
                {
                    "tap": tap,
                    "latent": int(j),
                    "value": float(v[j]),
                    "z": float(z[j]),
                    "of_max": v[j] / peak if peak > 0 else 0.0,
                    "step": newest,
                }
            )
    found.sort(key=lambda f: -f["z"])
    found = found[:top]
    labels = explanations_for(store, run, [(f["tap"], f["latent"]) for f in found])
    active = active_alerts(store, run)
    for f in found:
        e = labels.get((f["tap"], f["latent"])) or {}
        sc = e.get("score") or {}
        f["label"] = e.get("label", "")
        f["detection"] = sc.get("balanced_accuracy")
        f["simulation"] = sc.get("simulation")
        f["alerts"] = sorted(
            f"{a.get('rule')} {a.get('state')}" for a in active if a.get("tap") == f["tap"] and a.get("latent") == f["latent"]
        )
    return found
