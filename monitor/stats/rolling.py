"""Correlations of every channel with every metric, streaming, vectorized: one object for all.

``RollingCorr`` is Pearson over the rows of the last ``window`` steps (exact: the sums over the
window are kept, rows leaving the window are subtracted, and the sums are recomputed from the ring
every ring's worth of updates so float error cannot accumulate). A metric not logged at a step is
NaN in its rows and leaves them out of that metric's pairs only. ``EWCorr`` is the exponentially weighted
variant. Both follow river's ``update()`` / ``get()`` idiom, but over a [channels, metrics]
matrix at once instead of one object per pair.

A channel or metric that is constant over the window has no correlation: ``get()`` returns NaN
there, never a division by zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RollingCorr", "EWCorr"]


def _pearson(n: np.ndarray, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> np.ndarray:
    """Pearson from sums; ``n`` [n_y] rows per metric, ``sx``/``sxx``/``sxy`` [n_x, n_y] (the
    channel sums over the rows where that metric is present), ``sy``/``syy`` [n_y]."""
    vx = n * sxx - sx * sx  # n² var(x), per channel and metric
    vy = n * syy - sy * sy
    # constant within float error of the sums: no correlation
    ok = (vx > 1e-9 * n * sxx) & (vy > 1e-9 * n * syy)[None, :] & (n >= 2)[None, :]
    den = np.sqrt(np.where(vx > 0, vx, 1.0) * np.where(vy > 0, vy, 1.0)[None, :])
    r = (n * sxy - sx * sy[None, :]) / den
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def _masked(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(y with NaN as 0, the 0/1 mask of present values, whether every value is present)."""
    present = ~np.isnan(y)
    full = bool(present.all())
    return (y if full else np.where(present, y, 0.0)), present.astype(np.float64), full


