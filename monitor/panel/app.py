"""The live panel: ``interlatent panel`` runs this script with Streamlit.

It reads Redis only (any number of viewers cost the monitor nothing). Each page's live part is a
fragment that reruns every ``INTERLATENT_PANEL_REFRESH_S`` seconds (default 2) on one cached
connection. Deep links: ``?page=Latents&run=R&tap=T&latent=J``. Text from explanations and
alerts is shown with ``st.text`` or in tables, never as markdown or HTML.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import urlencode

import altair as alt
import pandas as pd
import streamlit as st

from monitor.panel import data
from monitor.store.embedded import default_data_dir
from monitor.store.records import ConfigError, Store, connect, resolve_redis_url

REFRESH_S = float(os.environ.get("INTERLATENT_PANEL_REFRESH_S", "2"))
PAGES = ("Overview", "Latents", "Correlations", "Alerts", "Transcoders", "Language models")
TOP_LATENTS = 3  # latents shown per token on the language-model page
NO_RUNS = "No runs yet. Start the services with `interlatent up` and attach an agent; `make demo` streams a CartPole agent."


@st.cache_resource(show_spinner=False)
def _store(url: str) -> Store:
    return Store(connect(url))


def _redis_url() -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--redis")
    args, _ = p.parse_known_args(sys.argv[1:])
    return resolve_redis_url(args.redis, default_data_dir())


def _link(**params: object) -> str:
    return "./?" + urlencode({k: v for k, v in params.items() if v is not None})


def _pick(label: str, options: list[str], key: str) -> str | None:
    """A sidebar select whose default comes from the query string (deep links)."""
    if not options:
        return None
    want = st.query_params.get(key)
    index = options.index(want) if want in options else 0
    return st.sidebar.selectbox(label, options, index=index, key=key)


# -- pages ---------------------------------------------------------------------------------------
def page_overview(store: Store) -> None:
    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        ov = data.overview(store)
        c1, c2, c3 = st.columns(3)
        c1.metric("monitor", "up" if ov["monitor_alive"] else "down")
        c2.metric("explainer workers", ov["explainers"])
        c3.metric("rejected frames", sum(ov["rejected"].values()))
        st.subheader("Runs")
        if ov["runs"]:
            st.dataframe(pd.DataFrame(ov["runs"]), hide_index=True, width="stretch")
        else:
            st.info(NO_RUNS)
        st.subheader("Services")
        if ov["services"]:
            st.dataframe(pd.DataFrame(ov["services"]), hide_index=True, width="stretch")
        else:
            st.info("No service has reported in the last 10 s: is `interlatent up` (or `interlatent monitor`) running?")
        if ov["rejected"]:
            st.caption("Rejected frames by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(ov["rejected"].items())))
        st.subheader("Newest alerts")
        _alert_table(ov["alerts"])

    live()


def _alert_table(alerts: list[dict]) -> None:
    if not alerts:
        st.info("No alerts. Rules come from `interlatent up --rules FILE` (see deploy/alerts.example.yaml).")
        return
    df = pd.DataFrame(
        [
            {
                "time": pd.to_datetime(a.get("time", 0), unit="s"),
                "severity": a.get("severity"),
                "state": a.get("state"),
                "rule": a.get("rule"),
                "run": a.get("run"),
                "tap": a.get("tap"),
                "latent": a.get("latent"),
                "step": a.get("step"),
                "explanation": (a.get("explanation") or {}).get("label", ""),
                "open": _link(page="Latents", run=a.get("run"), tap=a.get("tap"), latent=a.get("latent")),
            }
            for a in alerts
        ]
    )
    st.dataframe(
        df, hide_index=True, width="stretch", column_config={"open": st.column_config.LinkColumn("latent", display_text="open")}
    )


def page_latents(store: Store, run: str, tap: str, latent: int) -> None:
    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        hm = data.heatmap(store, run, tap)
        if hm is None:
            st.info(f"No activations of {tap} kept yet: they appear once the agent streams.")
            return
        heat = (
            alt.Chart(hm)
            .mark_rect()
            .encode(
                x=alt.X("step:O", axis=alt.Axis(labelOverlap=True, title=None)),
                y=alt.Y("latent:O"),
                color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis")),
                tooltip=["step", "latent", "value"],
            )
            .properties(height=min(400, 14 * hm["latent"].nunique() + 20), title=f"{tap}: recent activations")
        )
        chart: alt.TopLevelMixin = heat
        tr = data.metric_traces(store, run, int(hm["step"].min()), int(hm["step"].max()))
        if tr is not None and len(tr):
            lines = (
                alt.Chart(tr)
                .mark_line()
                .encode(
                    x=alt.X("step:O", axis=alt.Axis(labelOverlap=True)),
                    y="value:Q",
                    color="metric:N",
                    tooltip=["step", "metric", "value"],
                )
                .properties(height=160)
            )
            chart = alt.vconcat(heat, lines).resolve_scale(x="shared")
        st.altair_chart(chart, width="stretch")
        _latent_card(store, run, tap, latent)

    live()
    _steer_form(store, run, tap, latent)


def _steer_form(store: Store, run: str, tap: str, latent: int) -> None:
    """Steer this latent of a live agent (only when the agent opted in): the same request as
    ``interlatent steer``; the agent's answer shows up in the alerts as rule ``steering``."""
    from monitor.service.steering import build_intervention, clear_interventions, set_interventions, steer_effects

    name = tap.removeprefix("latents:") if data.is_latent_tap(tap) else None
    state = store.steering(run)
    with st.expander("Steer this latent"):
        if name is None or state["control"] is not True:
            st.info("Steering needs a latent tap (`latents:...`) and an agent attached with `allow_control=True`.")
            return
        active = ", ".join(m["id"] for m in state["interventions"]) or "nothing"
        st.caption(f"asked for: {active}; the agent has applied version {state['applied_version']} of {state['version']}")
        c1, c2, c3, c4 = st.columns(4)
        op = c1.selectbox("op", ["add", "scale", "ablate"], key="steer_op")
        alpha = c2.number_input("alpha (add) / factor (scale)", value=-1.0, step=0.5, key="steer_alpha")
        if c3.button("apply", key="steer_apply"):
            try:
                version = set_interventions(
                    store.r, run, [build_intervention(store, run, latent=latent, op=op, transcoder=name, alpha=alpha)]
                )
                st.success(f"asked the agent to {op} along {name}/{latent} (version {version})")
            except ConfigError as e:
                st.error(str(e))
        if c4.button("clear all", key="steer_clear"):
            st.success(f"cleared all steering of {run} (version {clear_interventions(store.r, run)})")
        effects = steer_effects(store, run)
        if effects:
            st.caption(
                "Episode returns while each steer was on, beside those since the change before it "
                "(an observation; `interlatent sweep` is the controlled test):"
            )
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "steer": e["id"],
                            "op": e["op"],
                            "steps": f"{e['applied_step']}-{e['reverted_step'] if e['reverted_step'] is not None else 'now'}",
                            "episodes on": e["during"]["episodes"],
                            "mean return on": e["during"]["mean_return"],
                            "episodes before": e["before"]["episodes"],
                            "mean return before": e["before"]["mean_return"],
                            "difference": None if e["difference"] is None else round(e["difference"]["mean"], 2),
                        }
                        for e in effects
                    ]
                ),
                hide_index=True,
                width="stretch",
                key="steer_effects",
            )


