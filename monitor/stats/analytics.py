"""Live analytics of one tap against its run's metrics: what each channel tracks.

Activation rows and metric rows of a step arrive in separate frames (the agent sends a tap's
rows before the step metrics). :class:`Joiner` pairs them by (step, index). Each paired row then
feeds a :class:`TapAnalytics`: rolling and exponentially weighted Pearson correlations of every
channel with every metric, rolling channel statistics, and the top-k activating steps with their
metric values. Quantile samples (what an explainer needs) come from the rolling window on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.stats.rolling import EWCorr, RollingCorr

__all__ = ["AnalyticsConfig", "DEFAULT_ANALYTICS", "Joiner", "TapAnalytics", "key_of", "pos_of", "pos_of_keys"]

_INDEX_BITS = 24
_INDEX_MASK = (1 << _INDEX_BITS) - 1


def key_of(pos: np.ndarray) -> np.ndarray:
    """One int64 per (step, index) row position."""
    return (pos[:, 0].astype(np.int64) << _INDEX_BITS) | (pos[:, 1].astype(np.int64) & _INDEX_MASK)


def pos_of_keys(keys: np.ndarray) -> np.ndarray:
    """[n, 2] (step, index) of :func:`key_of` keys."""
    return np.stack([keys >> _INDEX_BITS, keys & _INDEX_MASK], axis=1)


def pos_of(key: int) -> tuple[int, int]:
    """The (step, index) of a :func:`key_of` key."""
    return int(key) >> _INDEX_BITS, int(key) & _INDEX_MASK


PENDING_BYTES = 64 << 20  # activation rows waiting for their metric rows, per tap


@dataclass(frozen=True)
class AnalyticsConfig:
    window_steps: int = 1000
    ew_alpha: float = 0.01
    top_k: int = 10
    quantiles: int = 10
    max_channels: int = 16384  # wider taps get moments only
    early_k: int = 20  # steps before a failure that the early-warning profile looks at


DEFAULT_ANALYTICS = AnalyticsConfig()


class Joiner:
    """The recent metric rows of a run, findable by (step, index); bounded to ``capacity`` rows.

    Every metric name the run logs is a column, whichever frame it comes in (the env wrapper's
    step metrics, ``tap.log()``'s): a step's row fills as its frames arrive, NaN where a metric
    has not come. Each set of names that arrives together is a *group*; a row is :meth:`final`
    once every group has reached its step (a group's frames come in step order) or has stopped
    logging (nothing for a window of steps).
    """

    def __init__(self, names: list[str] | tuple[str, ...] = (), capacity: int = 8192) -> None:
        self.names: list[str] = []
        self.col: dict[str, int] = {}
        self.capacity = capacity
        self.values = np.zeros((capacity, 0))
        self.keys = np.full(capacity, -1, dtype=np.int64)
        self.where: dict[int, int] = {}
        self.n = 0
        self.groups: dict[tuple[str, ...], int] = {}  # names that arrive together -> newest step delivered
        self.newest = -1
        self._columns(list(names))

    def _columns(self, names: list[str]) -> None:
        new = [n for n in dict.fromkeys(names) if n not in self.col]
        if new:
            for n in new:
                self.col[n] = len(self.names)
                self.names.append(n)
            self.values = np.concatenate([self.values, np.full((self.capacity, len(new)), np.nan)], axis=1)

    def add(self, data: np.ndarray, pos: np.ndarray, names: list[str] | None = None) -> None:
        """Metric rows of ``names`` (default: the joiner's own) at their (step, index)."""
        names = self.names if names is None else list(names)
        self._columns(names)
        cols = np.array([self.col[n] for n in names], dtype=np.int64)
        for k, row in zip(key_of(pos).tolist(), np.asarray(data, dtype=np.float64), strict=True):
            slot = self.where.get(k)
            if slot is None:
                slot = self.n % self.capacity
                old = int(self.keys[slot])
                if old >= 0 and self.where.get(old) == slot:
                    del self.where[old]
                self.keys[slot] = k
                self.values[slot] = np.nan
                self.where[k] = slot
                self.n += 1
            self.values[slot, cols] = row
        if len(pos):
            step = int(pos[:, 0].max())
            group = tuple(sorted(names))
            self.groups[group] = max(self.groups.get(group, -1), step)
            self.newest = max(self.newest, step)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where the metric row has not arrived (or has left)."""
        get = self.where.get
        return np.fromiter((get(k, -1) for k in keys.tolist()), dtype=np.int64, count=len(keys))

    def final(self, keys: np.ndarray, slots: np.ndarray, window: int) -> np.ndarray:
        """Which rows (their keys and :meth:`lookup` slots) have every metric they will get."""
        ok = slots >= 0
        if not ok.any():
            return ok
        steps = keys >> _INDEX_BITS
        for last in self.groups.values():
            # a group's frames come in step order: once it has reached a step it has sent all of it
            # (a group that logs some rows or steps only has NaN there); one that stopped logging
            # for a window of steps holds nothing back
            if last > self.newest - window:
                ok &= last >= steps
        return ok


@dataclass
class TapAnalytics:
    """Correlations, rolling statistics and top examples of one tap's channels vs the metrics."""

    width: int
    metric_names: list[str]
    cfg: AnalyticsConfig = field(default_factory=AnalyticsConfig)

    def __post_init__(self) -> None:
        m, k = len(self.metric_names), self.cfg.top_k
        self.metric_names = list(self.metric_names)
        self.rolling = RollingCorr(self.width, m, window=self.cfg.window_steps, max_rows=self.window_rows_cap())
        self.ew = EWCorr(self.width, m, alpha=self.cfg.ew_alpha)
        self.top_value = np.full((k, self.width), -np.inf)
        self.top_key = np.full((k, self.width), -1, dtype=np.int64)
        self.top_metrics = np.full((k, self.width, m), np.nan)
        self.pending_x: list[np.ndarray] = []  # rows still waiting for their metrics
        self.pending_keys: list[np.ndarray] = []
        self.paired = 0
        self.unpaired_dropped = 0  # rows that waited too long for their metric rows

    def offer(self, data: np.ndarray, pos: np.ndarray, joiner: Joiner) -> None:
        """New activation rows: pair what can be paired now, keep the rest for later."""
        self.pending_x.append(np.asarray(data, dtype=np.float64))
        self.pending_keys.append(key_of(pos))
        self.retry(joiner)

    def retry(self, joiner: Joiner) -> None:
        if not self.pending_x:
            return
        if len(joiner.names) > len(self.metric_names):
            self._more_metrics(joiner.names[len(self.metric_names) :])
        x = np.concatenate(self.pending_x)
        keys = np.concatenate(self.pending_keys)
        slots = joiner.lookup(keys)
        hit = joiner.final(keys, slots, self.cfg.window_steps)
        if hit.any():
            self._update(x[hit], joiner.values[slots[hit]], keys[hit])
        # unmatched rows wait for their metric rows (which trail them in frames of their own) up to
        # a bound in rows and bytes; past it the oldest go, counted
        keep = ~hit
        cap = self.pending_cap()
        lost = max(0, int(keep.sum()) - cap)
        if lost:
            self.unpaired_dropped += lost
        x, keys = x[keep][-cap:], keys[keep][-cap:]
        self.pending_x, self.pending_keys = ([x], [keys]) if len(x) else ([], [])

    def pending_cap(self) -> int:
        """How many rows may wait for their metric rows: four windows, or what fits in 64 MiB of
        float64 rows for a wide tap, whichever is larger (at least one window)."""
        return max(self.cfg.window_steps, min(max(4 * self.cfg.window_steps, 8192), PENDING_BYTES // (8 * max(1, self.width))))

    def window_rows_cap(self) -> int:
        """The rolling window holds the rows of ``window_steps`` steps (several a step for a vector
        env), up to 64 MiB of float64 rows and at least one row a step."""
        return max(self.cfg.window_steps, PENDING_BYTES // (8 * max(1, self.width)))

    def _more_metrics(self, names: list[str]) -> None:
        """Metrics the run logs from now on (another frame's names): their columns start empty."""
        self.metric_names.extend(names)
        self.rolling.add_metrics(len(names))
        self.ew.add_metrics(len(names))
        k = self.top_metrics.shape[0]
        self.top_metrics = np.concatenate([self.top_metrics, np.full((k, self.width, len(names)), np.nan)], axis=2)

    def _update(self, x: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        self.rolling.update(x, y, keys >> _INDEX_BITS, keys)
        self.ew.update(x, y)
        self._update_top(x, y, keys)
        self.paired += len(x)

    def _update_top(self, x: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        k = self.cfg.top_k
        cols = np.nonzero((x > self.top_value[-1]).any(axis=0))[0]  # only channels with a new top row
        if cols.size == 0:
            return
        n = len(x)
        values = np.concatenate([self.top_value[:, cols], x[:, cols]])  # [k + n, c]
        order = np.argsort(-values, axis=0, kind="stable")[:k]
        keys_all = np.concatenate([self.top_key[:, cols], np.broadcast_to(keys[:, None], (n, cols.size))])
        self.top_value[:, cols] = np.take_along_axis(values, order, axis=0)
        self.top_key[:, cols] = np.take_along_axis(keys_all, order, axis=0)
        old = self.top_metrics[:, cols]  # [k, c, m]
        new = np.where(
            (order >= k)[:, :, None],
            y[np.clip(order - k, 0, n - 1)],
            np.take_along_axis(old, np.minimum(order, k - 1)[:, :, None], axis=0),
        )
        self.top_metrics[:, cols] = new

    def restore_top(self, state: dict[str, Any]) -> None:
        """Put back the top-k examples of :meth:`Store.analytics` (a restarted monitor's all-time top)."""
        if state["k"] != self.cfg.top_k or state["width"] != self.width or list(state["metrics"]) != self.metric_names:
            return
        self.top_value = np.asarray(state["top_value"], dtype=np.float64).copy()  # replayed rows are among them already
        self.top_key = np.asarray(state["top_key"], dtype=np.int64).copy()
        self.top_metrics = np.asarray(state["top_metrics"], dtype=np.float64).copy()

    # -- reading --------------------------------------------------------------------------------
    def window_stats(self) -> dict[str, Any]:
        """Mean, std, max and fraction active (> 0) of each channel over the paired window."""
        n = self.rolling.n
        if n == 0:
            z = np.zeros(self.width)
            return {"n": 0, "mean": z, "std": z, "max": z, "frac_active": z}
        x = self.rolling.rows()[0]
        return {"n": n, "mean": x.mean(0), "std": x.std(0), "max": x.max(0), "frac_active": (x > 0).mean(0)}

    def quantile_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sample row from the middle of each activation quantile bin, per channel.

        Returns (values [q, width], keys [q, width], metrics [q, width, n_metrics]).
        """
        n, q = self.rolling.n, self.cfg.quantiles
        if n == 0:
            return (
                np.zeros((0, self.width)),
                np.zeros((0, self.width), dtype=np.int64),
                np.zeros((0, self.width, len(self.metric_names))),
            )
        x, y, _, keys = self.rolling.rows()
        order = np.argsort(x, axis=0, kind="stable")
        at = np.minimum(((np.arange(q) + 0.5) * n / q).astype(int), n - 1)
        rows = order[at]  # [q, width]: row of the window for each bin's middle
        values = np.take_along_axis(x, rows, axis=0)
        return values, keys[rows], y[rows]

    def to_state(self) -> dict[str, Any]:
        """A msgpack-able summary for Redis (float32 arrays as bytes)."""
        ws = self.window_stats()
        qv, qk, qm = self.quantile_samples()
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32).tobytes()  # noqa: E731
        return {
            "width": self.width,
            "metrics": self.metric_names,
            "window_steps": self.cfg.window_steps,
            "ew_alpha": self.cfg.ew_alpha,
            "paired": self.paired,
            "unpaired_dropped": self.unpaired_dropped,
            "window_n": int(ws["n"]),
            "window_steps_held": self.rolling.steps_held,
            "window_truncated": self.rolling.truncated,
            "corr": f32(self.rolling.get()),
            "ew_corr": f32(self.ew.get()),
            "mean": f32(ws["mean"]),
            "std": f32(ws["std"]),
            "max": f32(ws["max"]),
            "frac_active": f32(ws["frac_active"]),
            "top_value": f32(self.top_value),
            "top_key": np.ascontiguousarray(self.top_key).tobytes(),
            "top_metrics": f32(self.top_metrics),
            "k": self.cfg.top_k,
            "q_value": f32(qv),
            "q_key": np.ascontiguousarray(qk, dtype=np.int64).tobytes(),
            "q_metrics": f32(qm),
            "q": len(qv),
        }
