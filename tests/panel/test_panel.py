"""The live panel against a Redis filled by a real short monitor run: a CartPole PPO agent in a
subprocess streaming to a monitor subprocess (with a transcoder and alert rules), an explainer
worker, a tiny GPT-2 streaming tokens, a run with a hostile name, and a steerable agent that opted
in to steering and keeps running. Every page renders in AppTest; one test drives the served panel
in headless Chromium and reports its first-load time and CPU."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import torch
from agents.steerable import TAP as STEER_TAP
from agents.steerable import make_transcoder
from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until

import agent_side
from monitor.store.records import Store, connect

pytest.importorskip("streamlit")
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "monitor" / "panel" / "app.py")
RAW = "mlp_extractor.policy_net.0:in"
HIDDEN = "mlp_extractor.policy_net.1:out"
HOSTILE = "**bold**_[x](http://e.vil)<b>b</b>:red[r]`c`#h"  # markdown, HTML and a directive; no spaces (names have none)
STEER_RUN = "steerable"
RULES = f"""
rules:
  - name: cart-far-out
    kind: threshold
    tap: "{RAW}"
    channels: [0]
    above: 10.0
    severity: critical
  - name: latent-hot
    kind: threshold
    tap: "latents:*"
    above: 4.0
    severity: warning
"""
WORDS = [f"w{i}" for i in range(30)] + [" cat", " sat", " on", " the", " mat"]
ZONED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+$")  # a time with its zone


def _lm_run(endpoint: str, store: Store) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(WORDS), n_positions=32)
    ).eval()
    rng = np.random.default_rng(0)
    with agent_side.attach(model, ["transformer.wte:out"], run="lm", endpoint=endpoint) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            for _ in range(12):
                ids = rng.integers(0, len(WORDS), (1, 8))
                tap.tokens([WORDS[i] for i in ids[0]])
                model(torch.as_tensor(ids))
    wait_until(
        lambda: len(store.token_steps("lm")) == 12 and store.recent("lm", "transformer.wte:out") is not None, what="lm tokens"
    )


def _cartpole(endpoint: str, run: str, steps: int, *extra: str) -> None:
    agent = spawn(
        [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", endpoint, "--run", run, "--steps", str(steps), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = agent.communicate(timeout=180)
    assert agent.returncode == 0, out.decode()[-2000:]


@pytest.fixture(scope="module")
def filled(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """A Redis as a short real session leaves it, with one agent still running (opted in to
    steering). Tests here read it, and the steer test steers that agent; none flushes it."""
    from explainer import Worker
    from monitor.transcoders.artifacts import save_artifact
    from monitor.transcoders.model import Transcoder
    from monitor.transcoders.training import artifact_info

    store = Store(connect(redis_url))
    store.r.flushdb()
    tmp = tmp_path_factory.mktemp("panel")
    torch.manual_seed(0)
    tc = Transcoder(4, 3, 4).eval()
    path = save_artifact(tmp / "tc", tc, source=RAW, target=RAW, run="cartpole")
    q = {"l0": 1.5, "fvu": 0.02, "dead_frac": 0.0, "return_recovered": 0.9}
    store.register_transcoder(artifact_info("tc", path, tc, run="cartpole", source=RAW, target=RAW, q=q))
    steer_tc = make_transcoder()
    path = save_artifact(tmp / "steer-tc", steer_tc, source=STEER_TAP, target=STEER_TAP, run=STEER_RUN)
    store.register_transcoder(
        artifact_info("steer-tc", path, steer_tc, run=STEER_RUN, source=STEER_TAP, target=STEER_TAP, q=None)
    )
    (tmp / "rules.yaml").write_text(RULES)
    data_dir = tmp / "data"  # the monitor's CURVE key, which the steerable agent checks, is written here
    endpoint = free_endpoint()
    mon = spawn_monitor(redis_url, endpoint, "--rules", str(tmp / "rules.yaml"), "--data-dir", str(data_dir))
    steerable = None
    try:
        _cartpole(endpoint, "cartpole", 800, "--spike-at", "700")
        _lm_run(endpoint, store)
        _cartpole(endpoint, HOSTILE, 60)
        key = data_dir / "curve" / "monitor.key"
        wait_until(key.exists, 30, what="the monitor's public key")
        stop = tmp / "steerable.stop"
        steerable = spawn(
            [str(AGENT_DIR / "steerable.py"), "--endpoint", endpoint, "--run", STEER_RUN, "--allow-control"]
            + ["--stop-file", str(stop), "--sleep-ms", "10"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "steerable.log", "w"),
            env={"INTERLATENT_MONITOR_KEY": str(key)},
        )
        wait_until(lambda: store.steering(STEER_RUN)["control"] is True, 60, what="the steerable agent's hello")
        wait_until(lambda: any(a["rule"] == "cart-far-out" for a in store.alerts("cartpole")), 30, what="the spike's alert")
        # the spike's alert files a job at once, the 500-example jobs for every latent come with an
        # analytics write (each second): explain what is filed until latent 0's is among it
        worker = Worker(store, consumer="panel-test")

        def explained() -> object:
            worker.run(burst=True)  # whatever has been filed so far
            return store.explanation("cartpole", "latents:tc", 0)

        wait_until(explained, 30, what="explain jobs filed by the monitor, latent 0's explained")
        wait_until(lambda: "latents:steer-tc" in store.taps(STEER_RUN), 30, what="the steerable run's latents")
        yield store
    finally:
        if steerable is not None:
            (tmp / "steerable.stop").touch()
            steerable.wait(timeout=30)
        mon.terminate()
        mon.wait(timeout=20)
        store.r.close()


@pytest.fixture(autouse=True)
def _own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app finds Redis through the environment; put it back as it was after each test."""
    monkeypatch.setenv("INTERLATENT_REDIS_URL", "")  # records the original, restored at teardown


