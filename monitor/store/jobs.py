"""Explain jobs: one Redis stream read by a consumer group, duplicates collapsed, results stored
with their history.

``file_job`` adds a job unless one for the same (run, tap, latent) is already queued; a worker
stores the explanation (which clears that mark) and then acks the job, so a latent is never
explained twice at once and a later drift can file it again.

Per latent, the run's explanations hash holds two fields: ``TAP/LATENT``, the best current
explanation (what alerts and the panel show: :func:`best_explanation`), and
``TAP/LATENT/history``, the last ``keep`` attempts, good and failed, newest last
(:func:`explanation_history`). A failure goes into the history and beside the best one (as its
``failure``), never over it; only a latent never explained well has a failure as its record.
"Best current" is the highest-scored good explanation since the latent's correlations last
drifted (an explanation of its old behaviour is not current, however well it scored then).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from monitor.store import keys
from monitor.store.records import ConfigError

__all__ = [
    "DRIFT_REASON",
    "HISTORY",
    "file_job",
    "job_key",
    "store_explanation",
    "best_explanation",
    "explanation_history",
    "explanations",
    "ensure_group",
]

HISTORY = 10  # explanations kept per latent
DRIFT_REASON = "correlations drifted"  # a job filed for this reason starts a new generation of explanations


def job_key(run: str, tap: str, latent: int) -> str:
    return f"{run}|{tap}|{latent}"


def _pending_member(tap: str, latent: int) -> str:
    return f"{tap}|{latent}"  # in the run's own set, so marking it done is in the run's slot


def _history_field(tap: str, latent: int) -> str:
    return f"{tap}/{latent}/history"  # a latent is an integer, so no "TAP/LATENT" field looks like this


def ensure_group(r: redis.Redis) -> None:
    try:
        r.xgroup_create(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def file_job(r: redis.Redis, run: str, tap: str, latent: int, *, reason: str) -> bool:
    """Queue an explain job; False when one for this latent is already waiting. A latent past
    the width of a tap the run has registered is a :class:`ConfigError`."""
    info = r.hget(keys.run_taps(run), tap)
    if info is not None:
        width = int(json.loads(info)["width"])
        if not 0 <= latent < width:
            raise ConfigError(f"{tap} of run {run!r} has {width} channels (0 to {width - 1}); there is no #{latent}")
    if not r.sadd(keys.explain_pending(run), _pending_member(tap, latent)):
        return False
    r.xadd(keys.EXPLAIN_JOBS, {"run": run, "tap": tap, "latent": str(latent), "reason": reason, "filed": str(time.time())})
    return True


def _rank(e: dict[str, Any]) -> tuple[float, float]:
    s = e.get("score") or {}
    ba = s.get("balanced_accuracy")
    return (float(ba) if isinstance(ba, int | float) else -1.0, float(e.get("time") or 0.0))


def _best(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best current explanation of a history (newest last), with the newest failure beside it
    when that failure came after it."""
    start = 0
    for k, e in enumerate(history):
        if not e.get("error") and e.get("reason") == DRIFT_REASON:
            start = k  # the latent drifted: what came before explains its old behaviour
    good = [e for e in history[start:] if not e.get("error")] or [e for e in history if not e.get("error")]
    if not good:
        return history[-1] if history else None
    top: dict[str, Any] = max(good, key=_rank)
    best = dict(top)
    if history[-1].get("error"):
        f = history[-1]
        best["failure"] = {"error": f["error"], "time": f.get("time"), "backend": f.get("backend")}
    return best


def store_explanation(r: redis.Redis, explanation: dict[str, Any], *, keep: int = HISTORY) -> dict[str, Any] | None:
    """Add an attempt (an explanation, or a record with ``error``) to its latent's history, make
    the best current one the latent's record, clear the latent's queued mark; returns that record."""
    e = explanation
    h, f, hf = keys.explanations(e["run"]), f"{e['tap']}/{e['latent']}", _history_field(e["tap"], int(e["latent"]))
    with r.pipeline(transaction=True) as p:
        while True:
            try:
                p.watch(h)
                blob = p.hget(h, hf)
                history = (json.loads(blob) if blob else [])[-(keep - 1) :] if keep > 1 else []
                history.append(e)
                best = _best(history)
                p.multi()
                p.hset(h, mapping={f: json.dumps(best), hf: json.dumps(history)})
                p.srem(keys.explain_pending(e["run"]), _pending_member(e["tap"], int(e["latent"])))
                p.execute()
                return best
            except redis.WatchError:
                continue


def best_explanation(r: redis.Redis, run: str, tap: str, latent: int) -> dict[str, Any] | None:
    """The latent's best current explanation (see the module's docstring), or None when it has
    never been explained well; the newest failure after it, if any, is its ``failure``."""
    blob = r.hget(keys.explanations(run), f"{tap}/{latent}")
    e = json.loads(blob) if blob else None
    return e if e and not e.get("error") and e.get("label") else None


def explanation_history(r: redis.Redis, run: str, tap: str, latent: int) -> list[dict[str, Any]]:
    """The latent's last explanations and failures, oldest first."""
    blob = r.hget(keys.explanations(run), _history_field(tap, latent))
    return json.loads(blob) if blob else []


def explanations(r: redis.Redis, run: str) -> list[dict[str, Any]]:
    """Each latent's record (its best current explanation, or its failure if it has none)."""
    got = r.hgetall(keys.explanations(run))
    out = [json.loads(v) for k, v in got.items() if not (k.decode() if isinstance(k, bytes) else k).endswith("/history")]
    return sorted(out, key=lambda e: (e["tap"], e["latent"]))
