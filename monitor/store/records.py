"""Reading and writing Interlatent's shared state in Redis (keys live in :mod:`monitor.store.keys`)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgpack
import numpy as np
import redis
from redis.cluster import ClusterNode

from monitor.stats.moments import Moments, Recent
from monitor.store import keys

__all__ = [
    "Store",
    "connect",
    "is_cluster",
    "redact",
    "ConfigError",
    "resolve_redis_url",
    "EPISODES_MAXLEN",
    "pack_recent",
    "unpack_recent",
    "unpack_analytics",
]

EPISODES_MAXLEN = 100_000


class ConfigError(RuntimeError):
    """A setting the user must fix; the message says how."""


def resolve_redis_url(url: str | None, data_dir: Path | None) -> str:
    """``--redis``, else ``$INTERLATENT_REDIS_URL``, else the embedded Redis of ``interlatent up``."""
    url = url or os.environ.get("INTERLATENT_REDIS_URL")
    if url:
        return url
    if data_dir is not None:
        f = Path(data_dir) / "redis.url"
        if f.exists():
            return f.read_text().strip()
    raise ConfigError("no Redis to talk to: start one with `interlatent up`, or pass --redis URL (or set INTERLATENT_REDIS_URL)")


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    auth, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in auth:
        return url
    return f"{scheme}://{auth.partition(':')[0]}:***@{hosts}"


def _cluster_client(url: str) -> Any:
    """A Redis Cluster client for ``redis+cluster://[user:password@]host:port,host:port,...``
    (``rediss+cluster`` for TLS): the seed nodes, from which redis-py learns the rest."""
    scheme, _, rest = url.partition("://")
    auth, at, hosts = rest.rpartition("@")
    hosts, slash, tail = hosts.partition("/")
    hosts, q, query = hosts.partition("?")
    if (slash and tail not in ("", "0")) or q or "?" in tail:
        raise ConfigError(
            f"Redis Cluster URL {redact(url)!r}: a cluster has one database and takes no options; give host:port,host:port"
        )
    user, _, password = auth.partition(":") if at else ("", "", "")
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"Redis Cluster URL {redact(url)!r}: seed node {item.strip()!r} is not host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return redis.RedisCluster(
        startup_nodes=nodes,
        username=unquote(user) or None,
        password=unquote(password) or None,
        ssl=scheme == "rediss+cluster",
        socket_connect_timeout=3,
        socket_timeout=10,
    )


def is_cluster(client: Any) -> bool:
    return isinstance(client, redis.RedisCluster)


def _cluster_enabled(client: redis.Redis) -> bool:
    try:
        return str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except redis.ResponseError:  # INFO renamed or refused (a managed Redis): nothing to warn about
        return False


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that has answered a PING, or a :class:`ConfigError` saying what to do.
    ``redis+cluster://h1:p1,h2:p2`` is a Redis Cluster (redis-py's cluster client, same API); a
    plain URL that reaches a cluster node is refused with that advice."""
    cluster = url.partition("://")[0] in CLUSTER_SCHEMES
    try:
        if cluster:
            client = _cluster_client(url)
        else:
            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        client.ping()
        if not cluster and _cluster_enabled(client):
            client.close()
            raise ConfigError(
                f"{redact(url)} is a node of a Redis Cluster: use redis+cluster://host:port,host:port,... (its seed nodes)"
            )
    except ConfigError:
        raise
    except ValueError as e:  # redis-py's own words on a URL it cannot read, and the schemes it knows
        raise ConfigError(f"Redis URL {redact(url)!r}: {e} (or redis+cluster:// for a Redis Cluster)") from e
    except (redis.RedisError, redis.exceptions.RedisClusterException, IndexError) as e:
        hint = "are its seed nodes up?" if cluster else "is `interlatent up` running?"
        raise ConfigError(f"cannot reach Redis at {redact(url)}: {e}; {hint}") from e
    return client


