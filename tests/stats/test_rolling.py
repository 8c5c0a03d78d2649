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


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """numpy's Pearson of every channel with every metric over the rows where the metric is present."""
    out = np.full((x.shape[1], y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        ok = ~np.isnan(y[:, j])
        for i in range(x.shape[1]):
            if ok.sum() >= 2 and x[ok, i].std() > 0 and y[ok, j].std() > 0:
                out[i, j] = np.corrcoef(x[ok, i], y[ok, j])[0, 1]
    return out


def _vector_rows(steps: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3-env vector env: 3 rows a step; one metric logged every step, one every 4th step only."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(steps, 3, 4))
    y = np.stack([x[..., 0] + 0.3 * rng.normal(size=(steps, 3)), -x[..., 1] + 0.5 * rng.normal(size=(steps, 3))], axis=2)
    y[np.arange(steps) % 4 != 0, :, 1] = np.nan
    return x.reshape(-1, 4), y.reshape(-1, 2), np.repeat(np.arange(steps), 3)


def test_the_window_is_in_steps_and_a_missing_metric_leaves_only_its_own_pairs() -> None:
    x, y, step = _vector_rows()
    rc, window = RollingCorr(4, 2, window=50), 50
    for start in range(0, 400, 7):  # frames of a few steps at a time
        at = (step >= start) & (step < start + 7)
        rc.update(x[at], y[at], step[at])
    inside = step > 399 - window
    assert rc.n == inside.sum() == 150 and rc.steps_held == window  # 50 steps, not 50 rows
    np.testing.assert_allclose(rc.get(), _pairwise(x[inside], y[inside]), atol=1e-9)
    assert rc.get()[0, 0] > 0.9 and rc.get()[1, 1] < -0.7 and rc.truncated == 0


def test_ew_with_a_missing_metric_equals_the_recursion_over_its_own_rows() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3))
    y = np.stack([x[:, 0] + rng.normal(size=300), x[:, 2] * 2 + rng.normal(size=300)], axis=1)
    y[rng.random(300) < 0.6, 1] = np.nan
    ew = EWCorr(3, 2, alpha=0.05)
    for chunk in np.array_split(np.arange(300), 17):
        ew.update(x[chunk], y[chunk])
    for j in range(2):  # each metric: the plain EW correlation over the rows it is present in
        ok = ~np.isnan(y[:, j])
        ref = EWCorr(3, 1, alpha=0.05)
        ref.update(x[ok], y[ok, j : j + 1])
        np.testing.assert_allclose(ew.get()[:, j], ref.get()[:, 0], atol=1e-10)


def test_a_metric_added_later_starts_empty() -> None:
    rc = RollingCorr(2, 1, window=10)
    rc.update(np.arange(10.0).reshape(5, 2), np.arange(5.0)[:, None])
    rc.add_metrics(1)
    assert np.isnan(rc.get()[:, 1]).all() and rc.get()[0, 0] == pytest.approx(1.0)
    rc.update(np.array([[1.0, 0.0], [2.0, 1.0], [4.0, 0.0]]), np.array([[1.0, 3.0], [2.0, 5.0], [3.0, 9.0]]))
    assert rc.get()[0, 1] == pytest.approx(1.0)