def _latent_card(store: Store, run: str, tap: str, latent: int) -> None:
    card = data.latent_card(store, run, tap, latent)
    if card is None:
        st.info(f"{tap} has no latent #{latent}.")
        return
    st.subheader(f"#{latent} of {tap}")
    left, right = st.columns(2)
    with left:
        st.dataframe(pd.DataFrame([card["stats"]]).T.rename(columns={0: "value"}), width="stretch")
    with right:
        if len(card["corr"]):
            st.altair_chart(
                alt.Chart(card["corr"])
                .mark_bar()
                .encode(
                    x=alt.X("r:Q", scale=alt.Scale(domain=[-1, 1])),
                    y=alt.Y("metric:N", sort="-x"),
                    color=alt.condition("datum.r > 0", alt.value("#2a9d8f"), alt.value("#e76f51")),
                )
                .properties(title="correlation with each metric"),
                width="stretch",
            )
        else:
            st.info("No correlations yet: the run's steps need metrics (`tap.wrap(env, ...)` logs them).")
    e = card["explanation"]
    st.markdown("**Explanation**")
    if e is None:
        st.info(f"Not explained yet. `interlatent explain --run {run} --latent {tap}/{latent}` files a job for the explainer.")
    elif e.get("error"):
        st.text(f"explaining failed: {e['error']}")
    else:
        st.text(e.get("label", ""))
        st.text(e.get("text", ""))
        s = e.get("score") or {}
        st.caption(
            f"backend {e.get('backend')} · detection score {s.get('balanced_accuracy')} (shuffled {s.get('shuffled')}) · "
            f"simulation r {s.get('simulation')} (shuffled {s.get('simulation_shuffled')}) · n={s.get('n')}"
        )
    st.markdown("**Top-activating steps**")
    if len(card["top"]):
        st.dataframe(card["top"], hide_index=True, width="stretch")
    else:
        st.info("No top examples yet.")
    st.markdown("**Alerts raised**")
    _alert_table(list(reversed(card["alerts"])))