class RollingCorr:
    """Pearson correlation of ``n_x`` channels with ``n_y`` metrics over the rows of the last
    ``window`` steps (a step may have several rows: a vector env's). A metric that is NaN in a
    row (not logged at that step) leaves that row out of that metric's pairs only.

    Rows are held in a ring that grows while the window's steps hold more rows than it has, up to
    ``max_rows``; past that the oldest rows leave early, counted in ``truncated``.

    >>> rc = RollingCorr(2, 1, window=100)
    >>> rc.update(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]), np.array([[2.0], [4.0], [6.0]]))
    >>> rc.get()[:, 0].tolist()  # the constant channel has no correlation
    [1.0, nan]
    """

    def __init__(self, n_x: int, n_y: int, *, window: int, max_rows: int | None = None) -> None:
        if window < 2:
            raise ValueError("window must be at least 2 steps")
        self.window = window
        self.max_rows = max(window, max_rows if max_rows is not None else 16 * window)
        self.x = np.zeros((window, n_x))
        self.y = np.zeros((window, n_y))
        self.steps = np.zeros(window, dtype=np.int64)
        self.keys = np.full(window, -1, dtype=np.int64)
        self.start = 0  # ring slot of the oldest row
        self.n = 0  # rows in the window now
        self.count = 0  # rows ever added
        self.truncated = 0  # rows that left before their step left the window (the ring was full)
        self.newest = -(2**62)
        self._since_exact = 0
        self._zero_sums(n_x, n_y)

    def _zero_sums(self, n_x: int, n_y: int) -> None:
        # channel sums over every row, and over the rows where each metric is missing: a metric's
        # own channel sums are the difference (the common case, every metric present, costs [n_x])
        self.sx, self.sxx, self.n_all = np.zeros(n_x), np.zeros(n_x), 0.0
        self.sx_miss, self.sxx_miss, self.n_miss = np.zeros((n_x, n_y)), np.zeros((n_x, n_y)), np.zeros(n_y)
        self.sy, self.syy = np.zeros(n_y), np.zeros(n_y)
        self.sxy = np.zeros((n_x, n_y))

    def _add(self, x: np.ndarray, y: np.ndarray, sign: float) -> None:
        y0, present, full = _masked(y)
        self.sx += sign * x.sum(0)
        self.sxx += sign * np.einsum("ij,ij->j", x, x)
        self.n_all += sign * len(x)
        if not full:
            missing = 1.0 - present
            self.sx_miss += sign * (x.T @ missing)
            self.sxx_miss += sign * ((x * x).T @ missing)
            self.n_miss += sign * missing.sum(0)
        self.sy += sign * y0.sum(0)
        self.syy += sign * np.einsum("ij,ij->j", y0, y0)
        self.sxy += sign * (x.T @ y0)

    def add_metrics(self, k: int) -> None:
        """``k`` more metric columns (a metric first logged now): NaN in the rows held."""
        self.y = np.concatenate([self.y, np.full((len(self.y), k), np.nan)], axis=1)
        pad = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (k,))], axis=-1)  # noqa: E731
        x, _, _, _ = self.rows()  # the rows held have no value of the new metrics: missing there
        self.sx_miss = np.concatenate([self.sx_miss, np.repeat(x.sum(0)[:, None], k, axis=1)], axis=1)
        self.sxx_miss = np.concatenate([self.sxx_miss, np.repeat(np.einsum("ij,ij->j", x, x)[:, None], k, axis=1)], axis=1)
        self.n_miss = np.concatenate([self.n_miss, np.full(k, float(self.n))])
        self.sxy, self.sy, self.syy = pad(self.sxy), pad(self.sy), pad(self.syy)

    def _slots(self, i: np.ndarray) -> np.ndarray:
        return (self.start + i) % len(self.x)

    def _grow(self, need: int) -> None:
        cap = len(self.x)
        new = min(self.max_rows, max(need, 2 * cap))
        order = self._slots(np.arange(self.n))
        for name in ("x", "y", "steps", "keys"):
            old = getattr(self, name)
            arr = np.zeros((new,) + old.shape[1:], dtype=old.dtype)
            arr[: self.n] = old[order]
            setattr(self, name, arr)
        self.start = 0

    def _drop_oldest(self, k: int) -> None:
        if k <= 0:
            return
        idx = self._slots(np.arange(k))
        self._add(self.x[idx], self.y[idx], -1.0)
        self.start = (self.start + k) % len(self.x)
        self.n -= k

    def update(self, x: np.ndarray, y: np.ndarray, steps: np.ndarray | None = None, keys: np.ndarray | None = None) -> None:
        """Add rows, oldest first: ``x`` [rows, n_x] channels, ``y`` [rows, n_y] metrics (NaN:
        not logged), ``steps`` [rows] (default: each row a step of its own)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.x.shape[1])
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.y.shape[1])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} channel rows but {y.shape[0]} metric rows")
        if x.shape[0] == 0:
            return
        if steps is None:
            steps = self.count + np.arange(len(x), dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        keys = np.full(len(x), -1, dtype=np.int64) if keys is None else np.asarray(keys, dtype=np.int64)
        self.count += len(x)
        self.newest = max(self.newest, int(steps.max()))
        inside = steps > self.newest - self.window
        if not inside.all():  # rows of steps already out of the window count for nothing
            x, y, steps, keys = x[inside], y[inside], steps[inside], keys[inside]
        # the rows whose steps leave the window now
        old, cap = self.newest - self.window, len(self.x)
        k = 0
        while k < self.n and k < 64 and self.steps[(self.start + k) % cap] <= old:  # usually a row or two leave
            k += 1
        if k == 64:
            keep = self.steps[self._slots(np.arange(self.n))] > old
            k = int(np.argmax(keep)) if keep.any() else self.n
        self._drop_oldest(k)
        if self.n + len(x) > len(self.x) and len(self.x) < self.max_rows:
            self._grow(self.n + len(x))
        cap = len(self.x)
        if len(x) > cap:  # more rows than the ring can ever hold: the newest
            self.truncated += len(x) - cap
            x, y, steps, keys = x[-cap:], y[-cap:], steps[-cap:], keys[-cap:]
        over = self.n + len(x) - cap
        if over > 0:
            self.truncated += over
            self._drop_oldest(over)
        idx = self._slots(self.n + np.arange(len(x)))
        self.x[idx], self.y[idx], self.steps[idx], self.keys[idx] = x, y, steps, keys
        self.n += len(x)
        self._add(x, y, 1.0)
        self._since_exact += len(x)
        if self._since_exact >= cap:  # float error of the add/subtract sums cannot accumulate
            self._recompute()

    def _recompute(self) -> None:
        self._zero_sums(self.x.shape[1], self.y.shape[1])
        x, y, _, _ = self.rows()
        self._add(x, y, 1.0)
        self._since_exact = 0

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, steps, keys) of the rows in the window, oldest first."""
        idx = self._slots(np.arange(self.n))
        return self.x[idx], self.y[idx], self.steps[idx], self.keys[idx]

    @property
    def steps_held(self) -> int:
        """Distinct steps the window's rows cover."""
        return int(np.unique(self.rows()[2]).size) if self.n else 0

    def get(self) -> np.ndarray:
        """[n_x, n_y] correlations over the window; NaN where either side is constant or a
        metric has fewer than 2 rows."""
        n = self.n_all - self.n_miss
        if not self.n_miss.any():
            return _pearson(n, self.sx[:, None], self.sy, self.sxx[:, None], self.syy, self.sxy)
        return _pearson(n, self.sx[:, None] - self.sx_miss, self.sy, self.sxx[:, None] - self.sxx_miss, self.syy, self.sxy)


