"""The live panel against a Redis filled by a real short monitor run: a CartPole PPO agent in a
subprocess streaming to a monitor subprocess (with a transcoder and alert rules), an explainer
worker, and a tiny GPT-2 streaming tokens. Every page renders in AppTest; one test opens the
served panel in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import agent_side
from monitor.store.records import Store, connect

try:
    from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until
except ImportError:
    from tests.conftest import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "monitor" / "panel" / "app.py")
RAW = "mlp_extractor.policy_net.0:in"
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


@pytest.fixture(scope="module")
def filled(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """A Redis as a short real session leaves it. Tests here read it and never flush it."""
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
    store.register_transcoder(
        artifact_info(
            "tc",
            path,
            tc,
            run="cartpole",
            source=RAW,
            target=RAW,
            q={"l0": 1.5, "fvu": 0.02, "dead_frac": 0.0, "return_recovered": 0.9},
        )
    )
    (tmp / "rules.yaml").write_text(RULES)
    endpoint = free_endpoint()
    mon = spawn_monitor(redis_url, endpoint, "--rules", str(tmp / "rules.yaml"))
    try:
        agent = spawn(
            [
                str(AGENT_DIR / "sb3_cartpole.py"),
                "--endpoint",
                endpoint,
                "--run",
                "cartpole",
                "--steps",
                "800",
                "--spike-at",
                "700",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = agent.communicate(timeout=180)
        assert agent.returncode == 0, out.decode()[-2000:]
        _lm_run(endpoint, store)
        wait_until(lambda: any(a["rule"] == "cart-far-out" for a in store.alerts("cartpole")), 30, what="the spike's alert")
        # the spike's alert files a job at once, the 500-example jobs for every latent come with an
        # analytics write (each second): explain what is filed until latent 0's is among it
        worker = Worker(store, consumer="panel-test")

        def explained() -> object:
            worker.run(burst=True)  # whatever has been filed so far
            return store.explanation("cartpole", "latents:tc", 0)

        wait_until(explained, 30, what="explain jobs filed by the monitor, latent 0's explained")
        yield store
    finally:
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


def _texts(at: AppTest) -> str:
    """Everything the page shows as text, tables included."""
    parts = [e.value for kind in ("title", "subheader", "markdown", "text", "caption", "info", "error") for e in at.get(kind)]
    parts += [m.label + " " + str(m.value) for m in at.metric]
    parts += [df.value.to_csv() for df in at.dataframe]
    return "\n".join(map(str, parts))


def _charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def test_overview_shows_the_run_its_taps_services_and_the_alert(filled: Store, redis_url: str) -> None:
    at = _app(redis_url)
    text = _texts(at)
    assert "cartpole" in text and RAW in text and "latents:tc" in text
    assert "monitor" in set(at.dataframe[1].value["kind"])
    runs = at.dataframe[0].value
    row = runs[runs["run"] == "cartpole"].iloc[0]
    assert row["steps"] >= 800 and row["drops"] == 0
    assert "cart-far-out" in text  # the newest alerts
    at.run()  # a refresh (AppTest does not fire run_every) renders again
    assert not at.exception


def test_latents_page_shows_heatmap_card_explanation_and_alerts(filled: Store, redis_url: str) -> None:
    e = filled.explanation("cartpole", "latents:tc", 0)
    assert e is not None and e.get("label")
    at = _app(redis_url, page="Latents", run="cartpole", tap="latents:tc", latent="0")
    text = _texts(at)
    assert e["label"] in text and "detection score" in text
    assert _charts(at) >= 2  # the heatmap over metric traces, and the correlation bars
    assert "cart_pos" in text  # the top-steps table carries the metrics
    at = _app(redis_url, page="Latents", run="cartpole", tap=RAW, latent="0")
    text = _texts(at)
    assert "cart-far-out" in text, text  # the alert it raised (which also filed an explain job)
    text = _texts(_app(redis_url, page="Latents", run="cartpole", tap=RAW, latent="1"))
    assert "Not explained yet" in text and "cart-far-out" not in text and "No alerts" in text


def test_correlations_page_sorts_and_shows_the_matrix(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Correlations", run="cartpole", tap=RAW)
    df = at.dataframe[0].value
    assert (
        list(df.columns)
        == ["cart_pos", "cart_vel", "pole_angle", "angle_vel", "action", "reward", "terminated", "truncated"][: len(df.columns)]
    )
    assert df.loc[2, "pole_angle"] > 0.99  # the input tap's channel 2 is the pole angle
    at.selectbox(key="sort_by").set_value("pole_angle").run()
    assert not at.exception
    assert at.dataframe[0].value.index[0] == 2
    assert _charts(at) == 1


def test_alerts_page_filters(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Alerts")
    assert "cart-far-out" in _texts(at)
    at.multiselect(key="alert_sev").set_value(["info"]).run()
    assert "cart-far-out" not in _texts(at) and "No alerts" in _texts(at)
    at.multiselect(key="alert_sev").set_value(["critical"]).run()
    feed = at.dataframe[0].value
    assert set(feed["rule"]) == {"cart-far-out"} and feed["open"].str.contains("page=Latents").all()


def test_transcoders_page_lists_quality_and_plots(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Transcoders")
    df = at.dataframe[0].value
    assert list(df["name"]) == ["tc"] and df["FVU"][0] == pytest.approx(0.02)
    assert _charts(at) == 1


def test_language_model_page_shows_tokens(filled: Store, redis_url: str) -> None:
    at = _app(redis_url, page="Language models", run="lm", tap="transformer.wte:out", latent="3")
    assert _charts(at) == 2 and "step 11" in _texts(at)
    at = _app(redis_url, page="Language models", run="cartpole", tap=RAW)
    assert "streams no tokens" in _texts(at)


def _empty_db(url: str) -> str:
    return (
        url + ("&" if "?" in url else "?") + "db=3"
        if url.startswith("unix://")
        else url.rstrip("/").rsplit("/", 1)[0] + "/3"
        if url.count("/") > 2
        else url + "/3"
    )


@pytest.mark.parametrize("page", ["Overview", "Latents", "Correlations", "Alerts", "Transcoders", "Language models"])
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


@pytest.mark.timeout(240)
def test_panel_in_headless_chromium(filled: Store, redis_url: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt-get where it can)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from monitor.store.embedded import free_port

    port = free_port()
    panel = spawn(
        ["-m", "monitor", "panel", "--redis", redis_url, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200
            except OSError:
                return panel.poll() is not None

        wait_until(up, 60, what="the panel server")
        assert panel.poll() is None, panel.stdout.read().decode()[-2000:]
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=60_000)
            page.get_by_text("Interlatent · Overview").wait_for(timeout=60_000)
            # the runs table draws on a canvas; its cells are also in an accessible (hidden) grid
            page.locator("td", has_text="cartpole").first.wait_for(state="attached", timeout=60_000)
            page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            page.goto(f"{url}/?page=Latents&run=cartpole&tap=latents%3Atc&latent=0", timeout=60_000)
            page.locator(".vega-embed canvas, .vega-embed svg").first.wait_for(timeout=60_000)  # the chart drawn
            page.screenshot(path=str(tmp_path / "latents.png"), full_page=True)
            browser.close()
        for name in ("overview.png", "latents.png"):
            assert (tmp_path / name).stat().st_size > 10_000
    finally:
        panel.terminate()
        try:
            panel.wait(timeout=20)
        except subprocess.TimeoutExpired:
            panel.kill()