def page_correlations(store: Store, run: str, tap: str) -> None:
    d0 = data.corr_matrix(store, run, tap)
    if d0 is None:
        st.info("No correlations yet: they need the run's step metrics (`tap.wrap(env, ...)`) and a window of paired steps.")
        return
    c1, c2 = st.columns(2)
    sort_by = c1.selectbox("sort latents by |r| with", ["(latent)", *d0.columns], key="sort_by")
    ew = c2.toggle("exponentially weighted", key="ew")

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        df = data.corr_matrix(store, run, tap, sort_by=sort_by, ew=ew)
        if df is None:
            return
        long = df.reset_index().melt(id_vars="latent", var_name="metric", value_name="r")
        st.altair_chart(
            alt.Chart(long)
            .mark_rect()
            .encode(
                x="metric:N",
                y=alt.Y("latent:O", sort=list(df.index)),
                color=alt.Color("r:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)),
                tooltip=["latent", "metric", "r"],
            )
            .properties(height=min(600, 16 * len(df) + 30)),
            width="stretch",
        )
        st.dataframe(df.round(3), width="stretch")

    live()


def page_alerts(store: Store, runs: list[str]) -> None:
    c1, c2, c3, c4 = st.columns(4)
    run = c1.selectbox("run", ["(all)", *runs], key="alert_run")
    sev = c2.multiselect("severity", list(data.SEVERITIES), key="alert_sev")
    rules = sorted({a.get("rule", "") for a in store.alerts(None if run == "(all)" else run)})
    rule = c3.multiselect("rule", rules, key="alert_rule")
    state = c4.multiselect("state", ["pending", "firing", "resolved", "applied", "reverted", "refused"], key="alert_state")

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        _alert_table(data.alerts_feed(store, run=None if run == "(all)" else run, severity=sev, rule=rule, state=state))

    live()


def page_transcoders(store: Store) -> None:
    df = data.transcoder_table(store)
    if not len(df):
        st.info(
            "No transcoders yet: `interlatent train --run R --source TAP --target TAP` trains some, "
            "`interlatent monitor --auto-train` trains them after a warm-up, `interlatent import PATH` brings SAELens ones."
        )
        return
    st.dataframe(df, hide_index=True, width="stretch")
    long = (
        df.assign(pair=df["source"] + " → " + df["target"])
        .melt(id_vars=["run", "pair", "latents"], value_vars=["FVU", "L0", "return recovered"], var_name="figure")
        .dropna(subset=["value"])
    )
    if len(long):
        st.altair_chart(
            alt.Chart(long)
            .mark_line(point=True)
            .encode(
                x=alt.X("latents:Q", scale=alt.Scale(type="log", base=2)),
                y="value:Q",
                color="pair:N",
                tooltip=["run", "pair", "latents", "value"],
            )
            .properties(width=260, height=200)
            .facet(column="figure:N")
            .resolve_scale(y="independent")
        )
        st.caption(
            "The multiscale comparison (the seed post's 2/4/8): reconstruction error, sparsity and return recovered against latent count."
        )


def page_language(store: Store, run: str, tap: str, latent: int) -> None:
    steps = store.token_steps(run)
    if not steps:
        st.info(
            "This run streams no tokens. Call `tap.track_tokens(tokenizer)` once, or `tap.tokens(tokenizer.convert_ids_to_tokens(ids[0]))` before each forward."
        )
        return
    encoded = data.latent_taps_for(store, run, tap)
    if len(encoded) > 1:
        which: str | None = st.selectbox("latents of", encoded, key="lm_latents")
    else:
        which = encoded[0] if encoded else None

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        cross = data.cross_prompt(store, run, tap, latent)
        if cross is None:
            st.info("No recent activations with tokens for this tap.")
            _token_latents(store, run, tap, which)
            return
        last = int(cross["prompt"].max())
        one = cross[cross["prompt"] == last].assign(label=lambda d: d["position"].astype(str) + " " + d["token"])
        st.subheader(f"#{latent} over the tokens of the sequence from step {last}")
        st.altair_chart(
            alt.Chart(one)
            .mark_bar()
            .encode(
                x=alt.X("label:N", sort=list(one["label"]), title="token"), y="value:Q", tooltip=["position", "token", "value"]
            ),
            width="stretch",
        )
        st.subheader(f"#{latent} across the last {cross['prompt'].nunique()} sequences")
        base = alt.Chart(cross).encode(x="position:O", y="prompt:O")
        st.altair_chart(
            base.mark_rect().encode(
                color=alt.Color("value:Q", scale=alt.Scale(scheme="oranges")), tooltip=["prompt", "token", "value"]
            )
            + base.mark_text(fontSize=9).encode(text="token:N"),
            width="stretch",
        )
        _token_latents(store, run, tap, which)

    live()


def _token_latents(store: Store, run: str, tap: str, which: str | None) -> None:
    """The latest sequence, token by token, with its most active latents and their explanations."""
    if which is None:
        st.info(
            f"No transcoder encodes {tap}, so there are no latents per token: `interlatent import PATH --run {run} "
            f"--source {tap} --target {tap}` registers an SAELens SAE trained on it (its hook_name), or pick a `latents:` tap."
        )
        return
    table = data.token_latents(store, run, which, top=TOP_LATENTS)
    if table is None:
        st.info(f"No recent latents of {which} with tokens yet.")
        return
    st.subheader(f"Top {TOP_LATENTS} latents of {which} per token of the sequence from step {int(table['step'].iloc[0])}")
    st.dataframe(table.drop(columns=["step"]), hide_index=True, width="stretch", key="token_latents")
    st.caption(
        "Latents with a value above 0, highest first; generated marks the tokens of generation steps. An explanation "
        f"appears once the explainer has written one (`interlatent explain --run {run} --latent {which}/J`)."
    )


# -- layout --------------------------------------------------------------------------------------
def main() -> None:
    st.set_page_config(page_title="Interlatent", layout="wide")
    try:
        store = _store(_redis_url())
    except ConfigError as e:
        st.error(str(e))
        st.stop()
    want = st.query_params.get("page")
    page = st.sidebar.radio("page", PAGES, index=PAGES.index(want) if want in PAGES else 0, key="page")
    st.title(f"Interlatent · {page}")
    if page == "Overview":
        page_overview(store)
        return
    if page == "Transcoders":
        page_transcoders(store)
        return
    runs = store.runs()
    if page == "Alerts":
        page_alerts(store, runs)
        return
    run = _pick("run", runs, "run")
    if run is None:
        st.info(NO_RUNS)
        return
    taps = sorted(store.taps(run), key=lambda t: (not data.is_latent_tap(t), t))
    tap = _pick("tap", taps, "tap")
    if tap is None:
        st.info(f"Run {run} has streamed no activations yet.")
        return
    width = store.taps(run)[tap]["width"]
    try:
        want_latent = int(st.query_params.get("latent", 0))
    except ValueError:
        want_latent = 0
    latent = int(st.sidebar.number_input("latent", 0, width - 1, min(max(0, want_latent), width - 1), key="latent"))
    if page == "Latents":
        page_latents(store, run, tap, latent)
    elif page == "Correlations":
        page_correlations(store, run, tap)
    else:
        page_language(store, run, tap, latent)


main()
