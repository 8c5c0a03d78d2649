"""An SB3 agent in one process, the monitor in another, Redis in a third."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import numpy as np
from helpers import ROOT, free_endpoint, spawn, spawn_monitor, wait_until

from monitor.store.records import Store
from monitor.tools.demo import CARTPOLE_OBS, DEMO_TAPS

AGENT = str(ROOT / "tests" / "agents" / "sb3_cartpole.py")


def _status_cli(redis_url: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "monitor", "status", "--json", "--redis", redis_url],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def _run(status: dict, name: str) -> dict | None:
    return next((r for r in status["runs"] if r["run"] == name), None)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)


def test_agent_and_monitor_in_separate_processes(redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep)
    try:
        agent = spawn([AGENT, "--endpoint", ep, "--steps", "300"], stdout=subprocess.PIPE, text=True)
        out, _ = agent.communicate(timeout=120)
        assert agent.returncode == 0, out
        final = json.loads(out.strip().splitlines()[-1])
        assert final["drops"] == 0
        wait_until(
            lambda: (
                (r := _run(store.status(), "cartpole-eval"))
                and all(t["rows"] == 300 for t in r["taps"].values())
                and len(r["taps"]) == 2
            ),
            what="300 rows on both taps",
        )
        st = _status_cli(redis_url)
        assert st["monitor"]["alive"] is True
        assert st["monitor"]["rejected"] == {}
        run = _run(st, "cartpole-eval")
        frames = {t: info.pop("frames") for t, info in run["taps"].items()}
        assert run["taps"] == {
            DEMO_TAPS[0]: {"width": 4, "rows": 300, "dtype": "float32"},
            DEMO_TAPS[1]: {"width": 64, "rows": 300, "dtype": "float32"},
        }
        assert all(2 <= n <= 300 for n in frames.values()), (
            frames
        )  # batched: 300 steps in more than one frame, never more than one a step
        assert (run["steps"], run["drops"], run["gaps"]) == (300, 0, 0)
        assert 0 <= run["last_seen_s"] < 60
        assert run["metrics"][:4] == CARTPOLE_OBS and {"action", "reward", "terminated", "truncated"} <= set(run["metrics"])
        assert run["episodes"] >= 1

        # one step's logged observation equals the input tap's activation at that step
        acts, apos = store.recent("cartpole-eval", DEMO_TAPS[0])
        met = store.recent_metrics("cartpole-eval")
        obs = np.stack([met[n][0] for n in CARTPOLE_OBS], axis=1)
        mpos = met[CARTPOLE_OBS[0]][1]
        by_step = {int(s): i for i, s in enumerate(mpos[:, 0])}
        checked = 0
        for row, (step, _) in zip(acts, apos, strict=False):
            if int(step) in by_step:
                np.testing.assert_allclose(row, obs[by_step[int(step)]], rtol=1e-6, atol=1e-6)
                checked += 1
        assert checked >= 250
    finally:
        _stop(mon)


def test_monitor_killed_mid_stream_then_restarted(redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep, "--flush-ms", "1000")
    agent = spawn(
        [AGENT, "--endpoint", ep, "--steps", "2500", "--sleep-ms", "2", "--run", "killed"], stdout=subprocess.PIPE, text=True
    )
    lines: list[dict] = []  # the agent's progress lines (every 100 steps), as they come
    reader = threading.Thread(target=lambda: lines.extend(json.loads(x) for x in agent.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: (r := _run(store.status(), "killed")) and r["taps"], what="first flush")
        # kill it mid flush interval: once the agent has streamed 100 steps past what Redis shows,
        # the monitor holds frames it has not written yet
        wait_until(
            lambda: lines and lines[-1].get("progress", 0) >= _run(store.status(), "killed")["steps"] + 100,
            what="unwritten steps",
        )
        before = _run(store.status(), "killed")
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        dropped_before = lines[-1]["drops"]
        wait_until(
            lambda: lines[-1].get("drops", 0) > dropped_before or lines[-1].get("done"), what="steps while the monitor is dead"
        )
        assert agent.poll() is None, "the agent must keep stepping while the monitor is dead"
        mon = spawn_monitor(redis_url, ep)
        agent.wait(timeout=120)
        reader.join(timeout=10)
        assert agent.returncode == 0, lines[-3:]
        final = lines[-1]
        assert final["drops"] > 0
        assert max(x["drops"] for x in lines) == final["drops"]
        after = wait_until(lambda: (r := _run(store.status(), "killed")) and r["steps"] == 2500 and r, what="resumed stream")
        tap_rows = after["taps"][DEMO_TAPS[1]]["rows"]
        assert before["taps"][DEMO_TAPS[1]]["rows"] < tap_rows < 2500
        assert after["gaps"] >= 1
        assert after["drops"] == final["drops"]
    finally:
        if agent.poll() is None:
            agent.kill()
        _stop(mon)


def test_many_agents_into_one_monitor(redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep)
    try:
        agents = [
            spawn(
                [AGENT, "--endpoint", ep, "--steps", str(100 + 50 * i), "--run", f"agent-{i}"], stdout=subprocess.PIPE, text=True
            )
            for i in range(3)
        ]
        for a in agents:
            out, _ = a.communicate(timeout=120)
            assert a.returncode == 0, out
        wait_until(
            lambda: (
                len(store.status()["runs"]) == 3
                and all(r["steps"] == 100 + 50 * int(r["run"][-1]) for r in store.status()["runs"])
            ),
            what="three runs with their own step counts",
        )
        for r in store.status()["runs"]:
            n = 100 + 50 * int(r["run"][-1])
            assert all(t["rows"] == n for t in r["taps"].values()) and (r["drops"], r["gaps"]) == (0, 0)
    finally:
        _stop(mon)
