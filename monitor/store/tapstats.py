"""Readable views of what the monitor keeps, for the CLI (and later the panel and explainer)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from monitor.stats.analytics import pos_of
from monitor.store.records import Store

__all__ = ["tap_stats"]


def _num(x: float) -> float | None:
    """JSON has no NaN: an undefined correlation is null."""
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _examples(
    values: np.ndarray, keys: np.ndarray, metrics: np.ndarray, names: list[str], c: int, limit: int
) -> list[dict[str, Any]]:
    out = []
    for j in range(min(limit, len(values))):
        if keys[j, c] < 0 or not np.isfinite(values[j, c]):
            continue
        step, index = pos_of(keys[j, c])
        out.append(
            {
                "step": step,
                "index": index,
                "value": _num(values[j, c]),
                "metrics": {n: _num(v) for n, v in zip(names, metrics[j, c], strict=True)},
            }
        )
    return out


def tap_stats(store: Store, run: str, tap: str, *, top: int = 5) -> dict[str, Any] | None:
    """Per channel of ``tap``: lifetime moments, rolling-window statistics, correlation with each
    metric (rolling and exponentially weighted), top activating steps and quantile samples."""
    info = store.taps(run).get(tap)
    if info is None:
        return None
    mom = store.tap_moments(run, tap)
    an = store.analytics(run, tap)
    names = an["metrics"] if an else []
    channels = []
    for c in range(info["width"]):
        ch: dict[str, Any] = {"channel": c}
        if mom:
            ch.update(
                count=int(mom["count"]),
                mean=_num(mom["mean"][c]),
                std=_num(mom["std"][c]),
                min=_num(mom["min"][c]),
                max=_num(mom["max"][c]),
            )
        if an:
            ch["window"] = {k: _num(an[k][c]) for k in ("mean", "std", "max", "frac_active")}
            ch["corr"] = {n: _num(an["corr"][c, j]) for j, n in enumerate(names)}
            ch["ew_corr"] = {n: _num(an["ew_corr"][c, j]) for j, n in enumerate(names)}
            ch["top"] = _examples(an["top_value"], an["top_key"], an["top_metrics"], names, c, top)
            ch["quantiles"] = _examples(an["q_value"], an["q_key"], an["q_metrics"], names, c, an["q"])
        else:
            ch["corr"] = {}
        channels.append(ch)
    out = {"width": info["width"], "rows": info["rows"], "metrics": names, "channels": channels}
    if an:
        out.update(
            window_steps=an["window_steps"],
            ew_alpha=an["ew_alpha"],
            paired=an["paired"],
            window_n=an["window_n"],
            window_steps_held=an.get("window_steps_held"),
            window_truncated=an.get("window_truncated", 0),
            unpaired_dropped=an.get("unpaired_dropped", 0),
        )
    return out
