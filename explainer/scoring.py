"""Scoring, in the spirit of Bills et al. 2023 and EleutherAI's delphi: on held-out steps, does
the explanation predict the latent?

Every backend's text is turned into conditions on metrics (or on the token, for a
language-model tap). Two numbers come from them:

- **detection**: a step *activates* when the latent is in the top ``top_frac`` of the held-out
  values; the conditions predict active or not; the score is the balanced accuracy.
- **simulation**: the conditions, made soft (each threshold a logistic of its margin in units of
  the metric's spread, multiplied across conditions), simulate the activation on every step; the
  score is the Pearson correlation between simulated and true activation.

Each is given beside the same predictor against shuffled activations, the chance baseline
(about 0.5 for detection, about 0 for simulation)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["detection_score", "predict", "simulate"]


def predict(
    conditions: list[dict[str, Any]], metric_names: list[str], metrics: np.ndarray, tokens: list[str] | None = None
) -> np.ndarray:
    """Rows the conditions call active: each condition is a metric threshold
    (``{"metric", "op", "value"}``) or, for language-model taps, a token set (``{"tokens": [...]}``)."""
    pred = np.ones(len(metrics), dtype=bool)
    for c in conditions:
        if "tokens" in c:
            pred &= np.isin(np.asarray(tokens if tokens is not None else [""] * len(metrics), dtype=object), list(c["tokens"]))
            continue
        col = metrics[:, metric_names.index(c["metric"])]
        pred &= col > c["value"] if c["op"] == ">" else col < c["value"]
    return pred


def simulate(
    conditions: list[dict[str, Any]],
    metric_names: list[str],
    metrics: np.ndarray,
    tokens: list[str] | None = None,
    *,
    sharpness: float = 4.0,
) -> np.ndarray:
    """A simulated activation in [0, 1] per row: the soft form of :func:`predict`. A threshold
    condition gives ``sigmoid(sharpness * margin / spread)``; a token condition gives 1 or 0."""
    sim = np.ones(len(metrics))
    for c in conditions:
        if "tokens" in c:
            sim *= np.isin(np.asarray(tokens if tokens is not None else [""] * len(metrics), dtype=object), list(c["tokens"]))
            continue
        col = metrics[:, metric_names.index(c["metric"])].astype(np.float64)
        spread = float(np.std(col)) or 1.0
        margin = (col - c["value"]) / spread * (1.0 if c["op"] == ">" else -1.0)
        sim *= 1.0 / (1.0 + np.exp(-np.clip(sharpness * margin, -50.0, 50.0)))
    return sim


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 4)


def _balanced(pred: np.ndarray, truth: np.ndarray) -> float:
    pos, neg = truth.sum(), (~truth).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    return float(((pred & truth).sum() / pos + (~pred & ~truth).sum() / neg) / 2)


def detection_score(
    conditions: list[dict[str, Any]],
    metric_names: list[str],
    values: np.ndarray,
    metrics: np.ndarray,
    *,
    tokens: list[str] | None = None,
    top_frac: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    n = len(values)
    if n < 20 or not conditions:
        return {
            "method": "detection",
            "balanced_accuracy": None,
            "shuffled": None,
            "n": n,
            "simulation": None,
            "simulation_shuffled": None,
        }
    truth = values > np.quantile(values, 1 - top_frac)
    pred = predict(conditions, metric_names, metrics, tokens)
    order = np.random.default_rng(seed).permutation(n)  # one shuffle for both baselines
    sim = simulate(conditions, metric_names, metrics, tokens)
    values = np.asarray(values, dtype=np.float64)
    return {
        "method": "detection",
        "balanced_accuracy": round(_balanced(pred, truth), 4),
        "shuffled": round(_balanced(pred, truth[order]), 4),
        "n": n,
        "top_frac": top_frac,
        "simulation": _corr(sim, values),
        "simulation_shuffled": _corr(sim, values[order]),
    }
