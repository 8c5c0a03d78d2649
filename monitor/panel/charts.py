"""The panel's charts as Vega-Lite specs built from the tables of :mod:`monitor.panel.data` and
:mod:`monitor.panel.runs` (no Streamlit here). Each spec names its tables under ``datasets``
(DataFrames, which ``st.vega_lite_chart`` sends as Arrow) and carries tooltips with the values;
discrete axes get a fixed step per row, so a 4-wide tap is as readable as a 64-wide one.

Plain dicts rather than Altair objects: the panel redraws them every refresh, and building and
validating Altair's schema objects cost several times what the data does (measured: a faceted
chart took 40 ms through Altair, under 1 ms as a dict).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from monitor.panel.runs import STATE_COLORS, STATES

__all__ = [
    "alert_timeline",
    "before_activations",
    "corr_bars",
    "corr_heatmap",
    "heatmap",
    "metric_multiples",
    "returns",
    "row_step",
    "token_bars",
    "token_grid",
    "transcoder_figures",
]

Spec = dict[str, Any]
MODES = ("survived", "pole_left", "pole_right", "cart_out", "failed", "terminated")
MODE_COLORS = ("#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#d62728")


def row_step(n: int) -> int:
    """Pixels per row of a discrete axis with ``n`` rows: large for narrow taps, smaller for wide."""
    return 22 if n <= 12 else 14 if n <= 32 else 8


def _tip(field: str, kind: str = "quantitative", fmt: str | None = None, title: str | None = None) -> dict[str, Any]:
    return {"field": field, "type": kind, **({"format": fmt} if fmt else {}), **({"title": title} if title else {})}


def heatmap(hm: pd.DataFrame, tap: str, unit: str) -> Spec:
    """Recent activations: step across, one row per channel or latent."""
    return {
        "datasets": {"heat": hm},
        "data": {"name": "heat"},
        "title": f"{tap}: recent activations",
        "mark": {"type": "rect"},
        "height": {"step": row_step(int(hm[unit].nunique()))},
        "encoding": {
            "x": {"field": "step", "type": "ordinal", "axis": {"labelOverlap": True, "title": "step"}},
            "y": {"field": unit, "type": "ordinal", "title": unit},
            "color": {"field": "value", "type": "quantitative", "scale": {"scheme": "viridis"}, "title": "value"},
            "tooltip": [_tip("step"), _tip(unit, "ordinal"), _tip("value", fmt=".3f")],
        },
    }


def _hover_rows(name: str, df: pd.DataFrame, x: dict[str, Any], layers: list[Spec], *, width: int, height: int) -> Spec:
    return {
        "datasets": {name: df},
        "data": {"name": name},
        "facet": {
            "row": {"field": "metric", "type": "nominal", "title": None, "header": {"labelAngle": 0, "labelAlign": "left"}}
        },
        "spec": {"width": width, "height": height, "encoding": {"x": x}, "layer": layers},
        "resolve": {"scale": {"y": "independent"}},
    }


def metric_multiples(tr: pd.DataFrame, *, height: int = 55, width: int = 820) -> Spec:
    """One small chart per metric, each on its own y axis, sharing the step axis; hovering shows
    every metric's value at that step."""
    y = {"field": "value", "type": "quantitative", "title": None, "scale": {"zero": False}}
    hover = {
        "name": "hover",
        "select": {"type": "point", "on": "pointerover", "nearest": True, "fields": ["step"], "clear": "pointerout"},
    }
    layers = [
        {"mark": {"type": "line", "strokeWidth": 1.2}, "encoding": {"y": y}},
        {
            "params": [hover],
            "mark": {"type": "circle", "size": 30},
            "encoding": {
                "y": y,
                "opacity": {"condition": {"param": "hover", "empty": False, "value": 1}, "value": 0},
                "tooltip": [_tip("metric", "nominal"), _tip("step"), _tip("value", fmt=".4g")],
            },
        },
        {"transform": [{"filter": {"param": "hover", "empty": False}}], "mark": {"type": "rule", "color": "#888"}},
    ]
    x = {"field": "step", "type": "quantitative", "title": "step", "scale": {"zero": False}}
    return _hover_rows("traces", tr, x, layers, width=width, height=height)


