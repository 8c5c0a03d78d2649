"""Streaming statistics against their batch references on random data."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.stats.moments import Moments, Recent


@pytest.mark.parametrize("width", [1, 7, 64])
def test_moments_match_numpy(width: int) -> None:
    rng = np.random.default_rng(width)
    m = Moments(width)
    chunks = [rng.standard_normal((int(rng.integers(1, 50)), width)).astype(np.float32) * 3 + 5 for _ in range(40)]
    for c in chunks:
        m.update(c)
    x = np.concatenate(chunks).astype(np.float64)
    g = m.get()
    assert g["count"] == len(x)
    np.testing.assert_allclose(g["mean"], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(g["std"], x.std(0), rtol=1e-6)
    np.testing.assert_array_equal(g["min"], x.min(0))
    np.testing.assert_array_equal(g["max"], x.max(0))


def test_moments_state_round_trip_continues_exactly() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((20, 4))
    m = Moments(4)
    m.update(a)
    restored = Moments.from_state(m.to_state())
    restored.update(b)
    m.update(b)
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_array_equal(restored.get()[k], m.get()[k])


def test_moments_of_constant_channel_has_zero_std() -> None:
    m = Moments(2)
    for _ in range(5):
        m.update(np.full((10, 2), 3.0))
    assert np.all(m.get()["std"] == 0.0) and np.all(m.get()["mean"] == 3.0)


@pytest.mark.parametrize("capacity", [1, 5, 64])
def test_recent_keeps_the_last_rows_in_order(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    r = Recent(capacity, 3, np.float64)
    seen_d, seen_p = [], []
    step = 0
    for _ in range(30):
        n = int(rng.integers(1, 2 * capacity + 3))
        d = rng.standard_normal((n, 3))
        p = np.stack([np.arange(step, step + n), np.zeros(n, dtype=np.int64)], axis=1)
        step += n
        r.update(d, p)
        seen_d.append(d)
        seen_p.append(p)
        data, pos = r.get()
        all_d, all_p = np.concatenate(seen_d), np.concatenate(seen_p)
        np.testing.assert_array_equal(data, all_d[-capacity:])
        np.testing.assert_array_equal(pos, all_p[-capacity:])