def pack_recent(r: Recent) -> bytes:
    """A ``keys.recent`` value: a ring of rows and their (step, index), oldest first."""
    data, pos = r.get()
    return msgpack.packb(
        {"dtype": data.dtype.name, "shape": list(data.shape), "data": data.tobytes(), "pos": pos.tobytes(), "n": r.n},
        use_bin_type=True,
    )


def unpack_recent(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(rows [n, width], pos [n, 2]) from a ``keys.recent`` value, oldest first."""
    d = msgpack.unpackb(blob, raw=False)
    data = np.frombuffer(d["data"], dtype=d["dtype"]).reshape(d["shape"])
    pos = np.frombuffer(d["pos"], dtype=np.int64).reshape(-1, 2)
    return data, pos


def unpack_analytics(blob: bytes) -> dict[str, Any]:
    """A ``keys.analytics`` value (``TapAnalytics.to_state()`` as msgpack), its arrays decoded."""
    d = msgpack.unpackb(blob, raw=False)
    w, m, k, q = d["width"], len(d["metrics"]), d["k"], d["q"]
    f = lambda name, *shape: np.frombuffer(d[name], dtype=np.float32).reshape(*shape)  # noqa: E731
    out = dict(d)
    out.update(
        corr=f("corr", w, m),
        ew_corr=f("ew_corr", w, m),
        mean=f("mean", w),
        std=f("std", w),
        max=f("max", w),
        frac_active=f("frac_active", w),
        top_value=f("top_value", k, w),
        top_metrics=f("top_metrics", k, w, m),
        top_key=np.frombuffer(d["top_key"], dtype=np.int64).reshape(k, w),
        q_value=f("q_value", q, w),
        q_metrics=f("q_metrics", q, w, m),
        q_key=np.frombuffer(d["q_key"], dtype=np.int64).reshape(q, w),
    )
    return out


_REGISTRY_FIELDS = {"name": str, "run": str, "source": str, "target": str, "path": str, "d_sae": int}


def _registry_problem(t: Any) -> str | None:
    """Why a transcoder registry entry cannot be used, or None."""
    if not isinstance(t, dict):
        return "registry entry is not a JSON object"
    for field, typ in _REGISTRY_FIELDS.items():
        if not isinstance(t.get(field), typ) or isinstance(t.get(field), bool):
            return f"registry entry field {field} is missing or not {typ.__name__}"
    return None


class Store:
    """Interlatent's view of Redis: the monitor writes through it, the CLI and panel read."""

    def __init__(self, client: redis.Redis) -> None:
        # Any: redis-py types every command's result as a union with its async form
        self.r: Any = client

    # -- the monitor writes (a run's state: monitor.service.persist) -------------------------
    def add_rejected(self, counts: dict[str, int]) -> None:
        if counts:
            p = self.r.pipeline(transaction=False)
            for reason, n in counts.items():
                p.hincrby(keys.REJECTED, reason, n)
            p.execute()

    def add_lost(self, counts: dict[str, int]) -> None:
        """Records of these kinds that a monitor's full outbox let go (Redis was away too long)."""
        if counts:
            p = self.r.pipeline(transaction=False)
            for kind, n in counts.items():
                p.hincrby(keys.LOST, kind, n)
            p.execute()

    def heartbeat(self, kind: str, ident: str, info: dict[str, Any], ttl_s: float) -> None:
        self.r.set(keys.health(kind, ident), json.dumps(info), px=int(ttl_s * 1000))

    def clear_heartbeat(self, kind: str, ident: str) -> None:
        self.r.delete(keys.health(kind, ident))

    # -- anyone reads -------------------------------------------------------------------------
    def token_steps(self, run: str) -> list[int]:
        """The steps of a run whose tokens are kept, oldest first."""
        return sorted(int(k) for k in self.r.hkeys(keys.tokens(run)))

    def tokens(self, run: str, steps: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The tokens of these steps (language-model forwards), where kept: ``out[step]`` is
        ``{"rows": [b][context + t], "context": leading tokens before the forward, "start": the
        sequence position of rows[b][context]}``."""
        steps = list(dict.fromkeys(int(s) for s in steps))
        if not steps:
            return {}
        vals = self.r.hmget(keys.tokens(run), [str(s) for s in steps])
        out = {}
        for s, v in zip(steps, vals, strict=True):
            if v is not None:
                d = json.loads(v)
                out[s] = d if isinstance(d, dict) else {"rows": d, "context": 0, "start": 0}
        return out

    def runs(self) -> list[str]:
        return [r.decode() for r in self.r.zrange(keys.RUNS, 0, -1)]

    def recent(self, run: str, tap: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A tap's most recent rows and their (step, index), or None."""
        blob = self.r.get(keys.recent(run, tap))
        return unpack_recent(blob) if blob else None

    def recent_metrics(self, run: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Recent metric rows keyed by column name: name -> (values [n], pos [n, 2])."""
        blob = self.r.get(keys.run_metrics(run))
        if not blob:
            return {}
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for item in msgpack.unpackb(blob, raw=False)["recent"]:
            data, pos = unpack_recent(item["blob"])
            for j, name in enumerate(item["names"]):
                out[name] = (data[:, j], pos)
        return out

    def tap_moments(self, run: str, tap: str) -> dict[str, Any] | None:
        blob = self.r.get(keys.tap_stats(run, tap))
        return Moments.from_state(msgpack.unpackb(blob, raw=False)).get() if blob else None

    def explanation(self, run: str, tap: str, latent: int) -> dict[str, Any] | None:
        blob = self.r.hget(keys.explanations(run), f"{tap}/{latent}")
        return json.loads(blob) if blob else None

    def analytics(self, run: str, tap: str) -> dict[str, Any] | None:
        """A tap's live analytics as written by the monitor (arrays decoded), or None."""
        blob = self.r.get(keys.analytics(run, tap))
        return unpack_analytics(blob) if blob else None

    def register_transcoder(self, info: dict[str, Any]) -> None:
        p = self.r.pipeline(transaction=True)  # both keys share the {transcoders} tag
        p.hset(keys.TRANSCODERS, info["name"], json.dumps(info))
        p.incr(keys.TRANSCODERS_VERSION)
        p.execute()

    def set_transcoder_active(self, name: str, active: bool) -> bool:
        """Turn a registered transcoder's online encoding on or off; False if no such name."""
        blob = self.r.hget(keys.TRANSCODERS, name)
        if blob is None:
            return False
        info = json.loads(blob)
        info["active"] = bool(active)
        self.register_transcoder(info)
        return True

    def transcoders_version(self) -> int:
        return int(self.r.get(keys.TRANSCODERS_VERSION) or 0)

    def transcoders(self, *, include_broken: bool = False) -> list[dict[str, Any]]:
        """The registry, sorted. An entry without the fields every reader needs (someone edited
        Redis by hand) is left out, or with ``include_broken`` listed as ``{"name", "broken"}``;
        with ``include_broken``, an entry a running monitor cannot load or encode carries its
        reason as ``broken`` too."""
        out, broken = [], []
        for name, v in self.r.hgetall(keys.TRANSCODERS).items():
            try:
                t = json.loads(v)
            except ValueError:
                t = None
            why = _registry_problem(t)
            if why is None:
                out.append(t)
            else:
                broken.append({"name": name.decode(errors="replace"), "broken": why})
        out.sort(key=lambda t: (t["run"], t["source"], t["target"], t["d_sae"], t["name"]))
        if not include_broken:
            return out
        # what a running monitor could not load or encode, from its health key
        seen = {}
        for h in self.health():
            if h.get("kind") == "monitor" and isinstance(h.get("transcoders_broken"), dict):
                seen.update(h["transcoders_broken"])
        out = [{**t, "broken": str(seen[t["name"]])} if t["name"] in seen else t for t in out]
        return out + sorted(broken, key=lambda t: t["name"])

    def record_requests(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(keys.RECORD).items()}

    def set_record(self, run: str, state: dict[str, Any]) -> None:
        self.r.hset(keys.RECORD, run, json.dumps(state))

    def last_seen(self, run: str) -> float | None:
        """When a run last sent a frame (unix s), from the run registry; None if it is not there."""
        score = self.r.zscore(keys.RUNS, run)
        return float(score) if score is not None else None

    def ended_runs(self, before: float) -> list[str]:
        """Runs whose last frame came before ``before`` (unix s), oldest first."""
        return [r.decode() for r in self.r.zrangebyscore(keys.RUNS, "-inf", f"({before}")]

    def delete_run(self, run: str) -> int:
        """Delete every key of ``run`` (:func:`keys.run_keys`), its registry entry and its
        recording request; the number of keys deleted."""
        names = self.taps(run)
        deleted = self.r.delete(*keys.run_keys(run, list(names)))  # one slot: the run's hash tag
        p = self.r.pipeline(transaction=False)  # the registries are slots of their own
        p.zrem(keys.RUNS, run)
        p.hdel(keys.RECORD, run)
        p.execute()
        return int(deleted)

    def run_cost(self, run: str) -> dict[str, Any]:
        """What one run holds in Redis: ``keys`` (that exist), ``bytes`` (MEMORY USAGE, summed),
        ``last_seen`` (unix s, 0 if unknown)."""
        names = keys.run_keys(run, list(self.taps(run)))
        p = self.r.pipeline(transaction=False)
        for k in names:
            p.memory_usage(k, samples=0)
        sizes = [int(n) for n in p.execute() if n is not None]
        return {"keys": len(sizes), "bytes": sum(sizes), "last_seen": self.last_seen(run) or 0.0}

    def suggestions(self, run: str) -> list[dict[str, Any]]:
        blob = self.r.get(keys.suggestions(run))
        return json.loads(blob) if blob else []

    def episodes(self, run: str, count: int = EPISODES_MAXLEN) -> list[dict[str, Any]]:
        """The newest ``count`` episode ends of a run, oldest first."""
        return [
            {k.decode(): float(v) for k, v in f.items()} for _, f in reversed(self.r.xrevrange(keys.episodes(run), count=count))
        ]

    def last_alerts(self, run: str | None, last: int, *, page: int = 1000) -> list[tuple[bytes, dict[str, Any]]]:
        """The newest ``last`` alert events of ``run`` (or of all runs), oldest first, with their
        stream ids; the stream is read newest first in pages, so a busy run never hides a quiet one."""
        out: list[tuple[bytes, dict[str, Any]]] = []
        end = "+"
        while len(out) < last:
            batch = self.r.xrevrange(keys.ALERTS, max=end, count=page)
            for eid, f in batch:
                a = json.loads(f[b"json"])
                if run is None or a.get("run") == run:
                    out.append((eid, a))
                    if len(out) == last:
                        break
            if len(batch) < page:
                break
            end = "(" + batch[-1][0].decode()
        return out[::-1]

    def alerts(self, run: str | None = None, count: int = 10_000) -> list[dict[str, Any]]:
        out = [json.loads(f[b"json"]) for _, f in self.r.xrange(keys.ALERTS, count=count)]
        return [a for a in out if run is None or a["run"] == run]

    def steering(self, run: str) -> dict[str, Any]:
        """A run's steering: the interventions asked for (``version`` counts the changes) and what its
        agent reported over its authenticated control connection (``control``: opted in, False when
        it left or declined, None before anything was heard; ``applied_version``; ``active`` ids)."""
        blob = self.r.get(keys.steer(run))
        want = json.loads(blob) if blob else {"version": 0, "interventions": []}
        c = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.control(run)).items()}
        return {
            **want,
            "control": c["control"] == "1" if "control" in c else None,
            "applied_version": int(c.get("version", -1)),
            "active": json.loads(c.get("active", "[]")),
            "agent_time": float(c.get("time", 0.0)),
        }

    def steer_events(self, run: str | None = None, count: int = 10_000) -> list[dict[str, Any]]:
        """Agents' steering events (applied / reverted / refused), oldest first, of ``run`` or all runs."""
        out = [json.loads(f[b"json"]) for _, f in self.r.xrevrange(keys.STEER_EVENTS, count=count)]
        return [e for e in reversed(out) if run is None or e["run"] == run]

    def taps(self, run: str) -> dict[str, dict[str, Any]]:
        return {t.decode(): json.loads(v) for t, v in self.r.hgetall(keys.run_taps(run)).items()}

    def health(self) -> list[dict[str, Any]]:
        out = []
        for k in self.r.scan_iter(match=keys.HEALTH_MATCH, count=100):
            v = self.r.get(k)
            if v:
                out.append(json.loads(v))
        return out

    def status(self) -> dict[str, Any]:
        """The document ``interlatent status --json`` prints."""
        now = time.time()
        health = self.health()
        monitors = [h for h in health if h.get("kind") == "monitor"]
        rejected = {k.decode(): int(v) for k, v in self.r.hgetall(keys.REJECTED).items()}
        lost = {k.decode(): int(v) for k, v in self.r.hgetall(keys.LOST).items()}
        runs = []
        for run in self.runs():
            h = {k.decode(): v.decode() for k, v in self.r.hgetall(keys.run(run)).items()}
            if not h:
                continue
            taps = {t.decode(): json.loads(v) for t, v in self.r.hgetall(keys.run_taps(run)).items()}
            pubs = [json.loads(v) for v in self.r.hvals(keys.run_pubs(run))]
            met = self.r.get(keys.run_metrics(run))
            metric_names = msgpack.unpackb(met, raw=False)["names"] if met else []
            last_seen = float(h.get("last_seen", 0.0))
            runs.append(
                {
                    "run": run,
                    "steps": int(h.get("steps", 0)),
                    "drops": sum(int(p.get("drops", 0)) for p in pubs),
                    "gaps": int(h.get("gaps", 0)),
                    "frames": int(h.get("frames", 0)),
                    "last_seen_s": round(max(0.0, now - last_seen), 3),
                    "rows": int(h.get("rows", 0)),
                    "steps_per_s": float(h.get("steps_per_s", 0.0)) if now - last_seen < 10 else 0.0,
                    "rows_per_s": float(h.get("rows_per_s", 0.0)) if now - last_seen < 10 else 0.0,
                    "lag_s": float(h.get("lag_s", 0.0)),
                    "publishers": len(pubs),
                    "monitor": h.get("monitor", ""),  # the id of the monitor that wrote it last (its lease holder)
                    "episodes": int(h.get("episodes", 0)),
                    "unwatched": int(h.get("unwatched", 0)),
                    "lost": {k: int(h.get(f"lost_{k}", 0)) for k in ("episodes", "tokens")},
                    "early_dropped": int(h.get("early_dropped", 0)),
                    "return_mean_100": float(h.get("return_mean_100", 0.0)),
                    "taps": {
                        t: {"width": v["width"], "rows": v["rows"], "frames": v["frames"], "dtype": v["dtype"]}
                        for t, v in taps.items()
                    },
                    "metrics": metric_names,
                }
            )
        return {
            "monitor": {"alive": bool(monitors), "rejected": rejected, "lost": lost, "instances": monitors},
            "services": health,
            "runs": runs,
            "alerts": self.alert_counts(),
        }

    def alert_counts(self) -> dict[str, Any]:
        """Alerts pending and firing now (what the monitors hold), and every event so far by rule and state."""
        now: dict[str, int] = {"pending": 0, "firing": 0}
        for v in self.r.hvals(keys.ALERTS_ACTIVE):
            try:
                state = json.loads(v).get("state")
            except (ValueError, AttributeError):
                continue
            if state in now:
                now[state] += 1
        events = {k.decode(): int(v) for k, v in self.r.hgetall(keys.ALERTS_COUNT).items()}
        return {**now, "events": events}


def service_ident() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
