"""The panel's pages about one tap of a run: Latents (the heatmap, a small chart per metric, the
card of one channel or latent, and the steer box where steering applies), Correlations and
Language models."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from monitor.panel import charts, data
from monitor.panel import runs as rv
from monitor.panel.pages import returns_with_steers
from monitor.panel.ui import REFRESH_S, SLOW_S, alert_table, code, esc, run_header, sampler
from monitor.store.records import ConfigError, Store

__all__ = ["page_correlations", "page_language", "page_latents", "steer_target"]

TOP_LATENTS = 3  # latents shown per token on the language-model page


def page_latents(store: Store, run: str, tap: str, latent: int, url: str) -> None:
    unit = rv.unit_of(tap)

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        run_header(store, run, url)
        hm = data.heatmap(store, run, tap)
        if hm is None:
            st.info(f"No activations of {esc(tap)} kept yet: they appear once the agent streams.")
            return
        st.vega_lite_chart(spec=charts.heatmap(hm.rename(columns={"latent": unit}), tap, unit), width="stretch", key="heatmap")
        tr = data.metric_traces(store, run, int(hm["step"].min()), int(hm["step"].max()))
        if tr is not None and len(tr):
            st.markdown("**The run's metrics over the same steps**, one chart each (hover for the values at a step)")
            st.vega_lite_chart(spec=charts.metric_multiples(tr), width="content", key="traces")

    live()
    st.fragment(run_every=SLOW_S)(lambda: _card(store, run, tap, latent, unit))()
    _steer_box(store, run, tap, latent, url)


def _card(store: Store, run: str, tap: str, latent: int, unit: str) -> None:
    card = data.latent_card(store, run, tap, latent)
    if card is None:
        st.info(f"No statistics of {esc(tap)} yet.")
        return
    st.subheader(f"{unit.capitalize()} {latent} of {esc(tap)}")
    left, right = st.columns(2)
    with left:
        st.dataframe(pd.DataFrame([card["stats"]]).T.rename(columns={0: "value"}), width="stretch", key="card_stats")
    with right:
        if len(card["corr"]):
            st.vega_lite_chart(spec=charts.corr_bars(card["corr"]), width="stretch", key="card_corr")
        else:
            st.info("No correlations yet: the run's steps need metrics (`tap.wrap(env, ...)` logs them).")
    e = card["explanation"]
    st.markdown("**Explanation**")
    if e is None:
        st.info(
            f"Not explained yet. {code(f'interlatent explain --run {run} --latent {tap}/{latent}')} files a job for the explainer."
        )
    elif e.get("error"):
        st.text(f"explaining failed: {e['error']}")
    else:
        st.text(e.get("label", ""))
        st.text(e.get("text", ""))
        s = e.get("score") or {}
        st.caption(
            esc(
                f"backend {e.get('backend')} · detection score {s.get('balanced_accuracy')} (shuffled {s.get('shuffled')}) · "
                f"simulation r {s.get('simulation')} (shuffled {s.get('simulation_shuffled')}) · n={s.get('n')}"
            )
        )
    st.markdown("**Top-activating steps** (all time, with the metrics at each)")
    if len(card["top"]):
        st.dataframe(card["top"], hide_index=True, width="stretch", key="card_top")
    else:
        st.info("No top examples yet.")
    before = data.before_activations(store, run, tap, latent)
    st.markdown("**The steps before its activations**: each metric over the 20 steps before its strongest recent ones")
    if before is None:
        st.info(f"No recent step where this {unit} is above 0, or no recent metrics.")
    else:
        df, peaks = before
        st.vega_lite_chart(spec=charts.before_activations(df), width="content", key="card_before")
        st.caption(f"Activations at steps {', '.join(map(str, peaks))} (thin lines), their mean in red.")
    st.markdown(f"**Alerts raised on this {unit}**")
    alert_table(store, list(reversed(card["alerts"])), key="card_alerts", empty=f"No alerts on this {unit}.")


def steer_target(store: Store, run: str, tap: str) -> tuple[str | None, str]:
    """The transcoder to steer with from this tap, or None and why the steer box does not apply."""
    if not data.is_latent_tap(tap):
        return None, "raw channels are not steered: steering adds a transcoder latent's decoder direction (pick a latents: tap)"
    name = tap.removeprefix("latents:")
    if not any(t["name"] == name for t in store.transcoders()):
        return None, f"no registered transcoder {name} (`interlatent transcoders` lists them)"
    control = store.steering(run)["control"]
    if control is not True:
        return None, (
            "this run's agent did not opt in to steering"
            if control is False
            else "this run's agent has not said whether it accepts steering"
        ) + ": attach it with `agent_side.attach(..., allow_control=True)`"
    return name, ""


def _steer_box(store: Store, run: str, tap: str, latent: int, url: str) -> None:
    """Steer this latent of the live agent, and watch the effect on returns as episodes end:
    the request ``interlatent steer`` makes; the agent's answers show in the alerts as rule
    ``steering``."""
    from monitor.service.steering import build_intervention, clear_interventions, set_interventions, steer_effects

    name, why = steer_target(store, run, tap)
    if name is None:
        if data.is_latent_tap(tap):
            st.caption(f"Steering: {esc(why)}.")
        return
    with st.expander(f"Steer latent {latent} of this run's agent", expanded=True):
        c1, c2, c3, c4 = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
        op = c1.selectbox("op", ["add", "scale", "ablate"], key="steer_op")
        alpha = c2.number_input("alpha (add) / factor (scale)", value=-1.0, step=0.5, key="steer_alpha")
        if c3.button("apply", key="steer_apply"):
            try:
                msg = build_intervention(store, run, latent=latent, op=op, transcoder=name, alpha=alpha)
                version = set_interventions(store.r, run, [msg])
                st.success(f"asked the agent to {op} along latent {latent} (version {version})")
            except ConfigError as e:
                st.error(esc(e))
        if c4.button("clear all", key="steer_clear"):
            st.success(f"cleared all steering of the run (version {clear_interventions(store.r, run)})")

        @st.fragment(run_every=SLOW_S)
        def effect() -> None:
            state = store.steering(run)
            asked = ", ".join(m["id"] for m in state["interventions"]) or "nothing"
            active = ", ".join(state["active"]) or "nothing"
            st.caption(
                esc(
                    f"asked for: {asked} (version {state['version']}); the agent holds version {state['applied_version']}, active: {active}"
                )
            )
            chart = returns_with_steers(store, run, sampler(url).remember_modes(run, {}))
            if chart is not None:
                st.vega_lite_chart(spec=chart, width="stretch", key="steer_returns")
            effects = steer_effects(store, run)
            if not effects:
                st.caption("No steer applied yet: the returns while one is on are compared with those before it here.")
                return
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
                            "95% interval": None
                            if e["difference"] is None or e["difference"]["ci"][0] is None
                            else f"[{e['difference']['ci'][0]:+.1f}, {e['difference']['ci'][1]:+.1f}]",
                        }
                        for e in effects
                    ]
                ),
                hide_index=True,
                width="stretch",
                key="steer_effects",
            )
            st.caption(
                "Episodes that ended while each steer was on, beside those since the change before it: an observation "
                "(`interlatent sweep` is the controlled test)."
            )

        effect()


def page_correlations(store: Store, run: str, tap: str, url: str) -> None:
    unit = rv.unit_of(tap)
    st.fragment(run_every=REFRESH_S)(lambda: run_header(store, run, url))()
    d0 = data.corr_matrix(store, run, tap)
    if d0 is None:
        st.info("No correlations yet: they need the run's step metrics (`tap.wrap(env, ...)`) and a window of paired steps.")
        return
    c1, c2 = st.columns(2)
    sort_by = c1.selectbox(f"sort {unit}s by |r| with", [f"({unit})", *d0.columns], key="sort_by")
    ew = c2.toggle("exponentially weighted", key="ew")

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        df = data.corr_matrix(store, run, tap, sort_by=sort_by, ew=ew)
        if df is None:
            return
        df.index.name = unit
        long = df.reset_index().melt(id_vars=unit, var_name="metric", value_name="r")
        st.markdown(f"**{esc(tap)}**: r of each {unit} with each metric ({'EW' if ew else 'rolling window'}); grey: null")
        st.vega_lite_chart(
            spec=charts.corr_heatmap(long, list(df.index), unit, list(df.columns)), width="stretch", key="corr_heatmap"
        )
        st.dataframe(df.round(3), width="stretch", key="corr_table")

    live()


def page_language(store: Store, run: str, tap: str, latent: int, url: str) -> None:
    run_header(store, run, url)
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
    unit = rv.unit_of(tap)

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        cross = data.cross_prompt(store, run, tap, latent)
        if cross is None:
            st.info("No recent activations with tokens for this tap.")
            _token_latents(store, run, tap, which)
            return
        last = int(cross["prompt"].max())
        one = cross[cross["prompt"] == last].assign(label=lambda d: d["position"].astype(str) + " " + d["token"])
        st.subheader(f"{unit.capitalize()} {latent} over the tokens of the sequence from step {last}")
        st.vega_lite_chart(spec=charts.token_bars(one), width="stretch", key="token_bars")
        st.subheader(f"{unit.capitalize()} {latent} across the last {cross['prompt'].nunique()} sequences")
        st.vega_lite_chart(spec=charts.token_grid(cross), width="stretch", key="token_grid")
        _token_latents(store, run, tap, which)

    live()


def _token_latents(store: Store, run: str, tap: str, which: str | None) -> None:
    """The latest sequence, token by token, with its most active latents and their explanations."""
    if which is None:
        st.info(
            f"No transcoder encodes {esc(tap)}, so there are no latents per token: "
            f"{code(f'interlatent import PATH --run {run} --source {tap} --target {tap}')} registers an SAELens SAE trained "
            "on it (its hook_name), or pick a `latents:` tap."
        )
        return
    table = data.token_latents(store, run, which, top=TOP_LATENTS)
    if table is None:
        st.info(f"No recent latents of {esc(which)} with tokens yet.")
        return
    st.subheader(f"Top {TOP_LATENTS} latents of {esc(which)} per token of the sequence from step {int(table['step'].iloc[0])}")
    st.dataframe(table.drop(columns=["step"]), hide_index=True, width="stretch", key="token_latents")
    st.caption(
        "Latents with a value above 0, highest first; generated marks the tokens of generation steps. An explanation "
        f"appears once the explainer has written one ({code(f'interlatent explain --run {run} --latent {which}/J')})."
    )
