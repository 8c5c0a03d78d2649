"""Rolling and exponentially weighted correlations against their batch references."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.stats.rolling import EWCorr, RollingCorr


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.corrcoef(np.concatenate([x, y], axis=1).T)
    return c[: x.shape[1], x.shape[1] :]


@pytest.mark.parametrize("window", [2, 7, 50])
def test_rolling_pearson_matches_corrcoef_over_the_same_window(window: int) -> None:
    rng = np.random.default_rng(window)
    rc = RollingCorr(5, 3, window=window)
    xs, ys = [], []
    for _ in range(40):  # batches of random size, so the window wraps at every offset
        n = int(rng.integers(1, 2 * window + 2))
        y = rng.standard_normal((n, 3))
        x = np.concatenate(
            [y @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((n, 4)), rng.standard_normal((n, 1))], axis=1
        )
        x = x * 100 + 1e4  # an offset that would ruin naive sums
        rc.update(x, y)
        xs.append(x)
        ys.append(y)
        all_x, all_y = np.concatenate(xs)[-window:], np.concatenate(ys)[-window:]
        assert rc.n == len(all_x)
        if rc.n >= 3:
            np.testing.assert_allclose(rc.get(), _corr(all_x, all_y), atol=1e-7)


def test_constant_inputs_give_undefined_not_nan_warnings() -> None:
    rc = RollingCorr(2, 2, window=10)
    rng = np.random.default_rng(0)
    with np.errstate(all="raise"):
        for _ in range(25):
            x = np.array([[3.0, rng.standard_normal()]])
            y = np.array([[rng.standard_normal(), 7.0]])
            rc.update(x, y)
        r = rc.get()
    assert np.isnan(r[0]).all()  # constant channel
    assert np.isnan(r[:, 1]).all()  # constant metric
    assert np.isfinite(r[1, 0])


def test_too_few_rows_and_mismatched_rows() -> None:
    rc = RollingCorr(1, 1, window=5)
    assert np.isnan(rc.get()).all()
    with pytest.raises(ValueError):
        rc.update(np.zeros((3, 1)), np.zeros((2, 1)))


def test_ew_correlation_matches_the_weighted_formula() -> None:
    rng = np.random.default_rng(1)
    alpha = 0.05
    n = 400
    y = rng.standard_normal((n, 2))
    x = np.concatenate([y[:, :1] * 2 + rng.standard_normal((n, 1)), rng.standard_normal((n, 2))], axis=1)
    ew = EWCorr(3, 2, alpha=alpha)
    for i in range(0, n, 17):
        ew.update(x[i : i + 17], y[i : i + 17])
    # direct formula: weights (1-a)^(n-1-t) for t >= 1 times a, the first row carrying the rest
    w = alpha * (1 - alpha) ** np.arange(n - 1, -1, -1)
    w[0] = (1 - alpha) ** (n - 1)
    mx, my = w @ x, w @ y
    cov = ((x - mx) * w[:, None]).T @ (y - my)
    vx, vy = w @ (x - mx) ** 2, w @ (y - my) ** 2
    np.testing.assert_allclose(ew.get(), cov / np.sqrt(np.outer(vx, vy)), atol=1e-9)
    assert ew.get()[0, 0] > 0.6


def test_ew_constant_is_undefined() -> None:
    ew = EWCorr(1, 1, alpha=0.1)
    ew.update(np.ones((20, 1)), np.arange(20.0)[:, None])
    assert np.isnan(ew.get()).all()


def test_ew_with_a_large_offset_and_batches_of_any_size() -> None:
    rng = np.random.default_rng(2)
    y = rng.standard_normal((300, 1))
    x = 1e6 + 10 * y + rng.standard_normal((300, 1))
    one, many = EWCorr(1, 1, alpha=0.03), EWCorr(1, 1, alpha=0.03)
    for i in range(300):
        one.update(x[i : i + 1], y[i : i + 1])
    many.update(x[:1], y[:1])
    many.update(x[1:250], y[1:250])
    many.update(x[250:], y[250:])
    np.testing.assert_allclose(many.get(), one.get(), rtol=1e-9)
    assert one.get()[0, 0] > 0.98
