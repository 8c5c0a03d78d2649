"""Correlations of every channel with every metric, streaming, vectorized: one object for all.

``RollingCorr`` is Pearson over the last ``window`` steps (exact: the sums over the window are
kept, rows leaving the window are subtracted, and the sums are recomputed from the ring every
``window`` updates so float error cannot accumulate). ``EWCorr`` is the exponentially weighted
variant. Both follow river's ``update()`` / ``get()`` idiom, but over a [channels, metrics]
matrix at once instead of one object per pair.

A channel or metric that is constant over the window has no correlation: ``get()`` returns NaN
there, never a division by zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RollingCorr", "EWCorr"]


def _pearson(n: float, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> np.ndarray:
    vx = n * sxx - sx * sx  # n² var(x), per channel
    vy = n * syy - sy * sy
    # constant within float error of the sums: no correlation
    ok = (vx > 1e-9 * n * sxx)[:, None] & (vy > 1e-9 * n * syy)[None, :]
    den = np.sqrt(np.outer(np.where(vx > 0, vx, 1.0), np.where(vy > 0, vy, 1.0)))
    r = (n * sxy - np.outer(sx, sy)) / den
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


class RollingCorr:
    """Pearson correlation of ``n_x`` channels with ``n_y`` metrics over the last ``window`` rows.

    >>> rc = RollingCorr(2, 1, window=100)
    >>> rc.update(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]), np.array([[2.0], [4.0], [6.0]]))
    >>> rc.get()[:, 0].tolist()  # the constant channel has no correlation
    [1.0, nan]
    """

    def __init__(self, n_x: int, n_y: int, *, window: int) -> None:
        if window < 2:
            raise ValueError("window must be at least 2 rows")
        self.window = window
        self.x = np.zeros((window, n_x))
        self.y = np.zeros((window, n_y))
        self.count = 0  # rows ever added
        self._since_exact = 0
        self._zero_sums(n_x, n_y)

    def _zero_sums(self, n_x: int, n_y: int) -> None:
        self.sx, self.sxx = np.zeros(n_x), np.zeros(n_x)
        self.sy, self.syy = np.zeros(n_y), np.zeros(n_y)
        self.sxy = np.zeros((n_x, n_y))

    def _add(self, x: np.ndarray, y: np.ndarray, sign: float) -> None:
        self.sx += sign * x.sum(0)
        self.sxx += sign * np.einsum("ij,ij->j", x, x)
        self.sy += sign * y.sum(0)
        self.syy += sign * np.einsum("ij,ij->j", y, y)
        self.sxy += sign * (x.T @ y)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows: ``x`` [rows, n_x] channels and ``y`` [rows, n_y] metrics of the same steps."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.x.shape[1])
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.y.shape[1])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} channel rows but {y.shape[0]} metric rows")
        if x.shape[0] >= self.window:  # only the last window rows can matter
            self.count += x.shape[0] - self.window
            x, y = x[-self.window :], y[-self.window :]
        self._update_chunk(x, y)

    def _update_chunk(self, x: np.ndarray, y: np.ndarray) -> None:
        n = x.shape[0]
        idx = (self.count + np.arange(n)) % self.window
        full = self.count >= self.window
        leaving = idx if full else idx[self.count + np.arange(n) >= self.window]
        if leaving.size:
            self._add(self.x[leaving], self.y[leaving], -1.0)
        self.x[idx] = x
        self.y[idx] = y
        self._add(x, y, 1.0)
        self.count += n
        self._since_exact += n
        if self._since_exact >= self.window:
            self._recompute()

    def _recompute(self) -> None:
        held = min(self.count, self.window)
        rows = np.arange(held) if self.count <= self.window else np.arange(self.window)
        self._zero_sums(self.x.shape[1], self.y.shape[1])
        self._add(self.x[rows], self.y[rows], 1.0)
        self._since_exact = 0

    @property
    def n(self) -> int:
        """Rows in the window now."""
        return min(self.count, self.window)

    def get(self) -> np.ndarray:
        """[n_x, n_y] correlations over the window; NaN where either side is constant."""
        if self.n < 2:
            return np.full(self.sxy.shape, np.nan)
        return _pearson(float(self.n), self.sx, self.sy, self.sxx, self.syy, self.sxy)


class EWCorr:
    """Exponentially weighted correlation: each new row has weight ``alpha``, older rows decay.

    Equal to the weighted Welford recursion (``mean += alpha * d``,
    ``cov = (1 - alpha) * (cov + alpha * d_x d_y)``), kept as decayed weighted sums so that a
    batch of n rows costs a few matrix products instead of n Python steps. Sums are of values
    minus the first row, so a large offset does not cancel away the variance.
    """

    def __init__(self, n_x: int, n_y: int, *, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        self.alpha = alpha
        self.count = 0
        self.shift_x, self.shift_y = np.zeros(n_x), np.zeros(n_y)
        self.sx, self.sy = np.zeros(n_x), np.zeros(n_y)  # weighted means of the shifted values
        self.sxx, self.syy = np.zeros(n_x), np.zeros(n_y)
        self.sxy = np.zeros((n_x, n_y))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add rows, oldest first."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.sx.shape[0])
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.sy.shape[0])
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} channel rows but {y.shape[0]} metric rows")
        if x.shape[0] == 0:
            return
        if self.count == 0:  # the first row starts the estimate with weight 1
            self.shift_x, self.shift_y = x[0].copy(), y[0].copy()
            self.count = 1
            x, y = x[1:], y[1:]
        n = x.shape[0]
        if n == 0:
            return
        a = self.alpha
        w = a * (1 - a) ** np.arange(n - 1, -1, -1)  # the newest row weighs alpha
        decay = (1 - a) ** n
        xc, yc = x - self.shift_x, y - self.shift_y
        wy = yc * w[:, None]
        self.sx = decay * self.sx + w @ xc
        self.sy = decay * self.sy + w @ yc
        self.sxx = decay * self.sxx + w @ (xc * xc)
        self.syy = decay * self.syy + w @ (yc * yc)
        self.sxy = decay * self.sxy + xc.T @ wy
        self.count += n

    def get(self) -> np.ndarray:
        """[n_x, n_y] correlations; NaN where either side has had no variation."""
        vx = self.sxx - self.sx * self.sx
        vy = self.syy - self.sy * self.sy
        ok = (vx > 1e-12 * np.maximum(self.sxx, 1e-300))[:, None] & (vy > 1e-12 * np.maximum(self.syy, 1e-300))[None, :]
        den = np.sqrt(np.outer(np.where(vx > 0, vx, 1.0), np.where(vy > 0, vy, 1.0)))
        return np.where(ok, np.clip((self.sxy - np.outer(self.sx, self.sy)) / den, -1.0, 1.0), np.nan)
