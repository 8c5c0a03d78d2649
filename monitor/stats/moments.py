"""Streaming statistics, vectorized over every channel at once, with ``update()`` / ``get()``."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Moments", "Recent"]


class Moments:
    """Count, mean, std, min and max of each of ``width`` channels over all rows seen.

    Batches are merged with Chan et al.'s parallel update, so a frame of rows costs a few numpy
    reductions whatever its size.

    >>> m = Moments(2); m.update(np.array([[1.0, 2.0], [3.0, 6.0]])); m.get()["mean"].tolist()
    [2.0, 4.0]
    """

    def __init__(self, width: int) -> None:
        self.count = 0
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)

    def update(self, x: np.ndarray) -> None:
        """Add rows ``x`` [rows, width]."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0, dtype=np.float64)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + np.square(delta) * (self.count * n_b / n)
        np.minimum(self.min, x.min(axis=0), out=self.min)
        np.maximum(self.max, x.max(axis=0), out=self.max)
        self.count = n

    def get(self) -> dict[str, Any]:
        std = np.sqrt(self.m2 / self.count) if self.count else np.zeros_like(self.m2)
        return {"count": self.count, "mean": self.mean.copy(), "std": std, "min": self.min.copy(), "max": self.max.copy()}

    def to_state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean.tobytes(),
            "m2": self.m2.tobytes(),
            "min": self.min.tobytes(),
            "max": self.max.tobytes(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Moments:
        mean = np.frombuffer(state["mean"], dtype=np.float64).copy()
        m = cls(len(mean))
        m.count = int(state["count"])
        m.mean = mean
        m.m2 = np.frombuffer(state["m2"], dtype=np.float64).copy()
        m.min = np.frombuffer(state["min"], dtype=np.float64).copy()
        m.max = np.frombuffer(state["max"], dtype=np.float64).copy()
        return m


class Recent:
    """The last ``capacity`` rows of a stream with their (step, index), oldest first on ``get()``."""

    def __init__(self, capacity: int, width: int, dtype: Any = np.float32) -> None:
        self.capacity = capacity
        self.data = np.zeros((capacity, width), dtype=dtype)
        self.pos = np.zeros((capacity, 2), dtype=np.int64)
        self.n = 0  # rows ever added

    def update(self, data: np.ndarray, pos: np.ndarray) -> None:
        rows = data.shape[0]
        if rows >= self.capacity:
            self.data[:] = data[-self.capacity :]
            self.pos[:] = pos[-self.capacity :]
            self.n += rows
            # rotate so that the next write position lines up with the ring
            shift = self.n % self.capacity
            self.data[:] = np.roll(self.data, shift, axis=0)
            self.pos[:] = np.roll(self.pos, shift, axis=0)
            return
        start = self.n % self.capacity
        end = start + rows
        if end <= self.capacity:
            self.data[start:end] = data
            self.pos[start:end] = pos
        else:
            k = self.capacity - start
            self.data[start:] = data[:k]
            self.pos[start:] = pos[:k]
            self.data[: rows - k] = data[k:]
            self.pos[: rows - k] = pos[k:]
        self.n += rows

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        """(data, pos) of the rows held, oldest first."""
        if self.n <= self.capacity:
            return self.data[: self.n].copy(), self.pos[: self.n].copy()
        start = self.n % self.capacity
        return np.roll(self.data, -start, axis=0), np.roll(self.pos, -start, axis=0)
