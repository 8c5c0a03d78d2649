"""The explainer worker against a real Redis: jobs in, scored explanations out, acked."""

from __future__ import annotations

import numpy as np
from helpers import wait_until

from agent_side.wire import encode_act, encode_met
from explainer import Worker, WorkerSettings, explanations, file_job
from explainer.worker import _clean
from monitor.service.ingest import Monitor
from monitor.store import keys
from monitor.store.records import Store

NAMES = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]


def _stream_planted(store: Store, n: int = 1500) -> None:
    """Channel 0 tracks pole_angle; channels 1 and 2 are noise."""
    rng = np.random.default_rng(0)
    m = rng.normal(0, [1.0, 1.0, 0.1, 0.5], (n, 4))
    x = np.stack([np.maximum(0, 10 * m[:, 2] + 0.2 * rng.standard_normal(n)), rng.random(n), rng.random(n)], axis=1).astype(
        np.float32
    )
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        seq = 0
        for s in range(0, n, 100):
            pos = np.stack([np.arange(s, s + 100), np.zeros(100, dtype=np.int64)], axis=1)
            mon.handle(encode_act("cp", "p", seq, 0, "h:out", x[s : s + 100], pos))
            mon.handle(encode_met("cp", "p", seq + 1, 0, NAMES, m[s : s + 100], pos))
            seq += 2
        mon.flush(final=True)
    finally:
        mon.close()


def test_rules_explanation_names_the_planted_metric_and_beats_shuffled(store: Store) -> None:
    _stream_planted(store)
    assert file_job(store.r, "cp", "h:out", 0, reason="test")
    assert file_job(store.r, "cp", "h:out", 1, reason="test")
    w = Worker(store, consumer="w1")
    assert w.run(burst=True) == 2
    (e0, e1) = explanations(store.r, "cp")
    assert e0["label"] == "high pole_angle" and "pole_angle" in e0["text"]
    assert [c["metric"] for c in e0["conditions"]] == ["pole_angle"]  # one term: a second would not help
    s = e0["score"]
    assert s["judge"] == "rules" and s["n"] > 150 and s["held_out"] == "stretches"  # no episode ends streamed
    for method, key in (("detection", "balanced_accuracy"), ("fuzzing", "balanced_accuracy"), ("simulation", "correlation")):
        got = s["methods"][method]
        lo, hi = got[key]["ci"]
        assert lo <= got[key]["value"] <= hi and got["n"] >= 40
        assert lo > got["baselines"]["shuffled"][key]["ci"][1]  # above chance, interval and all
        assert got["baselines"]["strongest_metric"]["metric"] == "pole_angle"  # the bar: it is the explanation itself
    assert s["balanced_accuracy"] > 0.9 and s["simulation"] > 0.8 and abs(s["simulation_shuffled"]) < 0.1
    assert e0["backend"] == "rules" and len(e0["prompt_hash"]) == 16 and e0["examples"]
    assert e1["conditions"] == [] and e1["score"]["methods"] == {} and e1["score"]["balanced_accuracy"] is None  # noise: no claim
    assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0
    assert store.r.scard(keys.explain_pending("cp")) == 0


def test_duplicates_collapse_until_explained(store: Store) -> None:
    _stream_planted(store, n=400)
    assert file_job(store.r, "cp", "h:out", 0, reason="alert")
    assert not file_job(store.r, "cp", "h:out", 0, reason="alert again")
    assert store.r.xlen(keys.EXPLAIN_JOBS) == 1
    Worker(store, consumer="w").run(burst=True)
    assert file_job(store.r, "cp", "h:out", 0, reason="drift")  # explained: it may be filed again


def test_a_job_held_by_a_dead_worker_is_reclaimed(store: Store) -> None:
    _stream_planted(store, n=400)
    w = Worker(store, settings=WorkerSettings(reclaim_s=0.2), consumer="alive")
    file_job(store.r, "cp", "h:out", 0, reason="test")
    # another worker read the job and died before acking it
    got = store.r.xreadgroup(keys.EXPLAIN_GROUP, "dead", {keys.EXPLAIN_JOBS: ">"}, count=1)
    assert got and store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 1
    assert w.run(burst=True) == 0  # its claim is not stale yet: nothing to do
    wait_until(
        lambda: store.r.xpending_range(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, "-", "+", 1)[0]["time_since_delivered"] > 200,
        what="the dead worker's claim to go stale",
    )
    assert w.run(burst=True) == 1
    assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0
    assert explanations(store.r, "cp")[0]["label"]