def _app(redis_url: str, **params: str) -> AppTest:
    os.environ["INTERLATENT_REDIS_URL"] = redis_url  # the _own_env fixture restores it
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def unescape(text: str) -> str:
    """Markdown as the browser shows it: the panel writes the punctuation of names as character
    references, with an invisible word joiner after each ``:``, ``.`` and ``@``."""
    return html.unescape(text).replace("\u2060", "")


def _texts(at: AppTest) -> str:
    """Everything the page shows as text, tables included, markdown unescaped."""
    parts = [e.value for kind in ("title", "subheader", "markdown", "text", "caption", "info", "error") for e in at.get(kind)]
    parts += [re.sub("<[^>]+>", "", h.proto.body) for h in at.get("html")]  # headings, HTML-escaped
    parts += [m.label + " " + str(m.value) for m in at.metric]
    parts += [df.value.to_csv() for df in at.dataframe]
    return unescape("\n".join(map(str, parts)))


def _charts(at: AppTest) -> list[dict]:
    """Each chart's Vega-Lite spec, with its datasets as DataFrames under "_data"."""
    out = []
    for c in at.get("vega_lite_chart"):
        spec = json.loads(c.proto.spec)
        spec["_data"] = [convert_arrow_bytes_to_pandas_df(d.data.data) for d in c.proto.datasets]
        out.append(spec)
    return out


def _chart_with(at: AppTest, *columns: str):
    """The one dataset among the page's charts that has these columns."""
    found = [d for c in _charts(at) for d in c["_data"] if set(columns) <= set(d.columns)]
    assert len(found) == 1, [list(d.columns) for c in _charts(at) for d in c["_data"]]
    return found[0]


FRAMES = {  # the page's tables, known by their columns
    "runs": ("run", "status", "steps/s recent"),
    "services": ("kind", "pid"),
    "alerts": ("time", "state", "rule", "unit", "explanation"),
    "card_top": ("step", "index", "value"),
    "corr_table": ("cart_pos", "pole_angle"),
    "transcoders": ("name", "FVU"),
    "steer_effects": ("steer", "episodes on"),
}


def _frame(at: AppTest, which: str):
    """The one table of the page with the columns of ``which`` (see FRAMES)."""
    found = [d.value for d in at.dataframe if set(FRAMES[which]) <= set(d.value.columns)]
    assert len(found) == 1, (which, [list(d.value.columns) for d in at.dataframe])
    return found[0]


def _has_frame(at: AppTest, which: str) -> bool:
    return any(set(FRAMES[which]) <= set(d.value.columns) for d in at.dataframe)


