"""What the monitor knows about one run: its taps, metrics, publishers and counters.

Pure state with ``update`` methods; :mod:`monitor.store.records` writes it to Redis and reads it back,
so a restarted monitor continues where the last one stopped.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent_side.wire import ActFrame, EpFrame, Frame, MetFrame, TokFrame
from monitor.stats.analytics import AnalyticsConfig, Joiner, TapAnalytics
from monitor.stats.early import FailureProfile
from monitor.stats.moments import Moments, Recent

__all__ = [
    "TapState",
    "MetricState",
    "RunState",
    "RejectFrame",
    "Outbox",
    "recent_rows",
    "OUTBOX_BYTES",
    "EARLY_TAP_BYTES",
    "EARLY_RUN_BYTES",
    "RUN_TAPS",
    "RUN_TAP_BYTES",
]

RECENT_ROWS = 512
RECENT_BYTES = 4 * 1024 * 1024  # per tap: wide taps keep fewer recent rows
OUTBOX_BYTES = 64 << 20  # records not yet in Redis (episodes, tokens), all runs together
EPISODE_BYTES = 256  # what one pending episode record holds in memory (a list of six floats)
EARLY_TAP_BYTES = 16 << 20  # a tap's rows held before the run's first metric frame
EARLY_RUN_BYTES = 64 << 20  # the same, all of a run's taps together
RUN_TAPS = 1024  # taps (streamed and encoded) one run may have
RUN_TAP_BYTES = 1 << 30  # what one run's taps' moments and recent rows may take together


class RejectFrame(ValueError):
    """A well-formed frame that does not fit the run's state (a tap whose width changed)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


TOKEN_PROMPTS = 512  # forwards whose tokens a run keeps


