"""The monitor encodes a source tap with registered transcoders; latents are channels like any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from helpers import wait_until
from safetensors.torch import load_file, save_file

from agent_side.wire import encode_act, encode_met
from monitor.service.encoding import LATENT_PREFIX
from monitor.service.ingest import Monitor
from monitor.store.records import Store
from monitor.store.tapstats import tap_stats
from monitor.transcoders.artifacts import save_artifact
from monitor.transcoders.model import Transcoder
from monitor.transcoders.training import artifact_info


def _pos(steps: range) -> np.ndarray:
    return np.array([[s, 0] for s in steps], dtype=np.int64)


def _register(store: Store, tmp: Path, name: str, d_sae: int, seed: int) -> Transcoder:
    torch.manual_seed(seed)
    m = Transcoder(6, d_sae, 6).eval()
    path = save_artifact(tmp / name, m, source="h:out", target="h:out", run="r")
    store.register_transcoder(artifact_info(name, path, m, run="r", source="h:out", target="h:out", q=None))
    return m


def test_latents_stream_as_channels_and_a_new_transcoder_takes_over(tmp_path: Path, store: Store) -> None:
    small = _register(store, tmp_path, "sae4", 4, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        mon.flush()  # loads the registered transcoders
        seq = 0
        for start in range(0, 200, 50):
            steps = range(start, start + 50)
            assert mon.handle(encode_act("r", "p", seq, 0, "h:out", x[start : start + 50], _pos(steps)))
            assert mon.handle(encode_met("r", "p", seq + 1, 0, ["m"], x[start : start + 50, :1].astype(np.float64), _pos(steps)))
            seq += 2
        big = _register(store, tmp_path, "sae8", 8, seed=1)  # registered while the run streams
        mon.flush(final=True)
        for start in range(200, 400, 50):
            steps = range(start, start + 50)
            assert mon.handle(encode_act("r", "p", seq, 0, "h:out", x[start : start + 50], _pos(steps)))
            seq += 1
        mon.flush(final=True)
        assert mon.rejected == {}
        (run,) = store.status()["runs"]
        assert run["taps"][LATENT_PREFIX + "sae4"]["rows"] == 400 and run["taps"][LATENT_PREFIX + "sae4"]["width"] == 4
        assert run["taps"][LATENT_PREFIX + "sae8"]["rows"] == 200  # from the frame after it was registered
        rows, pos = store.recent("r", LATENT_PREFIX + "sae4")
        with torch.no_grad():
            batch = small.encode(torch.from_numpy(x[pos[:, 0]])).numpy()
        np.testing.assert_allclose(rows, batch, rtol=1e-6, atol=1e-6)  # streaming encode = batch encode
        rows8, pos8 = store.recent("r", LATENT_PREFIX + "sae8")
        with torch.no_grad():
            np.testing.assert_allclose(rows8, big.encode(torch.from_numpy(x[pos8[:, 0]])).numpy(), rtol=1e-6, atol=1e-6)
        d = tap_stats(store, "r", LATENT_PREFIX + "sae4")
        assert d["width"] == 4 and d["metrics"] == ["m"] and d["paired"] == 200
        assert all(c["count"] == 400 for c in d["channels"])
    finally:
        mon.close()


def test_a_broken_artifact_is_skipped_not_fatal(tmp_path: Path, store: Store) -> None:
    m = Transcoder(6, 4, 6)
    store.register_transcoder(artifact_info("gone", tmp_path / "nowhere", m, run="r", source="h:out", target="h:out", q=None))
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        mon.flush()
        assert mon.handle(encode_act("r", "p", 0, 0, "h:out", np.ones((3, 6), np.float32), _pos(range(3))))
        mon.flush(final=True)
        assert list(store.status()["runs"][0]["taps"]) == ["h:out"]
    finally:
        mon.close()


def test_deactivate_stops_the_encoding_and_activate_resumes_it(tmp_path: Path, store: Store, redis_url: str) -> None:
    import subprocess
    import sys

    from helpers import ROOT

    _register(store, tmp_path, "sae4", 4, seed=0)
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    latents = LATENT_PREFIX + "sae4"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "monitor", "transcoders", *args, "--redis", redis_url],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
        )

    def latent_rows() -> int:
        return store.status()["runs"][0]["taps"].get(latents, {}).get("rows", 0)

    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        for seq, start in enumerate(range(0, 300, 100)):
            if seq == 1:
                r = cli("--deactivate", "sae4")
                assert r.returncode == 0 and "deactivated" in r.stdout
            if seq == 2:
                assert cli("--activate", "sae4").returncode == 0
            mon.flush(final=True)  # the monitor sees the registry change between frames
            assert mon.handle(encode_act("r", "p", seq, 0, "h:out", x[start : start + 100], _pos(range(start, start + 100))))
            mon.flush(final=True)
            assert latent_rows() == (100 if seq < 2 else 200)  # nothing encoded while deactivated
    finally:
        mon.close()
    assert [t["active"] for t in store.transcoders()] == [True]
    r = cli("--deactivate", "nope")
    assert r.returncode == 2 and "no transcoder 'nope'" in r.stderr and "sae4" in r.stderr


def test_no_registry_entry_or_artifact_stops_the_monitor(tmp_path: Path, store: Store) -> None:
    """A registry entry that is not JSON, one missing its fields, an artifact whose weights broke
    after registration and a transcoder whose source width is not the tap's: the monitor keeps
    serving, the good transcoder encodes, and each other one is in the health key with its reason."""
    from monitor.store import keys

    good = _register(store, tmp_path, "good", 4, seed=1)
    wide = Transcoder(9, 3, 9).eval()
    path = save_artifact(tmp_path / "wide", wide, source="h:out", target="h:out", run="r")
    store.register_transcoder(artifact_info("wide", path, wide, run="r", source="h:out", target="h:out", q=None))
    rotten = Transcoder(6, 2, 6).eval()
    path = save_artifact(tmp_path / "rotten", rotten, source="h:out", target="h:out", run="r")
    store.register_transcoder(artifact_info("rotten", path, rotten, run="r", source="h:out", target="h:out", q=None))
    (path / "cfg.json").write_text("{oops")  # broken after registration
    store.r.hset(keys.TRANSCODERS, "garbage", b"\xff not json")
    store.r.hset(keys.TRANSCODERS, "partial", json.dumps({"name": "partial", "run": "r"}))
    listed = {t["name"]: t for t in store.transcoders(include_broken=True)}
    assert "not a JSON object" in listed["garbage"]["broken"] and "field source" in listed["partial"]["broken"]
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        mon.flush()
        x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
        assert mon.handle(encode_act("r", "p", 0, 0, "h:out", x, _pos(range(3))))
        mon.flush(final=True)
        assert set(store.taps("r")) == {"h:out", LATENT_PREFIX + "good"}
        with torch.no_grad():
            np.testing.assert_allclose(
                store.recent("r", LATENT_PREFIX + "good")[0], good.encode(torch.from_numpy(x)).numpy(), atol=1e-6
            )
        broken = mon.health()["transcoders_broken"]
        assert set(broken) == {"wide", "rotten"}
        assert "reads 9 channels" in broken["wide"] and "1 frames not encoded" in broken["wide"] and "JSON" in broken["rotten"]
    finally:
        mon.close()


def test_a_fixed_artifact_is_taken_up_and_a_restarted_monitor_serves_past_broken_ones(tmp_path: Path, store: Store) -> None:
    """Each field broken in turn while a monitor runs: the monitor serves on, `transcoders` shows
    why; fixing the files on disk is enough for it to encode; a monitor started later is not stopped."""
    import shutil

    from monitor.transcoders.artifacts import WEIGHTS

    torch.manual_seed(2)
    model = Transcoder(6, 3, 6).eval()
    good = save_artifact(tmp_path / "pristine", model, source="h:out", target="h:out", run="r")
    path = tmp_path / "live"
    shutil.copytree(good, path)
    store.register_transcoder(artifact_info("live", path, model, run="r", source="h:out", target="h:out", q=None))
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    seq = iter(range(10_000))
    breakages = {
        "cfg.json": lambda: (path / "cfg.json").write_text("{oops"),
        "d_sae": lambda: (path / "cfg.json").write_text(json.dumps({**json.loads((good / "cfg.json").read_text()), "d_sae": 7})),
        "W_dec": lambda: save_file({**load_file(str(good / WEIGHTS)), "W_dec": torch.zeros(1, 6)}, str(path / WEIGHTS)),
        "b_enc": lambda: save_file(
            {k: v for k, v in load_file(str(good / WEIGHTS)).items() if k != "b_enc"}, str(path / WEIGHTS)
        ),
        "NaN": lambda: save_file(
            {**load_file(str(good / WEIGHTS)), "b_dec": torch.full((6,), float("nan"))}, str(path / WEIGHTS)
        ),
    }
    for field, breakage in breakages.items():
        shutil.rmtree(path)
        shutil.copytree(good, path)
        breakage()
        for _ in range(2):  # a monitor that meets it running, then one started after
            mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
            try:
                mon.flush()
                assert mon.handle(encode_act("r", "p", next(seq), 0, "h:out", x, _pos(range(3))))
                mon.flush(final=True)
                assert field in mon.health()["transcoders_broken"]["live"], field
                listed = {t["name"]: t for t in store.transcoders(include_broken=True)}
                assert field in listed["live"]["broken"]  # what `interlatent transcoders` and the panel show
                shutil.rmtree(path)
                shutil.copytree(good, path)  # fixed on disk, not registered again
                wait_until(lambda: (mon.flush(), "live" not in mon.health()["transcoders_broken"])[1], 10, what="the fix")  # noqa: B023
                assert mon.handle(encode_act("r", "p", next(seq), 0, "h:out", x, _pos(range(3))))
                mon.flush(final=True)
                with torch.no_grad():
                    np.testing.assert_allclose(
                        store.recent("r", LATENT_PREFIX + "live")[0][-3:], model.encode(torch.from_numpy(x)).numpy(), atol=1e-6
                    )
                breakage()
            finally:
                mon.close()


def test_an_artifact_rewritten_on_disk_is_reloaded_and_if_broken_reported(tmp_path: Path, store: Store) -> None:
    """A monitor that loaded an artifact sees its files change: a good rewrite is encoded from then
    on, a broken one is reported and no longer encodes with the old weights."""
    from monitor.transcoders.artifacts import WEIGHTS

    torch.manual_seed(3)
    old, new = Transcoder(6, 3, 6).eval(), Transcoder(6, 3, 6).eval()
    path = save_artifact(tmp_path / "t", old, source="h:out", target="h:out", run="r")
    store.register_transcoder(artifact_info("t", path, old, run="r", source="h:out", target="h:out", q=None))
    x = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    seq = iter(range(100))
    try:
        mon.flush()
        assert mon.handle(encode_act("r", "p", next(seq), 0, "h:out", x, _pos(range(3))))
        save_artifact(tmp_path / "t", new, source="h:out", target="h:out", run="r")  # rewritten in place
        wait_until(
            lambda: (mon.flush(), mon.encoders.active["t"][1] is not None and _same(mon.encoders.active["t"][1], new))[1], 10
        )
        assert mon.handle(encode_act("r", "p", next(seq), 0, "h:out", x, _pos(range(3, 6))))
        mon.flush(final=True)
        with torch.no_grad():
            np.testing.assert_allclose(
                store.recent("r", LATENT_PREFIX + "t")[0][-3:], new.encode(torch.from_numpy(x)).numpy(), atol=1e-6
            )
        (path / WEIGHTS).write_bytes(b"garbage")
        wait_until(lambda: (mon.flush(), "t" in mon.health()["transcoders_broken"])[1], 10, what="the broken rewrite reported")
        assert "t" not in mon.encoders.active
    finally:
        mon.close()


def _same(a: Transcoder, b: Transcoder) -> bool:
    return bool(torch.equal(a.W_enc, b.W_enc))


def test_a_transcoder_registered_before_the_monitor_starts_encodes_its_first_frame(tmp_path: Path, store: Store) -> None:
    model = _register(store, tmp_path, "early", 3, seed=4)
    x = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:  # the very first frame, before any flush
        assert mon.handle(encode_act("r", "p", 0, 0, "h:out", x, _pos(range(4))))
        mon.flush(final=True)
    finally:
        mon.close()
    with torch.no_grad():
        np.testing.assert_allclose(
            store.recent("r", LATENT_PREFIX + "early")[0], model.encode(torch.from_numpy(x)).numpy(), atol=1e-6
        )
