"""Every step is accounted for: an agent started against a live monitor streams from step 0, and
one that ran while no monitor listened says how many steps went unwatched, so a run's
rows + unwatched + drops = steps. Real agents in processes, a real monitor process."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
import torch
from helpers import AGENT_DIR, free_endpoint, spawn, spawn_monitor, wait_until
from torch import nn

import agent_side
from monitor.store.records import Store
from monitor.tools.demo import DEMO_TAPS

AGENT = str(AGENT_DIR / "sb3_cartpole.py")


def _run(store: Store, name: str) -> dict | None:
    return next((r for r in store.status()["runs"] if r["run"] == name), None)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_agent_started_against_a_live_monitor_streams_from_step_0(redis_url: str, store: Store) -> None:
    """Before: attach() returned before the connection's handshake, so the first steps went by
    with the hooks off (an SB3 DQN lost its first 12, a SAC its first forward, uncounted)."""
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep)
    try:
        wait_until(lambda: store.status()["monitor"]["alive"], what="the monitor's heartbeat")
        agent = spawn(
            [AGENT, "--endpoint", ep, "--steps", "300", "--run", "step0", "--wait-monitor-s", "0"], stdout=subprocess.PIPE
        )
        out, _ = agent.communicate(timeout=120)
        assert agent.returncode == 0
        done = json.loads(out.splitlines()[-1])
        assert (done["drops"], done["unwatched"]) == (0, 0)
        r = wait_until(lambda: (r := _run(store, "step0")) and r["steps"] == 300 and r, what="300 steps in Redis")
        wait_until(lambda: all(t["rows"] == 300 for t in (_run(store, "step0") or r)["taps"].values()), what="all rows")
        r = _run(store, "step0")
        assert set(r["taps"]) == set(DEMO_TAPS)
        assert (r["unwatched"], r["drops"], r["gaps"]) == (0, 0, 0)
        pos = store.recent("step0", DEMO_TAPS[0])[1]
        assert pos[0, 0] == 0 or len(pos) < 300  # the recent ring may have let step 0 go; the count above holds it
    finally:
        _stop(mon)


def test_steps_before_the_monitor_came_are_counted_unwatched(redis_url: str, store: Store) -> None:
    ep = free_endpoint()
    agent = spawn(
        [AGENT, "--endpoint", ep, "--steps", "1500", "--run", "late-mon", "--wait-monitor-s", "0", "--sleep-ms", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(x) for x in agent.stdout), daemon=True)
    reader.start()
    mon = None
    try:
        wait_until(lambda: lines and lines[-1].get("progress", 0) >= 200, timeout_s=60, what="200 steps with no monitor")
        assert lines[-1]["unwatched"] >= 200 and lines[-1]["drops"] == 0
        mon = spawn_monitor(redis_url, ep)
        assert agent.wait(timeout=120) == 0
        reader.join(timeout=10)
        done = lines[-1]
        r = wait_until(lambda: (r := _run(store, "late-mon")) and r["steps"] == 1500 and r, what="the run's last step in Redis")
        wait_until(lambda: _run(store, "late-mon")["unwatched"] == done["unwatched"], what="the agent's unwatched count")
        r = _run(store, "late-mon")
        for tap in DEMO_TAPS:
            rows = r["taps"][tap]["rows"]
            assert rows + r["unwatched"] + r["drops"] == r["steps"], (tap, rows, r["unwatched"], r["drops"])
        assert 200 <= r["unwatched"] < 1500 and r["gaps"] == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        if mon is not None:
            _stop(mon)


@pytest.mark.timeout(60)
def test_attach_does_not_wait_when_nobody_listens() -> None:
    """A refused connection ends attach()'s wait at once, whatever ``connect_wait_s`` says (this
    test's own timeout is far below the 600 s asked for)."""
    model = nn.Sequential(nn.Linear(2, 2))
    with agent_side.attach(model, ["0:out"], run="alone", endpoint=free_endpoint(), connect_wait_s=600) as tap:
        with torch.no_grad():
            model(torch.zeros(1, 2))
        tap.advance()
        assert not tap.connected and tap.counters()["unwatched"] == 1