# -- overview and run ------------------------------------------------------------------------------
def test_overview_lists_runs_newest_first_with_status_sparklines_and_tap_widths(filled: Store, redis_url: str) -> None:
    at = _app(redis_url)
    runs = _frame(at, "runs")
    seen = {r: filled.r.zscore("il:runs", r) for r in runs["run"]}
    assert list(runs["run"]) == sorted(seen, key=lambda r: -seen[r])  # newest first
    assert set(runs["run"]) == {"cartpole", "lm", HOSTILE, STEER_RUN}
    assert runs["run"].iloc[0] == STEER_RUN and runs["status"].iloc[0] == "● live"  # still streaming
    row = runs[runs["run"] == "cartpole"].iloc[0]
    assert row["steps"] >= 800 and row["drops"] == 0
    assert (
        f"{RAW} (4)" in row["taps (width)"]
        and f"{HIDDEN} (64)" in row["taps (width)"]
        and "latents:tc (3)" in row["taps (width)"]
    )
    assert all(len(x) >= 1 and all(v >= 0 for v in x) for x in runs["steps/s recent"])  # the sparklines: a sample a run so far
    assert ZONED.match(row["last seen"]), row["last seen"]
    assert "monitor" in set(_frame(at, "services")["kind"])
    alerts = _frame(at, "alerts")
    assert len(alerts) and all(ZONED.match(t) for t in alerts["time"])
    at.run()  # a refresh (AppTest does not fire run_every) renders again
    assert not at.exception


def test_run_page_names_the_run_and_shows_its_mind_episodes_and_alerts(filled: Store, redis_url: str) -> None:
    from monitor.panel.runs import thinking

    at = _app(redis_url, page="Run", run="cartpole")
    text = _texts(at)
    assert "Run cartpole" in text
    assert len([m for m in at.markdown if m.value in (":gray-badge[ended]", ":green-badge[live]")]) == 1
    assert "What the agent is thinking" in text
    strip = thinking(filled, "cartpole")
    assert strip, "the random transcoder has latents above 0 at the run's last step"
    recent, pos = filled.recent("cartpole", "latents:tc")
    last = recent[pos[:, 0] == pos[:, 0].max()].mean(axis=0)
    assert all(last[f["latent"]] > 0 for f in strip) and [f["z"] for f in strip] == sorted((f["z"] for f in strip), reverse=True)
    shown = [t.value for t in at.text]
    for f in strip:
        assert f"latent {f['latent']}" in shown
        e = filled.explanation("cartpole", "latents:tc", f["latent"])
        assert (e["label"] if e else "(not explained yet)") in shown
    eps = _chart_with(at, "step", "return", "end")
    assert len(eps) == len(filled.episodes("cartpole", count=500))
    # the episodes whose last step is among the recent metric rows carry how they ended
    recent_steps = set(filled.recent_metrics("cartpole")["cart_pos"][1][:, 0].tolist())
    failed_recently = eps[eps["step"].isin(recent_steps) & (eps["end"] != "survived")]
    assert len(failed_recently) and set(failed_recently["end"]) <= {"pole_left", "pole_right", "cart_out"}
    timeline = _chart_with(at, "step", "what", "state")
    assert set(timeline["state"]) >= {"firing"} and any("cart-far-out" in w for w in timeline["what"])


def test_cartpole_end_states_from_the_last_observation_match_the_classifier() -> None:
    """The panel names a terminated CartPole episode's end from the observation its last action
    was taken on (all the metrics hold); gymnasium's Euler step makes that exact."""
    import gymnasium as gym

    from monitor.experiments.failure_modes import classify
    from monitor.panel.runs import _cartpole_end

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    seen = set()
    for ep in range(60):
        obs, _ = env.reset(seed=ep)
        while True:
            before = obs
            obs, _, term, trunc, _ = env.step(int(rng.integers(2)) if ep % 3 else int(before[2] > 0))
            if term or trunc:
                break
        if term:
            named = dict(zip(("cart_pos", "cart_vel", "pole_angle", "angle_vel"), map(float, before), strict=True))
            assert _cartpole_end(named) == classify("CartPole-v1", obs, term, trunc, None, env), ep
            seen.add(_cartpole_end(named))
    assert {"pole_left", "pole_right"} <= seen