def test_a_job_its_workers_keep_dying_on_is_given_up(store: Store) -> None:
    _stream_planted(store, n=400)
    w = Worker(store, settings=WorkerSettings(reclaim_s=0.05, max_deliveries=3), consumer="alive")
    file_job(store.r, "cp", "h:out", 0, reason="test")
    ((job_id, _),) = store.r.xreadgroup(keys.EXPLAIN_GROUP, "dead-1", {keys.EXPLAIN_JOBS: ">"}, count=1)[0][1]
    for k in (2, 3):  # taken over twice more, each time by a worker that died on it
        store.r.xclaim(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, f"dead-{k}", 0, [job_id])
    wait_until(
        lambda: store.r.xpending_range(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, "-", "+", 1)[0]["time_since_delivered"] > 50,
        what="the last claim to go stale",
    )
    assert w.run(burst=True) == 0 and w.failed == 1
    (e,) = explanations(store.r, "cp")
    assert "given up after 4 deliveries" in e["error"] and e["worker"] == "alive"
    assert (
        store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0 and store.r.scard(keys.explain_pending("cp")) == 0
    )


def test_a_job_that_cannot_be_explained_is_recorded_and_acked(store: Store) -> None:
    file_job(store.r, "nothing", "t", 0, reason="test")
    w = Worker(store, consumer="w")
    assert w.run(burst=True) == 0 and w.failed == 1
    (e,) = explanations(store.r, "nothing")
    assert "no analytics" in e["error"] and e["score"] is None
    assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0


def test_untrusted_text_is_cleaned() -> None:
    assert _clean("ok\x1b[31mred\x00<b>\nnext") == "ok[31mred<b> next"
    assert len(_clean("x" * 5000)) == 600


def test_explain_commands(redis_url: str, store: Store) -> None:
    import json
    import subprocess
    import sys

    from helpers import ROOT

    _stream_planted(store, n=600)

    def cli(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "monitor", *a, "--redis", redis_url],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=120,
        )

    assert "filed an explain job" in cli("explain", "--run", "cp", "--latent", "h:out/0").stdout
    bad = cli("explain", "--run", "cp", "--latent", "h:out")
    assert bad.returncode == 2 and "TAP/INDEX" in bad.stderr
    past = cli("explain", "--run", "cp", "--latent", "h:out/3")  # the tap has 3 channels
    assert past.returncode == 2 and past.stderr.strip().splitlines() == [
        "interlatent: h:out of run 'cp' has 3 channels (0 to 2); there is no #3"
    ]
    for spec, why in (("nonsense", "unknown backend 'nonsense'"), ("hf:/no/such/model", "is not a local model directory")):
        got = cli("explainer", "--burst", "--backend", spec)
        assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1 and why in got.stderr, got.stderr
    assert "explained 1 latents" in cli("explainer", "--burst").stdout
    out = json.loads(cli("explanations", "--run", "cp", "--json").stdout)
    assert out["explanations"][0]["latent"] == 0 and "pole_angle" in out["explanations"][0]["label"]


def test_worker_settings_come_from_flags_then_the_environment() -> None:
    import pytest

    from monitor.cli.main import build_parser
    from monitor.store.records import ConfigError

    env = {"INTERLATENT_EXPLAINER_RECLAIM_S": "12.5", "INTERLATENT_LLM_RETRIES": "5", "INTERLATENT_EXPLAINER_SCORER": "rules"}
    args = build_parser().parse_args(["explainer", "--backend", "openai:http://x/v1", "--reclaim-s", "7", "--llm-timeout-s", "3"])
    got = WorkerSettings.from_args(args, env)
    assert (got.backend, got.reclaim_s, got.llm_timeout_s, got.llm_retries, got.scorer) == (
        "openai:http://x/v1",
        7.0,
        3.0,
        5,
        "rules",
    )
    assert WorkerSettings.from_args(build_parser().parse_args(["explainer"]), {}) == WorkerSettings()  # rules, 30 s, 30 s, 2
    with pytest.raises(ConfigError, match="INTERLATENT_EXPLAINER_RECLAIM_S='soon' is not a float"):
        WorkerSettings.from_env({"INTERLATENT_EXPLAINER_RECLAIM_S": "soon"})
    with pytest.raises(ConfigError, match="positive"):
        WorkerSettings(reclaim_s=0)


