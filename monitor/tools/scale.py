"""A tier of monitors on one Redis (or Redis Cluster), and ``interlatent bench scale``.

:class:`MonitorTier` starts K ``interlatent monitor`` processes on loopback ports against one
Redis URL, each up once its health key is there; ``kill(i)`` SIGKILLs one. Agents reach the tier
by listing its endpoints (``attach(..., endpoint=tier.endpoints)`` or ``$INTERLATENT_ENDPOINTS``):
each run goes to one monitor by rendezvous hashing, and moves when that one is gone.

``bench_scale`` runs N paced agent processes (a real attached torch module, its forwards at a
fixed rate) against 1, 2 and 3 monitors on a 1-master Redis Cluster, and 3 monitors on a 3-master
one, and reports per configuration: the rows offered and received per second, the CPU seconds each
monitor and each Redis master used, and from those the rows a monitor handles per CPU-second (its
ceiling where it has a core of its own) and the Redis commands each run costs per second. On a
machine with fewer cores than processes the aggregate is bounded by the cores, and the report
says how many there were.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from monitor.store.embedded import free_port
from monitor.store.records import Store, connect

__all__ = ["MonitorTier", "bench_scale", "cpu_seconds", "paced_forwards"]

log = logging.getLogger(__name__)

_TAP = "0:out"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used (Linux ``/proc``), 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MonitorTier:
    """K monitor processes on one Redis URL, each on its own loopback port."""

    def __init__(self, redis_url: str, k: int, *, log_dir: Path | None = None, extra_args: list[str] | None = None) -> None:
        if k < 1:
            raise ValueError(f"a tier needs at least one monitor, got {k}")
        self.redis_url, self.k = redis_url, k
        self.log_dir = log_dir
        self.extra_args = extra_args or []
        self.endpoints: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout_s: float = 60.0) -> MonitorTier:
        store = Store(connect(self.redis_url))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        try:
            for i in range(self.k):
                endpoint = f"tcp://127.0.0.1:{free_port()}"
                out = open(self.log_dir / f"monitor-{i}.log", "ab") if self.log_dir is not None else subprocess.DEVNULL
                cmd = [sys.executable, "-m", "monitor", "monitor", "--redis", self.redis_url, "--endpoint", endpoint]
                cmd += ["--metrics-port", "-1", *self.extra_args]
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
                self.endpoints.append(endpoint)
            deadline = time.monotonic() + timeout_s
            while not self._all_up(store):
                dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    self.stop()
                    what = f"monitor {dead[0]} exited" if dead else f"not every monitor came up in {timeout_s:.0f} s"
                    raise RuntimeError(f"{what} (logs in {self.log_dir})" if self.log_dir else what)
                time.sleep(0.1)
        finally:
            store.r.close()
        log.info("monitor tier up: %s", ", ".join(self.endpoints))
        return self

    def _all_up(self, store: Store) -> bool:
        pids = {h.get("pid") for h in store.health() if h.get("kind") == "monitor"}
        return all(p.pid in pids for p in self.procs)

    def kill(self, i: int) -> None:
        """SIGKILL monitor ``i``: no flush, no lease given back."""
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> MonitorTier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _agent(endpoints: list[str], run: str, seconds: float, rate_hz: float, batch: int, width: int, q: Any) -> None:
    """One agent process: a real attached module, ``rate_hz`` forwards of ``batch`` rows a second."""
    import torch

    from agent_side import attach

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))
    att = attach(net, [_TAP], run=run, endpoint=endpoints, connect_wait_s=10.0)
    t0 = time.monotonic()
    forwards = paced_forwards(net, torch.randn(batch, width), 1.0 / rate_hz, lambda: time.monotonic() >= t0 + seconds)
    elapsed = time.monotonic() - t0
    att.detach()
    q.put({"run": run, "rows": forwards * batch, "seconds": elapsed, "drops": att.counters().get("drops", 0)})


def paced_forwards(net: Any, x: Any, period_s: float, done: Any) -> int:
    """Call ``net(x)`` once every ``period_s`` (no drift: against the start) until ``done()``; the count."""
    import torch

    forwards, t0 = 0, time.monotonic()
    with torch.no_grad():
        while not done():
            net(x)
            forwards += 1
            wait = t0 + forwards * period_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
    return forwards


def _redis_nodes(client: Any) -> list[tuple[int, int]]:
    """(port, pid) of every master of the cluster the client talks to."""
    out = []
    for node in client.get_primaries():
        info = client.info("server", target_nodes=node)
        out.append((int(node.port), int(info["process_id"])))
    return out


def _commands(client: Any) -> int:
    return sum(int(client.info("stats", target_nodes=n)["total_commands_processed"]) for n in client.get_primaries())


def _one(
    url: str, k: int, *, agents: int, seconds: float, rate_hz: float, batch: int, width: int, log_dir: Path
) -> dict[str, Any]:
    store = Store(connect(url))
    store.r.flushall(target_nodes=store.r.PRIMARIES)
    masters = _redis_nodes(store.r)
    with MonitorTier(url, k, log_dir=log_dir) as tier:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        cpu0 = [cpu_seconds(p.pid) for p in tier.procs]
        rcpu0 = [cpu_seconds(pid) for _, pid in masters]
        cmd0 = _commands(store.r)
        t0 = time.monotonic()
        procs = [
            ctx.Process(target=_agent, args=(tier.endpoints, f"scale-{i:03d}", seconds, rate_hz, batch, width, q))
            for i in range(agents)
        ]
        for p in procs:
            p.start()
        reports = [q.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        offered = sum(r["rows"] for r in reports)

        def received() -> int:
            return sum(r["taps"].get(_TAP, {}).get("rows", 0) for r in store.status()["runs"])

        deadline, last = time.monotonic() + 30, -1
        while (got := received()) != last and time.monotonic() < deadline:  # until the monitors have flushed it all
            last = got
            time.sleep(1.0)
        wall = time.monotonic() - t0
        mon_cpu = [cpu_seconds(p.pid) - c for p, c in zip(tier.procs, cpu0, strict=True)]
        redis_cpu = [cpu_seconds(pid) - c for (_, pid), c in zip(masters, rcpu0, strict=True)]
        commands = _commands(store.r) - cmd0
        served = {r["run"]: r.get("monitor", "") for r in store.status()["runs"]}
        pids = {p.pid for p in tier.procs}
        idents = [h["id"] for h in store.health() if h.get("kind") == "monitor" and h.get("pid") in pids]
    store.r.close()
    run_s = sum(r["seconds"] for r in reports) / len(reports)
    return {
        "monitors": k,
        "redis_masters": len(masters),
        "agents": agents,
        "offered_rows_per_s": offered / run_s,
        "received_rows_per_s": got / run_s,
        "received_vs_offered": got / offered if offered else 0.0,
        "agent_drops": sum(r["drops"] for r in reports),
        "runs_per_monitor": sorted(list(served.values()).count(m) for m in idents),  # idle monitors too, as 0
        "monitor_cpu_s": [round(c, 2) for c in mon_cpu],
        "rows_per_monitor_cpu_s": got / sum(mon_cpu) if sum(mon_cpu) > 0 else 0.0,
        "redis_cpu_s": [round(c, 2) for c in redis_cpu],
        "redis_commands_per_s": commands / wall,
        "redis_commands_per_run_s": commands / wall / agents,
        "redis_commands_per_cpu_s": commands / sum(redis_cpu) if sum(redis_cpu) > 0 else 0.0,
    }


def bench_scale(
    *,
    agents: int = 12,
    seconds: float = 8.0,
    rate_hz: float = 100.0,
    batch: int = 32,
    width: int = 64,
    tiers: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (3, 3)),
) -> dict[str, Any]:
    """Each (Redis masters, monitors) in ``tiers`` in turn, the same agents offering the same load."""
    from monitor.tools.cluster import LocalCluster

    out: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)),
        "agents": agents,
        "rate_hz": rate_hz,
        "rows_per_forward": batch,
        "width": width,
        "seconds": seconds,
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="il-scale-") as tmp:
        for masters in sorted({m for m, _ in tiers}):
            with LocalCluster(Path(tmp) / f"redis-{masters}", masters=masters) as cluster:
                for m, k in tiers:
                    if m == masters:
                        logs = Path(tmp) / f"logs-{m}-{k}"
                        logs.mkdir()
                        res = _one(
                            cluster.url,
                            k,
                            agents=agents,
                            seconds=seconds,
                            rate_hz=rate_hz,
                            batch=batch,
                            width=width,
                            log_dir=logs,
                        )
                        out["configs"].append(res)
                        log.info("scale %d masters, %d monitors: %s", m, k, res)
    return out
