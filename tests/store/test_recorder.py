"""Recordings on disk: numpy-readable shards, a manifest, damage detected, never read as data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, spawn_monitor, wait_until

from monitor.store.recording import Recorder, Recording, RecordingError
from monitor.store.records import Store
from monitor.tools.demo import CARTPOLE_OBS, DEMO_TAPS


def _pos(steps: np.ndarray) -> np.ndarray:
    return np.stack([steps, np.zeros_like(steps)], axis=1).astype(np.int64)


def _record(tmp_path: Path, n: int = 1000, max_steps: int = 700) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    m = rng.standard_normal((n, 2))
    rec = Recorder(tmp_path / "rec", "r", max_steps=max_steps, shard_rows=128)
    for start in range(0, n, 50):
        steps = np.arange(start, start + 50) + 10  # the recording starts wherever the run is
        rec.add_tap("h:out", x[start : start + 50], _pos(steps))
        rec.add_metrics(["a", "b"], m[start : start + 50], _pos(steps))
        if rec.full:
            break
    return rec.close(), x, m


def test_round_trip_budget_and_plain_numpy(tmp_path: Path) -> None:
    folder, x, m = _record(tmp_path)
    rec = Recording(folder)
    assert rec.manifest["complete"] and rec.manifest["steps"] == 700 and rec.taps == ["h:out"]
    data, pos = rec.tap("h:out")
    np.testing.assert_array_equal(data, x[:700])
    np.testing.assert_array_equal(pos[:, 0], np.arange(10, 710))
    (tap_rows,), met, ppos = rec.paired("h:out")
    np.testing.assert_array_equal(tap_rows, x[:700])
    np.testing.assert_array_equal(met, m[:700])
    shard = json.loads((folder / "manifest.json").read_text())["taps"]["h:out"]["shards"][0]
    plain = np.load(folder / shard["data"])  # no Interlatent code needed to read a shard
    np.testing.assert_array_equal(plain, x[: shard["rows"]])


def test_a_shard_cut_in_half_is_detected(tmp_path: Path) -> None:
    folder, _, _ = _record(tmp_path)
    shard = folder / json.loads((folder / "manifest.json").read_text())["taps"]["h:out"]["shards"][1]["data"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(RecordingError, match="damaged"):
        Recording(folder).tap("h:out")


def test_a_crash_leaves_only_listed_shards(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec", "r", max_steps=10_000, shard_rows=100)
    for start, n in ((0, 100), (100, 100), (200, 50)):  # two shards written, 50 rows buffered
        rec.add_tap("t", np.ones((n, 3), np.float32), _pos(np.arange(start, start + n)))
    (tmp_path / "rec" / "taps" / "0" / "data-00002.tmp").write_bytes(b"half a shard")  # a write cut by the crash
    # no close(): the process died here
    r = Recording(tmp_path / "rec")
    assert not r.manifest["complete"]
    data, _ = r.tap("t")
    assert data.shape == (200, 3)
    with pytest.raises(RecordingError, match="missing"):
        Recording(tmp_path / "nothing")


def test_interlatent_record_with_a_live_agent(tmp_path: Path, redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--data-dir", str(tmp_path))
    try:
        wait_until(lambda: store.status()["monitor"]["alive"], what="the monitor")
        rec = subprocess.Popen(
            [sys.executable, "-m", "monitor", "record", "--run", "rec", "--steps", "300", "--redis", redis_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        wait_until(lambda: "rec" in store.record_requests(), what="the recording request")
        agent = spawn(
            [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "500", "--run", "rec"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert agent.wait(timeout=120) == 0
        out, err = rec.communicate(timeout=120)
        assert rec.returncode == 0, err
        path = Path(out.strip().splitlines()[-1].split(" into ")[-1])
        r = Recording(path)
        assert r.manifest["complete"] and r.manifest["steps"] == 300
        (inputs, hidden), met, pos = r.paired(*DEMO_TAPS)
        assert inputs.shape == (300, 4) and hidden.shape == (300, 64) and met.shape[0] == 300
        np.testing.assert_allclose(inputs, met[:, : len(CARTPOLE_OBS)], rtol=1e-6, atol=1e-6)
        assert r.metric_names[:4] == CARTPOLE_OBS
    finally:
        mon.terminate()
        mon.wait(timeout=20)


def test_a_full_recording_waits_for_the_metrics_of_its_last_steps(tmp_path: Path) -> None:
    """Metric frames trail the tap frames of their steps: a recording whose taps filled up closes
    only once the metric rows of its last step are in (or a grace period passed), so every
    recorded step pairs (a loaded run once saw 199 of 300 paired)."""
    rec = Recorder(tmp_path / "rec", "r", max_steps=10)
    rec.add_tap("t", np.ones((12, 3), np.float32), _pos(np.arange(12)))
    assert rec.full and rec.steps == 10
    rec.add_metrics(["m"], np.ones((5, 1)), _pos(np.arange(5)))
    assert not rec.finished(100.0, grace_s=5.0)
    assert not rec.finished(104.0, grace_s=5.0)
    assert rec.finished(105.0, grace_s=5.0)  # the grace period passed
    assert rec.finished(0.0, metrics_expected=False)  # a run that logs no metrics
    rec.full_since = None
    rec.add_metrics(["m"], np.ones((7, 1)), _pos(np.arange(5, 12)))
    assert rec.finished(100.0)
    rec.close()
    (taps,), met, _ = Recording(tmp_path / "rec").paired("t")
    assert taps.shape == (10, 3) and met.shape == (10, 1)
