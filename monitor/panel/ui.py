"""What every page of the panel shares: the cached connection and sampler, escaping, deep links,
the run header with its live/ended badge, and the alert table.

Names from agents and text from explanations reach Streamlit either as plain text (``st.text``,
table cells) or through :func:`esc`, so markdown, links, URLs and Streamlit's ``:color[...]``
directives in a run name render as typed.
"""

from __future__ import annotations

import gc
import html
import os
import re
import string
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from monitor.panel import runs as rv
from monitor.store.records import Store, connect

__all__ = [
    "REFRESH_S",
    "SLOW_S",
    "alert_table",
    "code",
    "esc",
    "freeze_heap_once",
    "heading",
    "link",
    "run_header",
    "sampler",
    "store_for",
]

REFRESH_S = float(os.environ.get("INTERLATENT_PANEL_REFRESH_S", "2"))
SLOW_S = 2.5 * REFRESH_S  # what changes only as episodes end (returns, alert history, a latent's card)
_PUNCT = set(string.punctuation)
_frozen = False


def freeze_heap_once() -> None:
    """Keep what is loaded by the first script run out of the garbage collector's sight.

    Streamlit collects garbage fully after every script run, so after every refresh of every
    fragment (``runner.postScriptGC``), and with pandas and pyarrow loaded that was most of the
    panel's CPU (measured: one viewer of a live run page, 9 % of a core; 2.5 % frozen). The
    modules and caches loaded by then live as long as the server; what comes later is collected
    as before.
    """
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


def esc(text: object) -> str:
    """``text`` for a markdown-rendering element, shown as typed: every ASCII punctuation character
    becomes a numeric character reference (``&#58;`` for ``:``), which markdown shows as the
    character but never parses (no emphasis, link, HTML or ``:color[...]`` directive). Streamlit
    also links URLs and addresses in the text after parsing, escaped or not, so an invisible word
    joiner (U+2060) goes inside each ``://``, ``www.`` and after each ``@``."""
    broken = str(text).replace("://", ":\u2060//").replace("@", "@\u2060")
    broken = re.sub(r"(?i)www\.", lambda m: m[0][0] + "\u2060" + m[0][1:], broken)
    return "".join(f"&#{ord(c)};" if c in _PUNCT else c for c in broken).replace("\n", " ")


def code(text: object) -> str:
    """``text`` as a markdown code span, literal as typed: fenced by more backticks than it holds
    in a row (a code span parses nothing inside it, and is never linked)."""
    text = str(text).replace("\n", " ")
    fence = "`" * (1 + max((len(m) for m in re.findall("`+", text)), default=0))
    return f"{fence} {text} {fence}" if text.startswith("`") or text.endswith("`") else f"{fence}{text}{fence}"


def heading(text: str) -> None:
    """A small heading whose text is exactly ``text``: HTML-escaped, never markdown."""
    st.html(f'<h4 style="margin: 0.25rem 0 0 0; font-size: 1.5rem; font-weight: 600;">{html.escape(text)}</h4>')


def link(**params: object) -> str:
    return "./?" + urlencode({k: v for k, v in params.items() if v is not None})


@st.cache_resource(show_spinner=False)
def store_for(url: str) -> Store:
    return Store(connect(url))


@st.cache_resource(show_spinner=False)
def sampler(url: str) -> rv.Sampler:
    """One per panel process and Redis: the runs' rate history, shared by every viewer."""
    return rv.Sampler()


def run_header(store: Store, run: str, url: str) -> dict[str, Any] | None:
    """The run's name with a live/ended badge, and its counters with sparklines of the recent
    steps/s, drops and lag (the panel also notes how the newest episodes ended). Returns the
    run's row (None when the run has no counters yet)."""
    rows = rv.run_rows(store, [run])
    row = rows[0] if rows else None
    head, badge = st.columns([8, 1], vertical_alignment="center")
    with head:
        heading(f"Run {run}")
    if row is None:
        badge.badge("no data", color="gray")
        return None
    live = row["status"] == "live"
    badge.badge("live" if live else "ended", color="green" if live else "gray")
    sm = sampler(url)
    sm.sample(rows)
    series = sm.series(run)
    # how the newest episodes ended, while the monitor still holds their last steps (the returns chart's marks)
    sm.remember_modes(run, rv.end_modes(store, run, store.episodes(run, count=50)))
    cols = st.columns(6)
    steps = row["steps"]
    cols[0].metric("steps", f"{steps:,}" if steps < 100_000 else f"{steps / 1000:,.0f}k", border=True, help=f"{steps:,} steps")
    cols[1].metric("episodes", row["episodes"], border=True)
    cols[2].metric("return (last 100)", row["return (last 100)"], border=True)
    for col, name in zip(cols[3:], ("steps/s", "drops", "lag ms"), strict=True):
        col.metric(name, row[name], border=True, chart_data=series[name] or None, height=150 if series[name] else "content")
    st.caption(
        f"last seen {esc(row['last seen'])} ({row['last seen s']:.0f} s ago) · taps: "
        + ", ".join(f"{esc(t)} ({w} {rv.unit_of(t)}s)" for t, w in row["taps"].items())
    )
    return row


def alert_table(store: Store, alerts: list[dict[str, Any]], *, key: str, empty: str | None = None) -> None:
    """Alert events as a table: time with its zone, state, rule, where (channel or latent), the
    latent's explanation as it is now, and a link to its card."""
    if not alerts:
        st.info(empty or "No alerts. Rules come from `interlatent up --rules FILE` (see deploy/alerts.example.yaml).")
        return
    rows = rv.alert_rows(store, alerts)
    df = pd.DataFrame(
        [
            {
                **{k: v for k, v in r.items() if not k.startswith("_")},
                "open": link(page="Latents", run=r["run"], tap=r["_tap"], latent=r["_latent"])
                if r["_latent"] is not None
                else None,
            }
            for r in rows
        ]
    )
    st.dataframe(
        df,
        hide_index=True,
        width="stretch",
        key=key,
        column_config={
            "open": st.column_config.LinkColumn("card", display_text="open"),
            "unit": st.column_config.TextColumn("channel / latent"),
        },
    )
