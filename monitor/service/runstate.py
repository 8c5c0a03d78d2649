"""What the monitor knows about one run: its taps, metrics, publishers and counters.

Pure state with ``update`` methods; :mod:`monitor.store.records` writes it to Redis and reads it back,
so a restarted monitor continues where the last one stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent_side.wire import ActFrame, EpFrame, Frame, MetFrame, TokFrame
from monitor.stats.analytics import AnalyticsConfig, Joiner, TapAnalytics
from monitor.stats.early import FailureProfile
from monitor.stats.moments import Moments, Recent

__all__ = ["TapState", "MetricState", "RunState", "RejectFrame", "recent_rows"]

RECENT_ROWS = 512
RECENT_BYTES = 4 * 1024 * 1024  # per tap: wide taps keep fewer recent rows


class RejectFrame(ValueError):
    """A well-formed frame that does not fit the run's state (a tap whose width changed)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


TOKEN_PROMPTS = 512  # forwards whose tokens a run keeps


def recent_rows(width: int) -> int:
    """How many recent rows a tap of ``width`` float32 channels keeps."""
    return max(1, min(RECENT_ROWS, RECENT_BYTES // (4 * width)))


@dataclass
class TapState:
    width: int
    dtype: str
    moments: Moments
    recent: Recent
    rows: int = 0
    frames: int = 0
    lead: list[int] = field(default_factory=list)
    dirty: bool = True

    @classmethod
    def empty(cls, width: int, dtype: str) -> TapState:
        """A tap seen for the first time."""
        return cls(width=width, dtype=dtype, moments=Moments(width), recent=Recent(recent_rows(width), width, np.float32))

    def update(self, data: np.ndarray, pos: np.ndarray) -> None:
        self.moments.update(data)
        self.recent.update(data, pos)
        self.rows += data.shape[0]
        self.frames += 1
        self.dirty = True

    def info(self) -> dict[str, Any]:
        return {"width": self.width, "dtype": self.dtype, "rows": self.rows, "frames": self.frames, "lead": self.lead}


@dataclass
class MetricState:
    """Metric columns by name; each frame's names map into this set of columns."""

    names: list[str] = field(default_factory=list)
    rows: int = 0
    moments: dict[str, Moments] = field(default_factory=dict)
    recent: dict[tuple[str, ...], Recent] = field(default_factory=dict)

    def update(self, names: list[str], data: np.ndarray, pos: np.ndarray) -> None:
        for j, name in enumerate(names):
            m = self.moments.get(name)
            if m is None:
                self.names.append(name)
                m = self.moments[name] = Moments(1)
            m.update(data[:, j : j + 1])
        key = tuple(names)
        ring = self.recent.get(key)
        if ring is None:
            ring = self.recent[key] = Recent(RECENT_ROWS, len(names), np.float64)
        ring.update(data, pos)
        self.rows += data.shape[0]


@dataclass
class RunState:
    run: str
    steps: int = 0
    gaps: int = 0
    frames: int = 0
    episodes: int = 0
    first_seen: float = field(default_factory=time.time)
    last_seen: float = 0.0
    taps: dict[str, TapState] = field(default_factory=dict)
    metrics: MetricState = field(default_factory=MetricState)
    pubs: dict[str, dict[str, int]] = field(default_factory=dict)  # pub -> {seq, drops}
    returns: list[float] = field(default_factory=list)  # last 100 episode returns
    new_episodes: list[list[float]] = field(default_factory=list)  # not yet written to Redis
    dirty: bool = True
    analytics_cfg: AnalyticsConfig | None = None  # None: no live analytics
    joiner: Joiner | None = None  # the run's step metrics (every name it logs), by (step, index)
    analytics: dict[str, TapAnalytics] = field(default_factory=dict)
    early: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # rows before any metrics
    analytics_dirty: bool = False  # analytics changed since they were last written
    failure_profiles: dict[str, FailureProfile] = field(default_factory=dict)
    rows: int = 0  # activation rows received
    lag_s: float = 0.0  # smoothed delay from the agent's send to the monitor's receive
    steps_per_s: float = 0.0
    rows_per_s: float = 0.0
    _rate_at: tuple[float, int, int] = (0.0, 0, 0)  # (time, steps, rows) at the last rates() call
    tokens: dict[int, dict[str, Any] | None] = field(default_factory=dict)  # step -> tokens, oldest first (None: in Redis only)
    new_tokens: dict[int, dict[str, Any]] = field(default_factory=dict)  # not yet written to Redis
    evicted_tokens: list[int] = field(default_factory=list)  # to delete from Redis

    @property
    def drops(self) -> int:
        return sum(p["drops"] for p in self.pubs.values())

    def sequence(self, frame: Frame) -> None:
        """Count a gap when a publisher's sequence number jumps; refuse a repeat."""
        p = self.pubs.get(frame.pub)
        last = p["seq"] if p is not None else -1
        if frame.seq <= last:
            raise RejectFrame("stale_seq", f"seq {frame.seq} after {last} from {frame.pub}")
        self.gaps += frame.seq - last - 1
        if p is None and self.pubs and self.joiner is not None:
            # another process streams this run now (an agent restarted under the same name counts
            # its steps from 0 again): its rows must not pair with the old one's metric rows
            self.joiner = Joiner(self.joiner.names, capacity=self.joiner.capacity)
        self.pubs[frame.pub] = {"seq": frame.seq, "drops": frame.drops}

    def check(self, frame: Frame) -> None:
        """Refuse an activation frame whose width differs from what this tap has streamed."""
        if isinstance(frame, ActFrame):
            tap = self.taps.get(frame.tap)
            if tap is not None and tap.width != frame.data.shape[1]:
                raise RejectFrame("width_changed", f"{self.run}/{frame.tap}: width {frame.data.shape[1]}, was {tap.width}")

    def update(self, frame: Frame, now: float) -> None:
        self.sequence(frame)  # first: a frame refused below is counted as rejected, not also as a gap
        self.check(frame)
        self.frames += 1
        self.last_seen = now
        self.dirty = True
        self.lag_s += 0.1 * (max(0.0, now - frame.t) - self.lag_s)
        if isinstance(frame, EpFrame):
            self.episodes += len(frame.episodes)
            self.returns.extend(e[2] for e in frame.episodes)
            del self.returns[:-100]
            self.new_episodes.extend(frame.episodes)
            self.steps = max(self.steps, int(max(e[0] for e in frame.episodes)) + 1)
            if self.analytics_cfg is not None:
                for e in frame.episodes:
                    if e[4]:  # terminated: a failure, not a time limit
                        for name, t in self.taps.items():
                            prof = self.failure_profiles.get(name)
                            if prof is None:
                                prof = self.failure_profiles[name] = FailureProfile(t.width, k=self.analytics_cfg.early_k)
                            prof.failed(int(e[0]), int(e[1]))
            return
        if isinstance(frame, TokFrame):
            self.add_tokens(frame.step, {"rows": frame.tokens, "context": frame.context, "start": frame.start})
        elif isinstance(frame, ActFrame):
            self.rows += frame.rows
            self.add_rows(frame.tap, frame.data, frame.pos, frame.lead)
        elif isinstance(frame, MetFrame):
            self.steps = max(self.steps, int(frame.pos[:, 0].max()) + 1)
            self.metrics.update(frame.names, frame.data, frame.pos)
            if self.analytics_cfg is not None:
                if self.joiner is None:
                    self.joiner = Joiner(frame.names, capacity=max(8192, 4 * self.analytics_cfg.window_steps))
                self.joiner.add(frame.data, frame.pos, frame.names)  # every metric, whichever frame it came in
                for name, t in self.taps.items():
                    an = self._analytics_for(name, t.width)
                    if an is not None:
                        for data, pos in self.early.pop(name, []):
                            an.offer(data, pos, self.joiner)
                        an.retry(self.joiner)
                        self.analytics_dirty = True

    def rates(self, now: float) -> None:
        """Update steps/s and rows/s over the time since the last call (smoothed)."""
        t0, s0, r0 = self._rate_at
        if t0 and now - t0 > 0.05:
            dt = now - t0
            a = min(1.0, dt / 5.0)  # about a 5 s average
            self.steps_per_s += a * (max(0, self.steps - s0) / dt - self.steps_per_s)
            self.rows_per_s += a * (max(0, self.rows - r0) / dt - self.rows_per_s)
        if not t0 or now - t0 > 0.05:
            self._rate_at = (now, self.steps, self.rows)

    def add_tokens(self, step: int, tokens: dict[str, Any]) -> None:
        """The tokens of one language-model forward (``{"rows", "context", "start"}``, see
        :func:`agent_side.wire.encode_tok`); the oldest beyond TOKEN_PROMPTS are let go."""
        self.tokens.pop(step, None)
        self.tokens[step] = self.new_tokens[step] = tokens
        while len(self.tokens) > TOKEN_PROMPTS:
            old = next(iter(self.tokens))
            del self.tokens[old]
            self.new_tokens.pop(old, None)
            self.evicted_tokens.append(old)

    def add_rows(self, tap_name: str, data: np.ndarray, pos: np.ndarray, lead: list[int]) -> None:
        """A tap's rows (streamed, or latents the monitor encoded) into every live statistic."""
        self.steps = max(self.steps, int(pos[:, 0].max()) + 1)
        tap = self.taps.get(tap_name)
        if tap is None:
            tap = self.taps[tap_name] = TapState.empty(data.shape[1], data.dtype.name)
        tap.lead = lead
        tap.update(data, pos)
        prof = self.failure_profiles.get(tap_name)
        if prof is not None and prof.waiting:
            m = tap.moments.get()
            prof.absorb(tap.recent.get(), int(pos[-1, 0]), m["mean"], m["std"])
            self.analytics_dirty = True
        an = self._analytics_for(tap_name, tap.width)
        if an is not None and self.joiner is not None:  # (there is an analytics object only once a joiner exists)
            an.offer(data, pos, self.joiner)
            self.analytics_dirty = True
        elif self.analytics_cfg is not None and self.joiner is None:  # metrics of these steps may follow
            early = self.early.setdefault(tap_name, [])
            early.append((data.copy(), pos.copy()))
            # an agent's first frames can carry more rows than one window before its first metric
            # frame arrives: hold up to a joiner's worth (64 MiB at most) so none go unpaired
            limit = max(self.analytics_cfg.window_steps, min(8192, (64 << 20) // (8 * data.shape[1])))
            while sum(len(d) for d, _ in early) > limit and len(early) > 1:
                early.pop(0)

    def restore_analytics(self, saved: dict[str, dict[str, Any]]) -> None:
        """After a monitor restart: rebuild each tap's analytics by replaying the recent rows kept
        in Redis against the recent metric rows, then put back the all-time top examples and the
        paired count from ``saved`` (:meth:`Store.analytics` of each tap). The rolling window
        starts from the replayed rows and refills as new ones come."""
        cfg = self.analytics_cfg
        if cfg is None:
            return
        replay: Joiner | None = None  # the kept metric rows, for the replay only: an agent that
        for tap, state in saved.items():  # restarts the run at step 0 must not pair with them later
            ts = self.taps.get(tap)
            if ts is None or ts.width != state["width"] or not self.metrics.recent:
                continue
            if self.joiner is None:
                self.joiner = Joiner(list(state["metrics"]), capacity=max(8192, 4 * cfg.window_steps))
            if replay is None:
                replay = Joiner(self.joiner.names, capacity=sum(r.capacity for r in self.metrics.recent.values()))
                for names, ring in self.metrics.recent.items():
                    replay.add(*ring.get(), list(names))
                self.joiner._columns(replay.names)  # one column order for the replay and what follows
            an = self._analytics_for(tap, ts.width)
            if an is None:
                continue
            an.offer(*ts.recent.get(), replay)
            an.pending_x, an.pending_keys = [], []  # rows whose metric rows are gone will not be paired
            an.restore_top(state)
            an.paired = max(an.paired, int(state["paired"]))

    def _analytics_for(self, tap: str, width: int) -> TapAnalytics | None:
        cfg = self.analytics_cfg
        if cfg is None or self.joiner is None or width > cfg.max_channels:
            return None
        an = self.analytics.get(tap)
        if an is None:
            an = self.analytics[tap] = TapAnalytics(width, self.joiner.names, cfg)
        return an
