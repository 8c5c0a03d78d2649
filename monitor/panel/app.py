"""The live panel: ``interlatent panel`` runs this script with Streamlit.

It reads Redis only (any number of viewers cost the monitor nothing); the steer box is its one
write, the same request ``interlatent steer`` makes. Each page's live part is a fragment that
reruns every ``INTERLATENT_PANEL_REFRESH_S`` seconds (default 2) on one cached connection.

Deep links: ``?page=Run&run=R``, ``?page=Latents&run=R&tap=T&latent=J``. The sidebar follows
them and writes every choice back into the address. A link to a run, tap or latent that does not
exist says so and shows nothing else (never another run). Text from agents, explanations and
alerts is shown with ``st.text``, in tables, or escaped (:func:`monitor.panel.ui.esc`).
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from monitor.panel import runs as rv
from monitor.panel import ui
from monitor.panel.pages import NO_RUNS, page_alerts, page_overview, page_run, page_transcoders
from monitor.panel.tap_pages import page_correlations, page_language, page_latents
from monitor.panel.ui import esc, link, store_for
from monitor.store.embedded import default_data_dir
from monitor.store.records import ConfigError, resolve_redis_url

ui.freeze_heap_once()

PAGES = ("Overview", "Run", "Latents", "Correlations", "Alerts", "Transcoders", "Language models")
TAP_PAGES = ("Latents", "Correlations", "Language models")


def _redis_url() -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--redis")
    args, _ = p.parse_known_args(sys.argv[1:])
    return resolve_redis_url(args.redis, default_data_dir())


def _pick(label: str, options: list[str], key: str, *, fmt: object = str) -> tuple[str | None, str | None]:
    """A sidebar select following the address: (the choice, the name the address asked for when
    it is not among ``options``). A choice in the sidebar is written back into the address."""
    want = st.query_params.get(key)
    missing = want if want is not None and want not in options else None
    if not options:
        return None, missing
    index = None if missing is not None else options.index(want) if want in options else 0
    value = st.sidebar.selectbox(label, options, index=index, key=f"pick_{key}", format_func=fmt, placeholder=f"choose a {label}")
    if value is not None and value != want:
        st.query_params[key] = value
        missing = None
    return value, missing


def _not_found(what: str, name: str, have: list[str], where: dict[str, str]) -> None:
    st.error(f"No {what} {esc(name)}" + (f" in run {esc(where['run'])}" if "run" in where else "") + ".")
    if have:
        st.markdown(
            f"The {what}s there are: "
            + ", ".join(f"[{esc(h)}]({link(**{**where, what: h})})" for h in have[:20])
            + (" …" if len(have) > 20 else "")
        )


def main() -> None:
    st.set_page_config(page_title="Interlatent", layout="wide")
    try:
        url = _redis_url()
        store = store_for(url)
    except ConfigError as e:
        st.error(esc(e))
        st.stop()
    want = st.query_params.get("page")
    page = st.sidebar.radio("page", PAGES, index=PAGES.index(want) if want in PAGES else 0, key="page")
    if page != want:
        st.query_params["page"] = page
    st.title(f"Interlatent · {page}")
    if page == "Overview":
        page_overview(store, url)
        return
    if page == "Transcoders":
        page_transcoders(store)
        return
    runs = rv.runs_newest_first(store)
    if page == "Alerts":
        page_alerts(store, runs)
        return
    before = st.query_params.get("run")
    run, missing = _pick("run", runs, "run")
    if missing is not None:
        _not_found("run", missing, runs, {"page": page})
        return
    if run is None:
        st.info(NO_RUNS)
        return
    if before is not None and run != before:  # another run chosen: its own taps and latents
        for k in ("tap", "latent"):
            st.query_params.pop(k, None)
    if page == "Run":
        page_run(store, run, url)
        return
    widths = {t: int(v["width"]) for t, v in store.taps(run).items()}
    taps = sorted(widths, key=lambda t: (not t.startswith("latents:"), t))
    tap, missing = _pick("tap", taps, "tap", fmt=lambda t: f"{t} ({widths[t]} {rv.unit_of(t)}s)")
    if missing is not None:
        _not_found("tap", missing, taps, {"page": page, "run": run})
        return
    if tap is None:
        st.info(f"Run {esc(run)} has streamed no activations yet.")
        return
    width, unit = widths[tap], rv.unit_of(tap)
    asked = st.query_params.get("latent", "0")
    if not asked.isdigit() or int(asked) >= width:
        st.error(f"{esc(tap)} has {width} {unit}s (0 to {width - 1}): there is no {unit} {esc(asked)}.")
        st.markdown(f"[Open {unit} 0]({link(page=page, run=run, tap=tap, latent=0)})")
        return
    latent = int(st.sidebar.number_input(f"{unit} (0 to {width - 1})", 0, width - 1, int(asked), key="pick_latent"))
    if str(latent) != asked:
        st.query_params["latent"] = str(latent)
    if page == "Latents":
        page_latents(store, run, tap, latent, url)
    elif page == "Correlations":
        page_correlations(store, run, tap, url)
    else:
        page_language(store, run, tap, latent, url)


main()
