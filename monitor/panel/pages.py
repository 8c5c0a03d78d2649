"""The panel's pages about runs: Overview (every run), Run (one run: what its agent is thinking,
its episodes, its alerts), Alerts and Transcoders. Each page's live part is a fragment that reruns
every ``REFRESH_S`` seconds."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from monitor.panel import charts, data
from monitor.panel import runs as rv
from monitor.panel.ui import REFRESH_S, SLOW_S, alert_table, esc, link, run_header, sampler
from monitor.store.records import Store

__all__ = ["NO_RUNS", "page_alerts", "page_overview", "page_run", "page_transcoders", "returns_with_steers"]

NO_RUNS = "No runs yet. Start the services with `interlatent up` and attach an agent; `make demo` streams a CartPole agent."


def page_overview(store: Store, url: str) -> None:
    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        ov = data.overview(store)
        counts = store.alert_counts()
        with st.container(horizontal=True):
            st.metric("monitor", "up" if ov["monitor_alive"] else "down", border=True)
            st.metric("explainer workers", ov["explainers"], border=True)
            st.metric("rejected frames", sum(ov["rejected"].values()), border=True)
            st.metric("alerts firing", counts["firing"], border=True)
            st.metric("alerts pending", counts["pending"], border=True)
        st.subheader("Runs, newest first")
        rows = rv.run_rows(store)
        if rows:
            sm = sampler(url)
            sm.sample(rows)
            table = pd.DataFrame(
                [
                    {
                        "run": r["run"],
                        "open": link(page="Run", run=r["run"]),
                        "status": "● live" if r["status"] == "live" else "○ ended",
                        "steps": r["steps"],
                        "steps/s": r["steps/s"],
                        "steps/s recent": sm.series(r["run"])["steps/s"],
                        "drops": r["drops"],
                        "drops recent": sm.series(r["run"])["drops"],
                        "lag ms": r["lag ms"],
                        "lag recent": sm.series(r["run"])["lag ms"],
                        "episodes": r["episodes"],
                        "return (last 100)": r["return (last 100)"],
                        "last seen": r["last seen"],
                        "taps (width)": ", ".join(f"{t} ({w})" for t, w in r["taps"].items()),
                    }
                    for r in rows
                ]
            )
            spark = {"width": "small", "y_min": 0}
            st.dataframe(
                table,
                hide_index=True,
                width="stretch",
                key="runs",
                column_config={
                    "steps/s recent": st.column_config.LineChartColumn("steps/s, recent", **spark),
                    "drops recent": st.column_config.LineChartColumn("drops, recent", **spark),
                    "lag recent": st.column_config.LineChartColumn("lag, recent", **spark),
                    "open": st.column_config.LinkColumn("page", display_text="open"),
                },
            )
            st.caption("Sparklines: the last two minutes this panel has watched. Live: seen in the last 10 s.")
        else:
            st.info(NO_RUNS)
        st.subheader("Services")
        if ov["services"]:
            st.dataframe(pd.DataFrame(ov["services"]), hide_index=True, width="stretch", key="services")
        else:
            st.info("No service has reported in the last 10 s: is `interlatent up` (or `interlatent monitor`) running?")
        if ov["rejected"]:
            st.caption("Rejected frames by reason: " + esc(", ".join(f"{k} {v}" for k, v in sorted(ov["rejected"].items()))))
        st.subheader("Newest alerts")
        alert_table(store, ov["alerts"], key="newest_alerts")

    live()


def _strip(store: Store, run: str) -> None:
    """What the agent is thinking: its most active latents now, their labels, scores and alerts."""
    st.markdown("**What the agent is thinking**: its most active latents at its newest step")
    items = rv.thinking(store, run)
    if not items:
        has = any(t.startswith("latents:") for t in store.taps(run))
        st.info(
            "No latent is active at the newest step."
            if has
            else "No latents yet: they stream once a transcoder encodes this run "
            "(`interlatent monitor --auto-train SOURCE>TARGET`, or `interlatent train` and `interlatent import`)."
        )
        return
    for col, f in zip(st.columns(len(items), border=True), items, strict=True):
        with col:
            st.text(f"latent {f['latent']}")
            st.text(f["label"] or "(not explained yet)")
            st.progress(float(min(1.0, max(0.0, f["of_max"]))))
            det = "-" if f["detection"] is None else f"{f['detection']:.2f}"
            sim = "-" if f["simulation"] is None else f"{f['simulation']:.2f}"
            st.caption(f"z {f['z']:+.1f} · value {f['value']:.3f} · detection {det} · simulation r {sim}")
            for a in f["alerts"]:
                st.text(f"alert: {a}")
            st.markdown(f"[card]({link(page='Latents', run=run, tap=f['tap'], latent=f['latent'])})")


def returns_with_steers(store: Store, run: str, modes: dict[int, str]) -> charts.Spec | None:
    """Episode returns over time, failures marked by mode, the spans each steer was on shaded."""
    from monitor.service.steering import steer_effects

    eps = rv.episodes_table(store, run, modes=modes)
    if eps is None:
        return None
    if not store.steer_events(run, count=1000):  # never steered: no spans to read the episodes again for
        return charts.returns(eps)
    now = int(eps["step"].max())
    spans = pd.DataFrame(
        [
            {
                "steer": e["id"],
                "start": e["applied_step"],
                "end": e["reverted_step"] if e["reverted_step"] is not None else now,
                "mean on": e["during"]["mean_return"],
                "mean before": e["before"]["mean_return"],
            }
            for e in steer_effects(store, run)
        ]
    )
    return charts.returns(eps, spans if len(spans) else None)


def page_run(store: Store, run: str, url: str) -> None:
    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        row = run_header(store, run, url)
        if row is None:
            st.info(f"Run {esc(run)} has no counters yet: they appear at the monitor's next flush.")
            return
        _strip(store, run)

    live()

    @st.fragment(run_every=SLOW_S)
    def history() -> None:
        st.markdown("**Episode returns**, by the step each ended (failures marked by how they ended; steers shaded)")
        chart = returns_with_steers(store, run, sampler(url).remember_modes(run, {}))
        if chart is None:
            st.info("No episode has ended yet: episodes come from `tap.wrap(env)` (or `tap.sb3_callback()`).")
        else:
            st.vega_lite_chart(spec=chart, width="stretch", key="returns")
            st.caption(
                "How a CartPole episode failed is read from its last step's observation while the monitor still holds "
                "it (its last 512 steps of metrics) and remembered by this panel from then on; failed: ended before."
            )
        st.markdown("**Alerts of this run**, newest 300 events")
        alerts = [a for _, a in store.last_alerts(run, 300)]
        tl = rv.alert_timeline(alerts)
        if tl is None:
            st.info("No alerts for this run. Rules come from `interlatent up --rules FILE` (see deploy/alerts.example.yaml).")
        else:
            st.vega_lite_chart(spec=charts.alert_timeline(tl), width="stretch", key="run_timeline")

    history()


def page_alerts(store: Store, runs: list[str]) -> None:
    c1, c2, c3, c4 = st.columns(4)
    run = c1.selectbox("run", ["(all)", *runs], key="alert_run")
    sev = c2.multiselect("severity", list(data.SEVERITIES), key="alert_sev")
    rules = sorted({a.get("rule", "") for _, a in store.last_alerts(None if run == "(all)" else run, 2000)})
    rule = c3.multiselect("rule", rules, key="alert_rule")
    state = c4.multiselect("state", list(rv.STATES), key="alert_state")
    st.markdown(f"#### Alerts of {'every run' if run == '(all)' else 'run ' + esc(run)}")

    @st.fragment(run_every=REFRESH_S)
    def live() -> None:
        feed = data.alerts_feed(store, run=None if run == "(all)" else run, severity=sev, rule=rule, state=state)
        tl = rv.alert_timeline(feed[:300])
        if tl is not None:
            st.vega_lite_chart(spec=charts.alert_timeline(tl), width="stretch", key="alert_timeline")
        alert_table(store, feed, key="alert_feed")

    live()


def page_transcoders(store: Store) -> None:
    df = data.transcoder_table(store)
    if not len(df):
        st.info(
            "No transcoders yet: `interlatent train --run R --source TAP --target TAP` trains some, "
            "`interlatent monitor --auto-train` trains them after a warm-up, `interlatent import PATH` brings SAELens ones."
        )
        return
    st.dataframe(df, hide_index=True, width="stretch", key="transcoders")
    if "source" not in df:
        return
    long = (
        df.dropna(subset=["source"])
        .assign(pair=lambda d: d["source"] + " → " + d["target"])
        .melt(id_vars=["run", "pair", "latents"], value_vars=["FVU", "L0", "return recovered"], var_name="figure")
        .dropna(subset=["value"])
    )
    if len(long):
        st.vega_lite_chart(spec=charts.transcoder_figures(long), width="content", key="transcoder_figures")
        st.caption(
            "The multiscale comparison (the seed post's 2/4/8): reconstruction error, sparsity and return recovered against latent count."
        )