def recent_rows(width: int) -> int:
    """How many recent rows a tap of ``width`` float32 channels keeps."""
    return max(1, min(RECENT_ROWS, RECENT_BYTES // (4 * width)))


def tap_bytes(width: int) -> int:
    """What a tap's state holds in memory: four float64 moments a channel and its recent rows."""
    return 32 * width + recent_rows(width) * (4 * width + 16)


@dataclass
class Outbox:
    """The memory that records not yet written to Redis (episodes, tokens) may hold, all runs
    together: a record taken is held until its write succeeded; past ``limit_bytes`` a new one
    is let go and counted under its kind in ``dropped``."""

    limit_bytes: int = OUTBOX_BYTES
    pending_bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def take(self, kind: str, nbytes: int, records: int) -> bool:
        if self.pending_bytes + nbytes > self.limit_bytes:
            self.dropped[kind] += records
            return False
        self.pending_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.pending_bytes = max(0, self.pending_bytes - nbytes)


@dataclass
class _Early:
    """A tap's rows that came before any metric frame, oldest first, with running totals."""

    chunks: deque[tuple[np.ndarray, np.ndarray]] = field(default_factory=deque)
    rows: int = 0
    nbytes: int = 0


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
    new_episodes: list[list[float]] = field(default_factory=list)  # not yet written to Redis (the outbox)
    dirty: bool = True
    analytics_cfg: AnalyticsConfig | None = None  # None: no live analytics
    joiner: Joiner | None = None  # the run's step metrics (every name it logs), by (step, index)
    analytics: dict[str, TapAnalytics] = field(default_factory=dict)
    early: dict[str, _Early] = field(default_factory=dict)  # rows before any metrics
    early_bytes: int = 0  # all of early, in bytes
    greetings: int = 0  # the agents' hello messages (each takes a sequence number, and is no frame of data)
    early_dropped: int = 0  # rows let go from early past its byte budgets (counted, shown in status)
    analytics_dirty: bool = False  # analytics changed since they were last written
    failure_profiles: dict[str, FailureProfile] = field(default_factory=dict)
    rows: int = 0  # activation rows received
    lag_s: float = 0.0  # smoothed delay from the agent's send to the monitor's receive
    steps_per_s: float = 0.0
    rows_per_s: float = 0.0
    _rate_at: tuple[float, int, int] = (0.0, 0, 0)  # (time, steps, rows) at the last rates() call
    tokens: dict[int, None] = field(default_factory=dict)  # the steps whose tokens are kept, oldest first
    new_tokens: dict[int, str] = field(default_factory=dict)  # step -> JSON not yet written to Redis (the outbox)
    evicted_tokens: list[int] = field(default_factory=list)  # written to Redis once, to delete there
    outbox: Outbox = field(default_factory=Outbox)  # the monitor's, shared by its runs
    pending_bytes: int = 0  # this run's share of the outbox
    lost: Counter[str] = field(default_factory=Counter)  # kind -> records the outbox could not hold
    tap_bytes: int = 0  # what this run's taps' state holds

    @property
    def drops(self) -> int:
        return sum(p["drops"] for p in self.pubs.values())

    @property
    def unwatched(self) -> int:
        """Steps the run's agents ran with no monitor connected (their own count, in every frame)."""
        return sum(p.get("unwatched", 0) for p in self.pubs.values())

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
        self.pubs[frame.pub] = {"seq": frame.seq, "drops": frame.drops, "unwatched": frame.unwatched}

    def check(self, frame: Frame) -> None:
        """Refuse an activation frame whose width differs from what this tap has streamed, or a
        new tap past the run's budget (RUN_TAPS taps, RUN_TAP_BYTES of their state)."""
        if isinstance(frame, ActFrame):
            tap = self.taps.get(frame.tap)
            width = frame.data.shape[1]
            if tap is not None and tap.width != width:
                raise RejectFrame("width_changed", f"{self.run}/{frame.tap}: width {width}, was {tap.width}")
            if tap is None and (len(self.taps) >= RUN_TAPS or self.tap_bytes + tap_bytes(width) > RUN_TAP_BYTES):
                raise RejectFrame(
                    "run_budget",
                    f"{self.run}: a new tap {width} wide is past {RUN_TAPS} taps or {RUN_TAP_BYTES >> 20} MiB of tap state",
                )

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
            n = len(frame.episodes)
            if self.outbox.take("episodes", n * EPISODE_BYTES, n):
                self.pending_bytes += n * EPISODE_BYTES
                self.new_episodes.extend(frame.episodes)
            else:
                self.lost["episodes"] += n
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
                        early = self.early.pop(name, None)
                        if early is not None:
                            self.early_bytes -= early.nbytes
                            for data, pos in early.chunks:
                                an.offer(data, pos, self.joiner)
                        an.retry(self.joiner)
                        self.analytics_dirty = True
                self.early.clear()  # a tap without analytics (too wide) has nothing to wait for
                self.early_bytes = 0

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
        :func:`agent_side.wire.encode_tok`); the oldest beyond TOKEN_PROMPTS are let go (from
        Redis too: it keeps the newest only). Held in the outbox until written; one the outbox
        cannot hold is counted in ``lost``."""
        blob = json.dumps(tokens)
        if not self.outbox.take("tokens", len(blob), 1):
            self.lost["tokens"] += 1
            return
        self.pending_bytes += len(blob)
        self._forget_tokens(step)
        self.tokens[step] = None
        self.new_tokens[step] = blob
        while len(self.tokens) > TOKEN_PROMPTS:
            self._forget_tokens(next(iter(self.tokens)))

    def _forget_tokens(self, step: int) -> None:
        if step not in self.tokens:
            return
        del self.tokens[step]
        blob = self.new_tokens.pop(step, None)
        if blob is None:
            self.evicted_tokens.append(step)  # written once: delete it there
        else:  # never written: nothing to delete, its outbox memory is free again
            self.pending_bytes -= len(blob)
            self.outbox.release(len(blob))

    def written(self, episodes: int, tokens: dict[int, str], evicted: int) -> None:
        """The outbox records a write took are in Redis: let them go (the first ``episodes``,
        these ``tokens`` unless replaced since, the first ``evicted`` deletions)."""
        del self.new_episodes[:episodes]
        freed = episodes * EPISODE_BYTES
        for step, blob in tokens.items():
            if self.new_tokens.get(step) is blob:
                del self.new_tokens[step]
                freed += len(blob)
        del self.evicted_tokens[:evicted]
        self.pending_bytes -= freed
        self.outbox.release(freed)

    def add_rows(self, tap_name: str, data: np.ndarray, pos: np.ndarray, lead: list[int]) -> None:
        """A tap's rows (streamed, or latents the monitor encoded) into every live statistic."""
        self.steps = max(self.steps, int(pos[:, 0].max()) + 1)
        tap = self.taps.get(tap_name)
        if tap is None:
            tap = self.taps[tap_name] = TapState.empty(data.shape[1], data.dtype.name)
            self.tap_bytes += tap_bytes(tap.width)
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
        elif self.analytics_cfg is not None and self.joiner is None and tap.width <= self.analytics_cfg.max_channels:
            self._hold_early(tap_name, data, pos)

    def _hold_early(self, tap_name: str, data: np.ndarray, pos: np.ndarray) -> None:
        """Hold rows that came before the run's first metric frame (metrics of these steps may
        follow): an agent's first frames can carry more rows than one window. Up to a joiner's
        worth of rows a tap, within EARLY_TAP_BYTES a tap and EARLY_RUN_BYTES a run; past them
        the oldest go, counted in ``early_dropped``. Constant work a frame, whatever is held."""
        cfg = self.analytics_cfg
        assert cfg is not None
        early = self.early.get(tap_name)
        if early is None:
            early = self.early[tap_name] = _Early()
        chunk = (data.copy(), pos.copy())
        nbytes = chunk[0].nbytes + chunk[1].nbytes
        early.chunks.append(chunk)
        early.rows += len(data)
        early.nbytes += nbytes
        self.early_bytes += nbytes
        max_rows = max(8192, 4 * cfg.window_steps)
        while early.chunks and (early.rows > max_rows or early.nbytes > EARLY_TAP_BYTES or self.early_bytes > EARLY_RUN_BYTES):
            d, p = early.chunks.popleft()
            early.rows -= len(d)
            early.nbytes -= d.nbytes + p.nbytes
            self.early_bytes -= d.nbytes + p.nbytes
            self.early_dropped += len(d)

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