def corr_bars(corr: pd.DataFrame) -> Spec:
    """Correlation with each metric: a bar with its r written beside its end; a null r (the metric
    or the latent constant in the window) is written as such, at 0."""
    df = corr.assign(
        shown=corr["r"].fillna(0.0),
        label=[f"{r:+.2f}" if pd.notna(r) else "null (constant in the window)" for r in corr["r"]],
        absr=corr["r"].abs().fillna(-1.0),
    )
    y = {"field": "metric", "type": "nominal", "title": None, "sort": list(df.sort_values("absr", ascending=False)["metric"])}
    x = {"field": "shown", "type": "quantitative", "scale": {"domain": [-1, 1]}, "title": "r (rolling window)"}
    tooltip = [_tip("metric", "nominal"), _tip("r", fmt="+.3f")]

    def labels(side: str, align: str, dx: int) -> Spec:  # beside each bar's end, outward
        return {
            "transform": [{"filter": side}],
            "mark": {"type": "text", "align": align, "dx": dx, "fontSize": 11},
            "encoding": {"x": x, "y": y, "text": {"field": "label", "type": "nominal"}, "tooltip": tooltip},
        }

    bars = {
        "mark": {"type": "bar"},
        "encoding": {
            "x": x,
            "y": y,
            "color": {"condition": {"test": "datum.shown >= 0", "value": "#2a9d8f"}, "value": "#e76f51"},
            "tooltip": tooltip,
        },
    }
    return {
        "datasets": {"corr": df},
        "data": {"name": "corr"},
        "title": "correlation with each metric",
        "height": {"step": 20},
        "layer": [bars, labels("datum.shown >= 0", "left", 4), labels("datum.shown < 0", "right", -4)],
    }


def corr_heatmap(long: pd.DataFrame, order: list[int], unit: str, metrics: list[str]) -> Spec:
    """Channels (or latents) × metrics, r in colour and written in each cell; a null r grey."""
    enc = {
        "x": {"field": "metric", "type": "nominal", "sort": metrics, "title": None, "axis": {"labelAngle": -30}},
        "y": {"field": unit, "type": "ordinal", "sort": order, "title": unit},
    }
    layers: list[Spec] = [
        {
            "mark": {"type": "rect"},
            "encoding": {
                "color": {
                    "field": "r",
                    "type": "quantitative",
                    "scale": {"scheme": "redblue", "domain": [-1, 1], "reverse": True},
                },
                "tooltip": [_tip(unit, "ordinal"), _tip("metric", "nominal"), _tip("r", fmt="+.3f")],
            },
        },
        {"transform": [{"filter": "!isValid(datum.r)"}], "mark": {"type": "rect", "color": "#dddddd"}},
    ]
    if len(order) <= 32:
        layers.append(
            {
                "mark": {"type": "text", "fontSize": 10},
                "encoding": {
                    "text": {"field": "r", "type": "quantitative", "format": "+.2f"},
                    "color": {"condition": {"test": "abs(datum.r) > 0.6", "value": "white"}, "value": "black"},
                },
            }
        )
    return {
        "datasets": {"corr": long},
        "data": {"name": "corr"},
        "height": {"step": row_step(len(order))},
        "encoding": enc,
        "layer": layers,
    }


def returns(eps: pd.DataFrame, spans: pd.DataFrame | None = None) -> Spec:
    """Episode returns by the step each ended, coloured by how it ended, with a rolling mean;
    the spans a steer was on shaded, labelled with the steer."""
    domain = [m for m in MODES if m in set(eps["end"])] + sorted(set(eps["end"]) - set(MODES))
    colors = [MODE_COLORS[MODES.index(m)] if m in MODES else "#555555" for m in domain]
    x = {"field": "step", "type": "quantitative", "title": "step the episode ended", "scale": {"zero": False}}
    layers: list[Spec] = []
    datasets: dict[str, pd.DataFrame] = {"episodes": eps}
    if spans is not None and len(spans):
        datasets["steers"] = spans
        layers.append(
            {
                "data": {"name": "steers"},
                "mark": {"type": "rect", "opacity": 0.15, "color": "#9467bd"},
                "encoding": {
                    "x": {"field": "start", "type": "quantitative"},
                    "x2": {"field": "end"},
                    "tooltip": [_tip("steer", "nominal"), _tip("start"), _tip("end"), _tip("mean on"), _tip("mean before")],
                },
            }
        )
    layers += [
        {
            "data": {"name": "episodes"},
            "mark": {"type": "circle", "size": 36, "opacity": 0.85},
            "encoding": {
                "x": x,
                "y": {"field": "return", "type": "quantitative", "title": "return"},
                "color": {"field": "end", "type": "nominal", "scale": {"domain": domain, "range": colors}, "title": "ended"},
                "tooltip": [_tip("step"), _tip("return"), _tip("length"), _tip("end", "nominal")],
            },
        },
        {
            "data": {"name": "episodes"},
            "transform": [
                {"window": [{"op": "mean", "field": "return", "as": "mean"}], "frame": [-9, 0], "sort": [{"field": "step"}]}
            ],
            "mark": {"type": "line", "color": "#444", "strokeWidth": 1.5},
            "encoding": {
                "x": x,
                "y": {"field": "mean", "type": "quantitative"},
                "tooltip": [_tip("step"), _tip("mean", fmt=".1f", title="mean of the last 10")],
            },
        },
    ]
    return {"datasets": datasets, "height": 220, "layer": layers}