def test_a_hostile_run_name_renders_as_typed(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Run", run=HOSTILE)
    (head,) = [h.proto.body for h in at.get("html") if "<h4" in h.proto.body]
    assert re.sub("<[^>]+>", "", head) == html.escape(f"Run {HOSTILE}")  # HTML-escaped text, never markdown
    assert "Run " + HOSTILE in _texts(at)
    # where a name goes through markdown (the not-found message), nothing of it is parsed
    at = _app(redis_url, page="Latents", run=HOSTILE, tap="nope")
    (err,) = [e.value for e in at.error]
    assert unescape(err) == f"No tap nope in run {HOSTILE}." and not any(c in err for c in "*_[]()<>`")
    assert "\u2060" in err  # nor linked: a word joiner breaks the "http://" Streamlit would link
    assert HOSTILE in set(_frame(_app(redis_url), "runs")["run"])


# -- deep links ---------------------------------------------------------------------------------------
def test_a_link_to_a_missing_run_tap_or_latent_says_so_and_shows_nothing_else(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Run", run="nope")
    assert [e.value for e in at.error] == ["No run nope."] and at.selectbox(key="pick_run").value is None
    assert not at.dataframe and not _charts(at) and "Run cartpole" not in _texts(at)
    assert "cartpole" in _texts(at)  # the runs there are, as links

    at = _app(redis_url, page="Latents", run="cartpole", tap="nope", latent="0")
    assert [unescape(e.value) for e in at.error] == ["No tap nope in run cartpole."]
    assert not at.dataframe and not _charts(at) and RAW in _texts(at)

    for asked, unit in (("999", "channel"), ("-1", "channel"), ("x", "channel")):
        at = _app(redis_url, page="Latents", run="cartpole", tap=RAW, latent=asked)
        assert [unescape(e.value) for e in at.error] == [f"{RAW} has 4 channels (0 to 3): there is no {unit} {asked}."]
        assert not at.dataframe and not _charts(at)
    at = _app(redis_url, page="Latents", run="cartpole", tap="latents:tc", latent="3")
    assert [unescape(e.value) for e in at.error] == ["latents:tc has 3 latents (0 to 2): there is no latent 3."]

    # a good link opens what it names, and the sidebar follows it
    at = _app(redis_url, page="Latents", run="lm", tap="transformer.wte:out", latent="5")
    assert at.selectbox(key="pick_run").value == "lm" and at.number_input(key="pick_latent").value == 5
    assert "Channel 5 of transformer.wte:out" in _texts(at)


def test_choosing_another_run_in_the_sidebar_opens_its_own_taps(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Latents", run="cartpole", tap="latents:tc", latent="2")
    at.selectbox(key="pick_run").set_value(STEER_RUN).run()
    assert not at.exception and not at.error
    assert at.query_params["run"] == STEER_RUN and at.selectbox(key="pick_tap").value in filled.taps(STEER_RUN)


# -- latents and correlations ---------------------------------------------------------------------
def test_latents_page_shows_heatmap_metrics_card_explanation_and_the_steps_before(filled: Store, redis_url: str) -> None:
    e = filled.explanation("cartpole", "latents:tc", 0)
    assert e is not None and e.get("label")
    at = _app(redis_url, page="Latents", run="cartpole", tap="latents:tc", latent="0")
    text = _texts(at)
    assert "Run cartpole" in text and "Latent 0 of latents:tc" in text
    assert e["label"] in text and "detection score" in text
    heat = _chart_with(at, "step", "latent", "value")
    assert sorted(heat["latent"].unique()) == [0, 1, 2]
    traces = _chart_with(at, "step", "metric", "value")
    metric_specs = [c for c in _charts(at) if "facet" in c and c["facet"]["row"]["field"] == "metric"]
    assert len(metric_specs) == 2 and all(c["resolve"]["scale"]["y"] == "independent" for c in metric_specs)  # a chart per metric
    assert {"cart_pos", "pole_angle", "action", "reward"} <= set(traces["metric"])
    bars = _chart_with(at, "metric", "r", "label")
    corr = filled.analytics("cartpole", "latents:tc")
    assert len(bars) == len(corr["metrics"])  # every metric, null correlations included
    for _, b in bars.iterrows():
        assert b["label"] == ("null (constant in the window)" if np.isnan(b["r"]) else f"{b['r']:+.2f}")
    assert bars["r"].isna().any()  # the reward is 1 at every step
    assert "cart_pos" in _frame(at, "card_top").columns  # the top-steps table carries the metrics
    before = _chart_with(at, "offset", "metric", "value", "peak")
    assert before["offset"].min() >= -20 and before["offset"].max() == 0
    assert "Steering: this run's agent" in text and "allow_control=True" in text and not at.get("expander")


def test_a_raw_tap_speaks_of_channels_and_has_no_steer_box(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Latents", run="cartpole", tap=RAW, latent="0")
    text = _texts(at)
    assert f"Channel 0 of {RAW}" in text and "cart-far-out" in text  # the alert it raised
    assert "channel 0" in set(_frame(at, "alerts")["unit"])
    assert _chart_with(at, "step", "channel", "value") is not None
    assert not at.get("expander") and "Steer" not in text and "steering" not in text.lower()
    text = _texts(_app(redis_url, page="Latents", run="cartpole", tap=RAW, latent="1"))
    assert "Not explained yet" in text and "cart-far-out" not in text and "No alerts on this channel" in text


def test_alert_tables_carry_the_explanation_written_since(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Alerts")
    at.selectbox(key="alert_run").set_value("cartpole").run()
    at.multiselect(key="alert_rule").set_value(["latent-hot"]).run()
    feed = _frame(at, "alerts")
    assert len(feed) and set(feed["rule"]) == {"latent-hot"}
    filled_in = 0
    for _, row in feed.iterrows():
        j = int(row["unit"].split()[1])
        e = filled.explanation("cartpole", "latents:tc", j)
        assert row["explanation"] == (e["label"] if e else "")
        filled_in += bool(e)
    assert filled_in


def test_correlations_page_sorts_and_reads_at_every_width(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Correlations", run="cartpole", tap=RAW)
    df = _frame(at, "corr_table")
    assert (
        list(df.columns)
        == ["cart_pos", "cart_vel", "pole_angle", "angle_vel", "action", "reward", "terminated", "truncated"][: len(df.columns)]
    )
    assert df.index.name == "channel" and df.loc[2, "pole_angle"] > 0.99  # the input tap's channel 2 is the pole angle
    (heat,) = [c for c in _charts(at) if "layer" in c]
    assert heat["height"] == {"step": 22}  # four channels, each a readable row
    at.selectbox(key="sort_by").set_value("pole_angle").run()
    assert not at.exception and _frame(at, "corr_table").index[0] == 2
    wide = _app(redis_url, page="Correlations", run="cartpole", tap=HIDDEN)
    (heat,) = [c for c in _charts(wide) if "layer" in c]
    assert heat["height"] == {"step": 8} and len(_frame(wide, "corr_table")) == 64


# -- alerts, transcoders, language ---------------------------------------------------------------------
def test_alerts_page_filters_and_draws_the_timeline_by_state(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Alerts")
    assert "cart-far-out" in _texts(at) and "Alerts of every run" in _texts(at)
    at.multiselect(key="alert_sev").set_value(["info"]).run()
    feed = _frame(at, "alerts") if _has_frame(at, "alerts") else None
    assert feed is None or set(feed["severity"]) == {"info"}  # steering events are info
    at.multiselect(key="alert_sev").set_value(["critical"]).run()
    feed = _frame(at, "alerts")
    assert set(feed["rule"]) == {"cart-far-out"} and feed["open"].str.contains("page=Latents").all()
    (tl,) = [c for c in _charts(at) if c.get("mark", {}).get("type") == "tick"]
    assert tl["encoding"]["color"]["scale"]["domain"][:3] == ["pending", "firing", "resolved"]
    at.selectbox(key="alert_run").set_value("cartpole").run()
    assert "Alerts of run cartpole" in _texts(at)


def test_transcoders_page_lists_quality_and_plots(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Transcoders")
    df = _frame(at, "transcoders")
    assert sorted(df["name"]) == ["steer-tc", "tc"] and df.set_index("name").loc["tc", "FVU"] == pytest.approx(0.02)
    assert len(_charts(at)) == 1


def test_language_model_page_shows_tokens(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Language models", run="lm", tap="transformer.wte:out", latent="3")
    assert len(_charts(at)) == 2 and "step 11" in _texts(at)
    at = _app(redis_url, page="Language models", run="cartpole", tap=RAW)
    assert "streams no tokens" in _texts(at)


# -- steering from the panel ---------------------------------------------------------------------------
def test_steer_from_the_panel_and_watch_the_effect_on_returns(filled: Store, redis_url: str) -> None:
    from monitor.service.steering import steer_effects, steer_id

    sid = steer_id("steer-tc", 0)
    at = _app(redis_url, page="Latents", run=STEER_RUN, tap="latents:steer-tc", latent="0")
    assert [x.label for x in at.get("expander")] == ["Steer latent 0 of this run's agent"]
    at.number_input(key="steer_alpha").set_value(50.0).run()
    at.button(key="steer_apply").click().run()
    assert not at.exception and any("asked the agent to add along latent 0" in s.value for s in at.success)
    wait_until(lambda: filled.steering(STEER_RUN)["active"] == [sid], 30, what="the agent applying the steer")
    # latent 0 of steer-tc pushes every action one way: episodes end fast while it is on
    wait_until(lambda: (e := steer_effects(filled, STEER_RUN)) and e[-1]["during"]["episodes"] >= 2, 60, what="steered episodes")
    at.run()
    row = _frame(at, "steer_effects").iloc[-1]
    assert row["steer"] == sid and row["steps"].endswith("-now") and row["episodes on"] >= 2
    spans = _chart_with(at, "steer", "start", "end")
    assert list(spans["steer"]) == [sid]
    at.button(key="steer_clear").click().run()
    wait_until(lambda: filled.steering(STEER_RUN)["active"] == [], 30, what="the agent reverting the steer")
    wait_until(lambda: steer_effects(filled, STEER_RUN)[-1]["reverted_step"] is not None, 30, what="the revert recorded")
    at.run()
    row = _frame(at, "steer_effects").iloc[-1]
    ef = steer_effects(filled, STEER_RUN)[-1]
    assert row["steps"] == f"{ef['applied_step']}-{ef['reverted_step']}" and row["mean return on"] == ef["during"]["mean_return"]
    assert ef["during"]["mean_return"] < ef["before"]["mean_return"]  # the balancing policy, pushed one way, falls sooner


# -- empty and broken -------------------------------------------------------------------------------------
def _empty_db(url: str) -> str:
    return (
        url + ("&" if "?" in url else "?") + "db=3"
        if url.startswith("unix://")
        else url.rstrip("/").rsplit("/", 1)[0] + "/3"
        if url.count("/") > 2
        else url + "/3"
    )


@pytest.mark.parametrize("page", ["Overview", "Run", "Latents", "Correlations", "Alerts", "Transcoders", "Language models"])
def test_an_empty_redis_says_what_to_do(redis_url: str, page: str) -> None:
    url = _empty_db(redis_url)
    connect(url).flushdb()
    text = _texts(_app(url, page=page))
    assert "interlatent up" in text or "interlatent train" in text or "No alerts" in text


def test_bad_redis_is_one_clear_error(tmp_path: Path) -> None:
    at = _app(f"unix://{tmp_path}/none.sock")
    assert "cannot reach Redis" in _texts(at)


# -- a real browser ------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CPU_WINDOW_S = 20.0


@pytest.mark.timeout(300)
def test_panel_in_headless_chromium(filled: Store, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each page with data, the deep links and their not-found states, the hostile name as text,
    the steer box; the first load's time (cold, then warm) and the panel's CPU for one viewer of
    a live run are measured and reported, not asserted (tests assert no wall-clock times)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt-get where it can)")
    sync_api = pytest.importorskip("playwright.sync_api")
    psutil = pytest.importorskip("psutil")
    from monitor.store.embedded import free_port

    port = free_port()
    panel = spawn(
        ["-m", "monitor", "panel", "--redis", redis_url, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    shots = Path(os.environ.get("INTERLATENT_PANEL_SHOTS") or tmp_path)
    report: dict[str, float] = {}
    try:

        def up() -> bool:
            try:
                return urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200
            except OSError:
                return panel.poll() is not None

        wait_until(up, 60, what="the panel server")
        assert panel.poll() is None, panel.stdout.read().decode()[-2000:]
        proc = psutil.Process(panel.pid)  # `interlatent panel` execs Streamlit in its own process
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
            )

            def first_load(name: str) -> float:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                t0 = time.monotonic()
                page.goto(url, timeout=60_000)
                # the runs table draws on a canvas; its cells are also in an accessible (hidden) grid
                page.locator("td", has_text="cartpole").first.wait_for(state="attached", timeout=60_000)
                report[name] = round(time.monotonic() - t0, 2)
                page.close()
                return report[name]

            first_load("first_load_cold_s")
            first_load("first_load_warm_s")
            page = browser.new_page(viewport={"width": 1400, "height": 2400})

            def visit(name: str, params: dict[str, str], *expect: str) -> None:
                page.goto(f"{url}/?{urlencode(params)}", timeout=60_000)
                for text in expect:
                    page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                page.locator("[data-testid=stSkeleton]").first.wait_for(state="detached", timeout=60_000)
                assert not page.locator("[data-testid=stException]").count(), page.locator(
                    "[data-testid=stException]"
                ).all_inner_texts()
                page.screenshot(path=str(shots / f"{name}.png"))

            visit("overview", {"page": "Overview"}, "Runs, newest first", "Newest alerts")
            visit("run", {"page": "Run", "run": "cartpole"}, "Run cartpole", "What the agent is thinking", "Episode returns")
            page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(timeout=60_000)
            visit("latents", {"page": "Latents", "run": "cartpole", "tap": "latents:tc", "latent": "0"}, "Latent 0 of latents:tc")
            page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(timeout=60_000)
            visit("correlations", {"page": "Correlations", "run": "cartpole", "tap": RAW}, f"{RAW}: r of each channel")
            visit("alerts", {"page": "Alerts"}, "Alerts of every run")
            visit("transcoders", {"page": "Transcoders"}, "The multiscale comparison")
            visit("language", {"page": "Language models", "run": "lm", "tap": "transformer.wte:out"}, "across the last")
            visit("missing_run", {"page": "Run", "run": "nope"}, "No run nope.")
            visit("missing_tap", {"page": "Latents", "run": "cartpole", "tap": "nope"}, "No tap nope in run cartpole.")
            visit(
                "missing_latent", {"page": "Latents", "run": "cartpole", "tap": RAW, "latent": "999"}, "there is no channel 999"
            )
            visit("hostile", {"page": "Run", "run": HOSTILE}, f"Run {HOSTILE}")
            assert page.get_by_text(f"Run {HOSTILE}", exact=True).count() == 1  # typed, not rendered
            parsed = page.locator(
                "a[href*='e.vil']:not([href^='./']), h4 b, h4 strong, h4 em, h4 code"
            )  # no link, emphasis, code
            assert parsed.count() == 0, parsed.evaluate_all("els => els.map(e => e.outerHTML)")
            visit("hostile_missing_tap", {"page": "Latents", "run": HOSTILE, "tap": "nope"}, "No tap nope in run")
            assert (
                page.locator("a[href*='e.vil']:not([href^='./']), [data-testid=stAlert] b, [data-testid=stAlert] code").count()
                == 0
            )
            visit("steer", {"page": "Latents", "run": STEER_RUN, "tap": "latents:steer-tc", "latent": "0"}, "Steer latent 0")
            page.get_by_role("button", name="apply").wait_for(timeout=60_000)

            # one viewer on a live run's page: the panel's CPU while it refreshes
            visit("run_live", {"page": "Run", "run": STEER_RUN}, f"Run {STEER_RUN}", "What the agent is thinking")
            t0, c0 = time.monotonic(), proc.cpu_times()
            time.sleep(CPU_WINDOW_S)  # a measuring window, not a wait for a condition
            c1, t1 = proc.cpu_times(), time.monotonic()
            report["panel_cpu_one_viewer_pct"] = round(100 * ((c1.user - c0.user) + (c1.system - c0.system)) / (t1 - t0), 1)
            browser.close()
        for name in ("overview", "run", "latents", "steer"):
            assert (shots / f"{name}.png").stat().st_size > 10_000
        with capsys.disabled():
            print(f"\npanel measured: {json.dumps(report)} (screenshots in {shots})")
    finally:
        panel.terminate()
        try:
            panel.wait(timeout=20)
        except subprocess.TimeoutExpired:
            panel.kill()
