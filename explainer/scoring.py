"""Scoring, in the spirit of Bills et al. 2023 and EleutherAI's delphi (detection): on held-out
steps, does the explanation predict which steps activate the latent?

A step *activates* when the latent is in the top ``top_frac`` of the held-out values. The
explanation's conditions (every backend's text is turned into conditions on metrics, or on the
token for a language-model tap) predict
active or not; the score is the balanced accuracy, beside the same predictor against shuffled
labels, which sits near 0.5."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["detection_score", "predict"]


def predict(conditions: list[dict[str, Any]], metric_names: list[str], metrics: np.ndarray, tokens: list[str] | None = None) -> np.ndarray:
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


def _balanced(pred: np.ndarray, truth: np.ndarray) -> float:
    pos, neg = truth.sum(), (~truth).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    return float(((pred & truth).sum() / pos + (~pred & ~truth).sum() / neg) / 2)


def detection_score(conditions: list[dict[str, Any]], metric_names: list[str], values: np.ndarray, metrics: np.ndarray,
                    *, tokens: list[str] | None = None, top_frac: float = 0.2, seed: int = 0) -> dict[str, Any]:
    n = len(values)
    if n < 20 or not conditions:
        return {"method": "detection", "balanced_accuracy": None, "shuffled": None, "n": n}
    truth = values > np.quantile(values, 1 - top_frac)
    pred = predict(conditions, metric_names, metrics, tokens)
    shuffled = np.random.default_rng(seed).permutation(truth)
    return {"method": "detection", "balanced_accuracy": round(_balanced(pred, truth), 4),
            "shuffled": round(_balanced(pred, shuffled), 4), "n": n, "top_frac": top_frac}