def alert_timeline(tl: pd.DataFrame) -> Spec:
    """One row per alert (rule, tap, unit), each event a tick at its step, coloured by state."""
    return {
        "datasets": {"alerts": tl},
        "data": {"name": "alerts"},
        "mark": {"type": "tick", "thickness": 3, "size": 14},
        "height": {"step": max(16, row_step(int(tl["what"].nunique())))},
        "encoding": {
            "x": {"field": "step", "type": "quantitative", "title": "step", "scale": {"zero": False}},
            "y": {"field": "what", "type": "nominal", "title": None, "axis": {"labelLimit": 380}},
            "color": {
                "field": "state",
                "type": "nominal",
                "scale": {"domain": list(STATES), "range": list(STATE_COLORS)},
                "title": "state",
            },
            "tooltip": [_tip(f, "nominal") for f in ("time", "step", "rule", "tap", "what", "state", "run")],
        },
    }


def before_activations(df: pd.DataFrame, *, width: int = 380) -> Spec:
    """Each metric over the steps before the latent's strongest recent activations: a thin line
    per activation, their mean bold; step 0 is the activation."""
    y = {"field": "value", "type": "quantitative", "title": None, "scale": {"zero": False}}
    layers = [
        {
            "mark": {"type": "line", "strokeWidth": 0.8, "opacity": 0.35},
            "encoding": {
                "y": y,
                "detail": {"field": "peak", "type": "nominal"},
                "tooltip": [_tip("metric", "nominal"), _tip("peak"), _tip("offset"), _tip("value", fmt=".4g")],
            },
        },
        {
            "mark": {"type": "line", "strokeWidth": 2.2, "color": "#d62728"},
            "encoding": {
                "y": {"aggregate": "mean", "field": "value", "type": "quantitative"},
                "tooltip": [
                    _tip("metric", "nominal"),
                    _tip("offset"),
                    {"aggregate": "mean", "field": "value", "type": "quantitative", "format": ".4g", "title": "mean"},
                ],
            },
        },
    ]
    x = {"field": "offset", "type": "quantitative", "title": "steps before the activation (0: the activation)"}
    return _hover_rows("before", df, x, layers, width=width, height=55)


def transcoder_figures(long: pd.DataFrame) -> Spec:
    """FVU, L0 and return recovered against latent count, one small chart per figure."""
    return {
        "datasets": {"figures": long},
        "data": {"name": "figures"},
        "facet": {"column": {"field": "figure", "type": "nominal"}},
        "spec": {
            "width": 260,
            "height": 200,
            "mark": {"type": "line", "point": True},
            "encoding": {
                "x": {"field": "latents", "type": "quantitative", "scale": {"type": "log", "base": 2}},
                "y": {"field": "value", "type": "quantitative"},
                "color": {"field": "pair", "type": "nominal"},
                "tooltip": [_tip("run", "nominal"), _tip("pair", "nominal"), _tip("latents"), _tip("value", fmt=".4g")],
            },
        },
        "resolve": {"scale": {"y": "independent"}},
    }


def token_bars(one: pd.DataFrame) -> Spec:
    """A latent's value at each token of one sequence (labels "position token")."""
    return {
        "datasets": {"tokens": one},
        "data": {"name": "tokens"},
        "mark": {"type": "bar"},
        "encoding": {
            "x": {"field": "label", "type": "nominal", "sort": list(one["label"]), "title": "token"},
            "y": {"field": "value", "type": "quantitative"},
            "tooltip": [_tip("position"), _tip("token", "nominal"), _tip("value", fmt=".4g")],
        },
    }


def token_grid(cross: pd.DataFrame) -> Spec:
    """A latent across the last sequences: one row per sequence, a cell per position, the token written in it."""
    enc = {"x": {"field": "position", "type": "ordinal"}, "y": {"field": "prompt", "type": "ordinal"}}
    return {
        "datasets": {"cross": cross},
        "data": {"name": "cross"},
        "encoding": enc,
        "layer": [
            {
                "mark": {"type": "rect"},
                "encoding": {
                    "color": {"field": "value", "type": "quantitative", "scale": {"scheme": "oranges"}},
                    "tooltip": [_tip("prompt"), _tip("token", "nominal"), _tip("value", fmt=".4g")],
                },
            },
            {"mark": {"type": "text", "fontSize": 9}, "encoding": {"text": {"field": "token", "type": "nominal"}}},
        ],
    }
