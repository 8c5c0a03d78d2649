"""The `interlatent` command as a user runs it: real processes, a real embedded Redis."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from helpers import AGENT_DIR, ROOT, free_endpoint, spawn, wait_until

from monitor.store.records import Store, connect


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    p = spawn(["-m", "monitor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or {})
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_status_without_redis_says_what_to_do(tmp_path: Path) -> None:
    r = _cli("status", "--data-dir", str(tmp_path), env={"INTERLATENT_REDIS_URL": ""})
    assert r.returncode == 2
    assert "interlatent up" in r.stderr and "Traceback" not in r.stderr
    r = _cli("status", "--redis", "redis://127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr


def test_a_bad_cluster_url_or_lease_is_one_line_and_exit_2() -> None:
    r = _cli("status", "--redis", "redis+cluster://127.0.0.1:7000,nohost")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "interlatent: Redis Cluster URL 'redis+cluster://127.0.0.1:7000,nohost': seed node 'nohost' is not host:port"
    ]
    r = _cli("monitor", "--redis", "redis+cluster://127.0.0.1:1", "--lease-s", "-1")
    (line,) = r.stderr.strip().splitlines()
    assert (
        r.returncode == 2
        and line.startswith("interlatent: --lease-s must be at least 3 flushes (0.6 s")
        and line.endswith("got -1")
    )
    r = _cli("status", "--redis", "redis+cluster://127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr


def test_up_runs_embedded_redis_and_monitor_and_state_survives_restart(tmp_path: Path) -> None:
    ep = free_endpoint()
    env = {"INTERLATENT_REDIS_URL": "", "INTERLATENT_ENDPOINT": ep, "INTERLATENT_DATA_DIR": str(tmp_path)}
    up = spawn(["-m", "monitor", "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url_file = tmp_path / "redis.url"
        wait_until(url_file.exists, timeout_s=30, what="redis.url")
        store = Store(connect(url_file.read_text().strip()))
        wait_until(lambda: store.status()["monitor"]["alive"], what="monitor heartbeat")
        agent = spawn(
            [str(AGENT_DIR / "sb3_cartpole.py"), "--endpoint", ep, "--steps", "120", "--run", "via-up"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert agent.wait(timeout=120) == 0
        wait_until(lambda: any(r["run"] == "via-up" and r["steps"] == 120 for r in store.status()["runs"]), what="run in status")
        st = json.loads(_cli("status", "--json", env=env).stdout)  # finds Redis through the data dir
        assert [r["run"] for r in st["runs"]] == ["via-up"]
        store.r.close()
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert not (tmp_path / "redis.url").exists()

    up = spawn(["-m", "monitor", "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until((tmp_path / "redis.url").exists, timeout_s=30, what="redis.url again")
        wait_until(lambda: json.loads(_cli("status", "--json", env=env).stdout)["monitor"]["alive"], what="monitor again")
        st = json.loads(_cli("status", "--json", env=env).stdout)
        (run,) = st["runs"]
        assert run["run"] == "via-up" and run["steps"] == 120  # kept on disk by the embedded Redis
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=60)
    assert up.returncode == 0


def test_demo_headless_streams_and_exits_zero(tmp_path: Path) -> None:
    ep = free_endpoint()
    env = {"INTERLATENT_REDIS_URL": "", "INTERLATENT_ENDPOINT": ep}
    r = _cli("demo", "--headless", "--steps", "400", "--train-steps", "2048", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cartpole-demo" in r.stdout and "dropped 0 records" in r.stdout
    assert (tmp_path / "demo" / "ppo_cartpole.safetensors").exists()
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.zip"))
    # the second run loads the cached policy instead of training
    r = _cli("demo", "--headless", "--steps", "50", "--train-steps", "2048", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 0 and "training" not in r.stdout


def test_help_lists_the_contract_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "monitor", "--help"], capture_output=True, text=True, cwd=str(ROOT)).stdout
    for cmd in ("up", "monitor", "status", "demo", "bench"):
        assert cmd in out


def test_up_whose_monitor_cannot_start_is_one_line(tmp_path) -> None:
    """The steering port taken: the monitor stops at once, and `up` says so in one line, no traceback."""
    import socket
    import subprocess
    import sys

    from helpers import ROOT, free_endpoint

    ep = free_endpoint()
    port = int(ep.rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        cmd = [sys.executable, "-m", "monitor", "up", "--no-panel", "--data-dir", str(tmp_path), "--endpoint", ep]
        r = subprocess.run([*cmd, "--metrics-port", "-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("interlatent:")]
    assert "did not come up" in lines[-1] and any("cannot bind the steering" in x for x in lines)  # the monitor's own reason too