def test_the_monitor_files_jobs_and_alerts_carry_explanations(tmp_path, store: Store) -> None:
    import torch

    from monitor.alerts.rules import parse_rules
    from monitor.transcoders.artifacts import save_artifact
    from monitor.transcoders.model import Transcoder
    from monitor.transcoders.training import artifact_info

    torch.manual_seed(0)
    tc = Transcoder(4, 3, 4).eval()
    path = save_artifact(tmp_path / "tc", tc, source="h:in", target="h:in", run="cp")
    store.register_transcoder(artifact_info("tc", path, tc, run="cp", source="h:in", target="h:in", q=None))
    rules = parse_rules({"rules": [{"name": "hot", "kind": "threshold", "tap": "latents:*", "channels": [0], "above": 1e9}]})
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", rules=rules)
    rng = np.random.default_rng(0)
    try:
        mon.flush()
        m = rng.standard_normal((600, 4))
        for s in range(0, 600, 100):
            pos = np.stack([np.arange(s, s + 100), np.zeros(100, dtype=np.int64)], axis=1)
            mon.handle(encode_act("cp", "p", s // 50, 0, "h:in", m[s : s + 100].astype(np.float32), pos))
            mon.handle(encode_met("cp", "p", s // 50 + 1, 0, NAMES, m[s : s + 100], pos))
        mon.flush(final=True)
        jobs = store.r.xrange(keys.EXPLAIN_JOBS)
        assert sorted((f[b"tap"], int(f[b"latent"]), f[b"reason"]) for _, f in jobs) == [
            (b"latents:tc", c, b"enough examples") for c in range(3)
        ]
        assert store.r.xlen(keys.EXPLAIN_JOBS) == 3  # the raw tap h:in is only explained when asked
        Worker(store, consumer="w").run(burst=True)
        label = store.explanation("cp", "latents:tc", 0)["label"]
        # an alert on that latent now carries its explanation
        mon.alerts = type(mon.alerts)(
            parse_rules({"rules": [{"name": "hot", "kind": "threshold", "tap": "latents:*", "channels": [0], "above": -1e9}]})
        )
        pos = np.array([[600, 0]])
        mon.handle(encode_act("cp", "p", 100, 0, "h:in", m[:1].astype(np.float32), pos))
        (alert,) = [a for a in store.alerts("cp") if a["state"] == "firing"]
        assert alert["explanation"]["label"] == label and "explained as" in alert["text"]
    finally:
        mon.close()


def test_drift_files_again_only_the_latents_that_moved(store: Store) -> None:
    from monitor.service.filing import JobFiler

    f = JobFiler(store.r, min_examples=10, drift=0.3)
    corr = np.array([[0.9, 0.0], [0.1, 0.2]])
    assert f.on_analytics("r", "latents:x", 5, corr) == 0  # too few examples yet
    assert f.on_analytics("r", "mlp.0:out", 100, corr) == 0  # raw taps are explained when asked
    assert f.on_analytics("r", "latents:x", 20, corr) == 2
    store.r.delete(keys.explain_pending("r"))  # both explained
    assert f.on_analytics("r", "latents:x", 40, corr + 0.1) == 0  # small moves: nothing new
    moved = corr.copy()
    moved[1, 0] = -0.5
    assert f.on_analytics("r", "latents:x", 60, moved) == 1  # latent 1 flipped its link to metric 0
    assert [int(fields[b"latent"]) for _, fields in store.r.xrange(keys.EXPLAIN_JOBS)][-1] == 1


def test_an_alert_before_the_taps_analytics_exist_is_explained_once_they_do(store: Store) -> None:
    """A job filed at a run's first moments would fail ("no analytics yet") and never be retried:
    it waits for the tap's analytics to be written, then is filed once."""
    from monitor.service.filing import JobFiler

    f = JobFiler(store.r, min_examples=10)
    assert f.on_alert("r", "h:out", 3) is False and store.r.xlen(keys.EXPLAIN_JOBS) == 0
    assert f.on_alert("r", "h:out", 3) is False  # one alert, one job
    f.on_analytics("r", "h:out", 7, np.zeros((4, 1)))
    jobs = [(f[b"tap"].decode(), int(f[b"latent"])) for _, f in store.r.xrange(keys.EXPLAIN_JOBS)]
    assert jobs == [("h:out", 3)]
    assert f.on_alert("r", "h:out", 1) is True  # once analytics exist, at once
