"""The explainer worker: jobs from the Redis consumer group, explanation, score, stored, acked.

Several workers share the load through the consumer group. A job read by a worker that died
before acking is reclaimed by another once it has been idle ``claim_idle_ms`` (XAUTOCLAIM), and
duplicates were collapsed when filed, so a latent is never explained twice at once.
``run(burst=True)`` returns when no job is waiting or stale: the mode tests use.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from explainer.backends import make_backend
from explainer.context import build_context, prompt_hash, render_prompt
from explainer.rules import conditions_from_text, explain_rules
from explainer.scoring import detection_score
from monitor.store import keys
from monitor.store.jobs import ensure_group, store_explanation
from monitor.store.records import Store

__all__ = ["Worker", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("rules", "hf:PATH", "openai:BASE_URL")
MAX_TEXT = 600


def _clean(text: str) -> str:
    """Explanations are untrusted text: printable characters only, length capped."""
    text = str(text).replace("\n", " ").replace("\t", " ").replace("\r", " ")
    return "".join(ch for ch in text if ch.isprintable())[:MAX_TEXT]


class Worker:
    def __init__(self, store: Store, *, backend: str = "rules", consumer: str | None = None, claim_idle_ms: int = 60_000) -> None:
        self.llm = make_backend(backend)  # None: the rules backend
        self.store = store
        self.r = store.r
        self.backend = backend
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.done = 0
        self.failed = 0
        ensure_group(self.r)

    def _next(self, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """One job: a stale one first, else a new one (waiting ``block_ms``; None: no wait,
        since Redis reads BLOCK 0 as "forever")."""
        claimed = self.r.xautoclaim(
            keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=1
        )
        if claimed[1]:
            log.info("reclaimed a stale job %s", claimed[1][0][0])
            return claimed[1]
        got = self.r.xreadgroup(keys.EXPLAIN_GROUP, self.consumer, {keys.EXPLAIN_JOBS: ">"}, count=1, block=block_ms)
        return got[0][1] if got else []

    def run(self, *, burst: bool = False, block_ms: int = 1000, max_jobs: int | None = None) -> int:
        while max_jobs is None or self.done + self.failed < max_jobs:
            self.store.heartbeat(
                "explainer",
                self.consumer,
                {
                    "kind": "explainer",
                    "id": self.consumer,
                    "pid": os.getpid(),
                    "backend": self.backend,
                    "done": self.done,
                    "failed": self.failed,
                    "time": time.time(),
                },
                10.0,
            )
            entries = self._next(None if burst else block_ms)
            if not entries:
                if burst:
                    break
                continue
            for job_id, fields in entries:
                self.process(job_id, {k.decode(): v.decode() for k, v in fields.items()})
        return self.done

    def process(self, job_id: bytes, job: dict[str, str]) -> dict[str, Any] | None:
        run, tap, latent = job["run"], job["tap"], int(job["latent"])
        try:
            ctx = build_context(self.store, run, tap, latent)
            if ctx is None:
                raise LookupError(f"no analytics for {run}/{tap} yet (its steps need paired metrics)")
            prompt = render_prompt(ctx)
            if self.llm is None:
                out = explain_rules(ctx)
            else:
                answer = str(self.llm.complete(prompt)).strip()
                label, _, rest = answer.partition("\n") if "\n" in answer else answer.partition(". ")
                out = {
                    "label": _clean(label).strip() or "(no answer)",
                    "text": _clean(rest).strip() or _clean(answer),
                    "conditions": conditions_from_text(answer, ctx),
                }
            e = {
                "run": run,
                "tap": tap,
                "latent": latent,
                "label": _clean(out["label"])[:80],
                "text": _clean(out["text"]),
                "backend": self.backend,
                "model": getattr(self.llm, "model", None),
                "prompt_hash": prompt_hash(prompt),
                "reason": job.get("reason", ""),
                "examples": ctx.example_steps,
                "conditions": out["conditions"],
                "time": time.time(),
                "score": detection_score(
                    out["conditions"], ctx.metrics, ctx.heldout_values, ctx.heldout_metrics, tokens=ctx.heldout_tokens or None
                ),
            }
            store_explanation(self.r, e)
            self.done += 1
            return e
        except Exception as err:  # one bad job must not stop the worker: record it, ack it
            self.failed += 1
            log.warning("explain job %s for %s/%s #%d failed: %s", job_id, run, tap, latent, err)
            store_explanation(
                self.r,
                {
                    "run": run,
                    "tap": tap,
                    "latent": latent,
                    "label": "",
                    "text": "",
                    "backend": self.backend,
                    "error": _clean(str(err)),
                    "time": time.time(),
                    "score": None,
                },
            )
            return None
        finally:
            self.r.xack(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, job_id)
