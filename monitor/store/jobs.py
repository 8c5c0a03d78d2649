"""Explain jobs: one Redis stream read by a consumer group, duplicates collapsed, results stored.

``file_job`` adds a job unless one for the same (run, tap, latent) is already queued; a worker
acks the job and clears that mark when it has stored the explanation, so a latent is never
explained twice at once and a later drift can file it again.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from monitor.store import keys

__all__ = ["file_job", "job_key", "store_explanation", "explanations", "ensure_group"]


def job_key(run: str, tap: str, latent: int) -> str:
    return f"{run}|{tap}|{latent}"


def ensure_group(r: redis.Redis) -> None:
    try:
        r.xgroup_create(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def file_job(r: redis.Redis, run: str, tap: str, latent: int, *, reason: str) -> bool:
    """Queue an explain job; False when one for this latent is already waiting."""
    if not r.sadd(keys.EXPLAIN_PENDING, job_key(run, tap, latent)):
        return False
    r.xadd(keys.EXPLAIN_JOBS, {"run": run, "tap": tap, "latent": str(latent), "reason": reason, "filed": str(time.time())})
    return True


def store_explanation(r: redis.Redis, explanation: dict[str, Any]) -> None:
    e = explanation
    p = r.pipeline()
    p.hset(keys.explanations(e["run"]), f"{e['tap']}/{e['latent']}", json.dumps(e))
    p.srem(keys.EXPLAIN_PENDING, job_key(e["run"], e["tap"], e["latent"]))
    p.execute()


def explanations(r: redis.Redis, run: str) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in r.hvals(keys.explanations(run))), key=lambda e: (e["tap"], e["latent"]))