class EWCorr:
    """Exponentially weighted correlation: each new row has weight ``alpha``, older rows decay.

    Equal to the weighted Welford recursion (``mean += alpha * d``,
    ``cov = (1 - alpha) * (cov + alpha * d_x d_y)``), kept as decayed weighted sums so that a
    batch of n rows costs a few matrix products instead of n Python steps. Sums are of values
    minus the first row, so a large offset does not cancel away the variance. Each metric decays
    over the rows where it is present (not NaN) only; the channel sums are kept per metric.
    """

    def __init__(self, n_x: int, n_y: int, *, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        self.alpha = alpha
        self.count = 0  # rows ever added
        self.counts = np.zeros(n_y, dtype=np.int64)  # rows per metric
        self.shift_x, self.shift_y = np.zeros(n_x), np.zeros(n_y)
        self.sx, self.sxx = np.zeros((n_x, n_y)), np.zeros((n_x, n_y))  # weighted means of the shifted values
        self.sy, self.syy = np.zeros(n_y), np.zeros(n_y)
        self.sxy = np.zeros((n_x, n_y))

    def add_metrics(self, k: int) -> None:
        pad = lambda a: np.concatenate([a, np.zeros(a.shape[:-1] + (k,), dtype=a.dtype)], axis=-1)  # noqa: E731
        self.sx, self.sxx, self.sxy, self.sy, self.syy = map(pad, (self.sx, self.sxx, self.sxy, self.sy, self.syy))
        self.shift_y, self.counts = pad(self.shift_y), pad(self.counts)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows, oldest first (NaN in ``y``: that metric was not logged in that row)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.sx.shape[0])
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.sy.shape[0])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} channel rows but {y.shape[0]} metric rows")
        if x.shape[0] == 0:
            return
        if self.count == 0:
            self.shift_x = x[0].copy()
        self.count += len(x)
        present = ~np.isnan(y)
        for j in np.nonzero((self.counts == 0) & present.any(0))[0]:
            # a metric's first row starts its estimate with weight 1
            r0 = int(np.argmax(present[:, j]))
            self.shift_y[j] = y[r0, j]
            self.sx[:, j] = x[r0] - self.shift_x
            self.sxx[:, j] = self.sx[:, j] ** 2
            self.counts[j] = 1
            present[r0, j] = False
        a = self.alpha
        after = np.cumsum(present[::-1], axis=0)[::-1] - present  # present rows after each row, per metric
        w = np.where(present, a * (1 - a) ** after, 0.0)  # [rows, n_y]: the newest row weighs alpha
        decay = (1 - a) ** present.sum(0)
        xc = x - self.shift_x
        yc = np.where(present, y - self.shift_y, 0.0)
        wy = yc * w
        self.sx = decay * self.sx + xc.T @ w
        self.sxx = decay * self.sxx + (xc * xc).T @ w
        self.sy = decay * self.sy + wy.sum(0)
        self.syy = decay * self.syy + (yc * wy).sum(0)
        self.sxy = decay * self.sxy + xc.T @ wy
        self.counts += present.sum(0)

    def get(self) -> np.ndarray:
        """[n_x, n_y] correlations; NaN where either side has had no variation."""
        vx = self.sxx - self.sx * self.sx
        vy = self.syy - self.sy * self.sy
        ok = (vx > 1e-12 * np.maximum(self.sxx, 1e-300)) & (vy > 1e-12 * np.maximum(self.syy, 1e-300))[None, :]
        den = np.sqrt(np.where(vx > 0, vx, 1.0) * np.where(vy > 0, vy, 1.0)[None, :])
        return np.where(ok, np.clip((self.sxy - self.sx * self.sy[None, :]) / den, -1.0, 1.0), np.nan)
