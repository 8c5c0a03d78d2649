"""Redis Cluster behind the same Store API: every run's keys share one slot, and everything the
monitor, explainer and CLI write goes through without a cross-slot error, on a real 3-master
cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redis.crc import key_slot

from agent_side.wire import encode_act, encode_ep, encode_met
from monitor.service.ingest import Monitor
from monitor.service.persist import load_run
from monitor.service.steering import set_interventions
from monitor.store import keys
from monitor.store.jobs import best_explanation, file_job, store_explanation
from monitor.store.records import ConfigError, Store, connect, is_cluster
from monitor.tools.cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)

NASTY = ["cartpole-1", "a{b}c", "}x", "{}", "{", "x%7Bq", "x{q", "%", "runs:with:colons", "ünïcode"]


def _per_run(run: str, taps: list[str]) -> list[str]:
    return keys.run_keys(run, taps) + [keys.lease(run)]


def test_every_key_of_a_run_is_in_one_slot_and_no_two_runs_share_a_key() -> None:
    taps = ["h:out", "latents:sae{1}", "blocks.0.hook_resid_post"]
    seen: dict[str, str] = {}
    for run in NASTY + [""]:
        names = _per_run(run, taps)
        assert len({key_slot(k.encode()) for k in names}) == 1, run
        for k in names:
            assert seen.setdefault(k, run) == run, (k, run, seen[k])
    assert key_slot(keys.TRANSCODERS.encode()) == key_slot(keys.TRANSCODERS_VERSION.encode())


def test_the_cluster_url_is_checked_seed_by_seed() -> None:
    for bad, item in [
        ("redis+cluster://h1:7000,h2", "h2"),
        ("redis+cluster://h1:99999", "h1:99999"),
        ("redis+cluster://:7000", ":7000"),
    ]:
        with pytest.raises(ConfigError, match=f"seed node '{item}' is not host:port"):
            connect(bad)
    with pytest.raises(ConfigError, match="cannot reach Redis"):
        connect("redis+cluster://127.0.0.1:1")


def _frames(run: str, seq0: int) -> list[list]:
    rng = np.random.default_rng(len(run))
    pos = np.array([[s, 0] for s in range(seq0 * 10, seq0 * 10 + 10)], np.int64)
    return [
        encode_act(run, "p", seq0, 0, "h:out", rng.standard_normal((10, 6)).astype(np.float32), pos),
        encode_met(run, "p", seq0 + 1, 0, ["reward", "angle"], rng.standard_normal((10, 2)), pos),
        encode_ep(run, "p", seq0 + 2, 0, [[seq0 * 10 + 9, 0, 12.5, 10, 1, 0]]),
    ]


def test_a_monitor_on_a_cluster_writes_restores_and_deletes_runs(redis_cluster: LocalCluster) -> None:
    store = Store(connect(redis_cluster.url))
    assert is_cluster(store.r)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, analytics_every_s=0.0)
    try:
        for seq0 in (0, 3):
            for run in NASTY:
                for parts in _frames(run, seq0):
                    assert mon.handle(parts), (run, mon.rejected)
            mon.flush(final=True)
        assert mon.write_failures == 0 and not mon.rejected
        status = {r["run"]: r for r in store.status()["runs"]}
        assert sorted(status) == sorted(NASTY)
        for run in NASTY:
            got = status[run]
            assert (got["frames"], got["gaps"], got["episodes"], got["steps"]) == (6, 0, 2, 40), run
            assert got["taps"]["h:out"]["rows"] == 20 and got["metrics"] == ["reward", "angle"]
            assert store.analytics(run, "h:out") is not None and len(store.episodes(run)) == 2
        # the panel's readers, over every run at once
        from monitor.panel import data, runs

        assert {r["run"] for r in runs.run_rows(store)} == set(NASTY)
        assert len(data.overview(store)["runs"]) == len(NASTY)
        assert data.heatmap(store, "}x", "h:out") is not None and data.corr_matrix(store, "}x", "h:out") is not None
        assert runs.episodes_table(store, "{}") is not None and runs.explanations_for(store, "{}", [("h:out", 0)]) == {}
        # what a restarted monitor reads back is what was written
        st = load_run(store, "a{b}c", recent_rows=64)
        assert st is not None and st.frames == 6 and st.taps["h:out"].rows == 20
    finally:
        mon.close()
    # the explainer's and the CLI's writes: each a transaction within one slot, or a single key
    store.register_transcoder({"name": "t", "run": "a{b}c", "source": "h:out", "target": "h:out", "path": "/x", "d_sae": 4})
    assert store.transcoders_version() == 1 and store.transcoders()[0]["name"] == "t"
    assert file_job(store.r, "a{b}c", "h:out", 2, reason="test") and not file_job(store.r, "a{b}c", "h:out", 2, reason="test")
    store_explanation(store.r, {"run": "a{b}c", "tap": "h:out", "latent": 2, "label": "L", "text": "t", "backend": "test"})
    assert best_explanation(store.r, "a{b}c", "h:out", 2)["label"] == "L"
    assert store.r.scard(keys.explain_pending("a{b}c")) == 0
    assert set_interventions(store.r, "}x", [{"id": "s1", "op": "add"}]) == 1
    assert store.steering("}x")["version"] == 1 and int(store.r.get(keys.STEER_VERSION)) == 1
    assert store.delete_run("a{b}c") > 5
    assert "a{b}c" not in store.runs() and load_run(store, "a{b}c", recent_rows=64) is None
    assert {h["kind"] for h in store.health()} == set()  # the monitor's heartbeat went with close(), on whichever shard
    store.r.close()


def test_the_cluster_compose_file_runs_three_monitors_on_the_cluster() -> None:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "compose.cluster.yaml").read_text())
    services = spec["services"]
    monitors = [s for name, s in services.items() if name.startswith("monitor-")]
    endpoints = [s["command"].split("--endpoint ")[1].split('"')[0].strip() for s in monitors]
    assert len(monitors) == 3 and len(set(endpoints)) == 3
    for name in ("monitor-1", "explainer", "panel"):
        url = services[name]["environment"]["INTERLATENT_REDIS_URL"]
        assert url.startswith("redis+cluster://")
        hosts = url.split("://", 1)[1].split(",")
        assert [h.rsplit(":", 1)[1] for h in hosts] == ["7000"] * 3 and {h.split(":")[0] for h in hosts} <= set(services)


def test_the_explainer_works_its_jobs_on_a_cluster(redis_cluster: LocalCluster) -> None:
    from explainer import Worker, explanations

    store = Store(connect(redis_cluster.url))
    rng = np.random.default_rng(0)
    m = rng.normal(0, [1.0, 0.1], (1500, 2))
    x = np.stack([np.maximum(0, 10 * m[:, 1]), rng.random(1500)], axis=1).astype(np.float32)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        for i, s in enumerate(range(0, 1500, 100)):
            pos = np.stack([np.arange(s, s + 100), np.zeros(100, dtype=np.int64)], axis=1)
            assert mon.handle(encode_act("c{p}", "p", 2 * i, 0, "h:out", x[s : s + 100], pos))
            assert mon.handle(encode_met("c{p}", "p", 2 * i + 1, 0, ["noise", "angle"], m[s : s + 100], pos))
        mon.flush(final=True)
    finally:
        mon.close()
    assert file_job(store.r, "c{p}", "h:out", 0, reason="test")
    w = Worker(store, consumer="w1")  # the claim renewal is a Lua script on the jobs stream's slot
    assert w.run(burst=True) == 1
    (e,) = explanations(store.r, "c{p}")
    assert e["label"] == "high angle" and store.r.scard(keys.explain_pending("c{p}")) == 0
    store.r.close()


def test_a_plain_url_to_a_cluster_node_and_passwords_in_errors(redis_cluster: LocalCluster) -> None:
    port = redis_cluster.nodes[0].port
    with pytest.raises(ConfigError, match=r"is a node of a Redis Cluster: use redis\+cluster://"):
        connect(f"redis://127.0.0.1:{port}/0")
    for url in ("redis+cluster://u:s3cret@127.0.0.1:1", "redis://u:s3cret@127.0.0.1:1/0"):
        with pytest.raises(ConfigError) as e:
            connect(url)
        assert "s3cret" not in str(e.value) and "u:***@" in str(e.value)
    for url in (f"redis+cluster://127.0.0.1:{port}/3", f"redis+cluster://127.0.0.1:{port}?db=1"):
        with pytest.raises(ConfigError, match="a cluster has one database"):
            connect(url)
    connect(f"redis+cluster://127.0.0.1:{port}/0").close()  # database 0, the only one, may be named
