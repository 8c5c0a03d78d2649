"""The explainer worker: jobs from the Redis consumer group, explanation, score, stored, acked.

Several workers share the load through the consumer group, and at most one works on a job at a
time. A worker holds a job by its claim: while the job runs, a heartbeat thread renews the claim
every ``reclaim_s / 4`` (XCLAIM ... JUSTID, in a script that first checks the job is still this
worker's) and rewrites the worker's health key (TTL ``reclaim_s``), so a worker deep in a slow LLM
call stays visible and keeps its job. Only a job whose claim nobody renewed for ``reclaim_s`` (its
worker died) is taken over, by XAUTOCLAIM. A worker that finds its job taken (it stalled past
``reclaim_s``) stops before its next LLM call and stores nothing. Duplicates were collapsed when
filed. ``run(burst=True)`` returns when no job is waiting or stale: the mode tests use.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from explainer.backends import Backend, BackendError, make_backend
from explainer.conditions import Reference, conditions_from_text
from explainer.context import EXPLAIN, LatentContext, build_context, prompt_hash
from explainer.judges import LLMJudge, RuleJudge
from explainer.prompt import ReplyError, parse_reply, render_prompt
from explainer.rules import explain_rules, token_conditions
from explainer.scoring import score_explanation, token_score
from monitor.store import keys
from monitor.store.jobs import HISTORY, ensure_group, store_explanation
from monitor.store.records import ConfigError, Store

__all__ = ["Worker", "WorkerSettings", "JobLost", "BACKENDS", "ENV"]

log = logging.getLogger(__name__)

BACKENDS = ("rules", "hf:PATH", "openai:BASE_URL")
MAX_TEXT = 600

# Renew the claim on a job only while this worker still holds it: a bare XCLAIM would take back a
# job that another worker reclaimed after this one stalled.
_RENEW = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


class JobLost(RuntimeError):
    """This worker's claim on its job was taken over: it must stop and store nothing."""


ENV = {
    "backend": "INTERLATENT_EXPLAINER_BACKEND",
    "scorer": "INTERLATENT_EXPLAINER_SCORER",
    "reclaim_s": "INTERLATENT_EXPLAINER_RECLAIM_S",
    "llm_timeout_s": "INTERLATENT_LLM_TIMEOUT_S",
    "llm_retries": "INTERLATENT_LLM_RETRIES",
    "history": "INTERLATENT_EXPLAINER_HISTORY",
    "max_deliveries": "INTERLATENT_EXPLAINER_MAX_DELIVERIES",
}


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs. ``scorer`` None: the backend judges its own explanations (``rules`` for
    the rules backend). ``reclaim_s``: how long a job's claim may go unrenewed before another
    worker takes it over (a dead worker's job waits this long). ``llm_timeout_s`` and
    ``llm_retries``: per HTTP call of an ``openai:`` backend (its worst case is about
    ``(retries + 1) * timeout_s`` plus a few seconds of backoff). ``history``: attempts kept per latent.
    ``max_deliveries``: how often a job is handed out; one whose workers all died on it is then given up (recorded)."""

    backend: str = "rules"
    scorer: str | None = None
    reclaim_s: float = 30.0
    llm_timeout_s: float = 30.0
    llm_retries: int = 2
    history: int = HISTORY
    max_deliveries: int = 3

    def __post_init__(self) -> None:
        if not self.reclaim_s > 0 or not self.llm_timeout_s > 0:
            raise ConfigError("the reclaim time and the LLM timeout must be positive seconds")
        if self.llm_retries < 0 or self.history < 1 or self.max_deliveries < 1:
            raise ConfigError("LLM retries must be 0 or more, the history and the deliveries 1 or more")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: Any) -> WorkerSettings:
        """``given`` (a flag's value; None: not given), else the ``ENV`` variable, else the default."""
        env = os.environ if environ is None else environ
        out: dict[str, Any] = {}
        for f in fields(cls):
            v = given.get(f.name)
            if v is None and env.get(ENV[f.name]):
                raw = env[ENV[f.name]]
                kind = {
                    "reclaim_s": float,
                    "llm_timeout_s": float,
                    "llm_retries": int,
                    "history": int,
                    "max_deliveries": int,
                }.get(f.name, str)
                try:
                    v = kind(raw)
                except ValueError as e:
                    raise ConfigError(f"{ENV[f.name]}={raw!r} is not a {kind.__name__}") from e
            if v is not None:
                out[f.name] = v
        return cls(**out)

    @classmethod
    def from_args(cls, args: Any, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """From an argparse namespace with the ``interlatent explainer`` flags."""
        return cls.from_env(
            environ,
            backend=getattr(args, "backend", None),
            scorer=getattr(args, "scorer", None),
            reclaim_s=getattr(args, "reclaim_s", None),
            llm_timeout_s=getattr(args, "llm_timeout_s", None),
            llm_retries=getattr(args, "llm_retries", None),
            history=getattr(args, "history", None),
            max_deliveries=getattr(args, "max_deliveries", None),
        )


def _clean(text: str) -> str:
    """Explanations are untrusted text: printable characters only, length capped."""
    text = str(text).replace("\n", " ").replace("\t", " ").replace("\r", " ")
    return "".join(ch for ch in text if ch.isprintable())[:MAX_TEXT]


class Worker:
    def __init__(
        self, store: Store, *, settings: WorkerSettings | None = None, backend: str | None = None, consumer: str | None = None
    ) -> None:
        """``backend`` (a spec) overrides the settings' one."""
        s = settings or WorkerSettings()
        if backend is not None:
            s = replace(s, backend=backend)
        self.settings = s
        self.llm: Backend | None = make_backend(s.backend, timeout_s=s.llm_timeout_s, retries=s.llm_retries)
        self.scorer: Backend | None = (
            self.llm
            if s.scorer in (None, s.backend)
            else make_backend(s.scorer, timeout_s=s.llm_timeout_s, retries=s.llm_retries)
        )
        self.scorer_name = s.scorer or s.backend
        self.store = store
        self.r = store.r
        self.backend = s.backend
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int(s.reclaim_s * 1000)
        self.done = 0
        self.failed = 0
        self.lost = 0
        self._renew = self.r.register_script(_RENEW)
        self._job: bytes | None = None
        self._job_key = ""
        self._job_lost = threading.Event()
        self._lock = threading.Lock()
        ensure_group(self.r)

    # -- claims and heartbeat ---------------------------------------------------------------
    @property
    def heartbeat_s(self) -> float:
        return max(0.05, self.settings.reclaim_s / 4)

    def renew(self, job_id: bytes) -> bool:
        """Reset the job's idle time if this worker still holds it; False when it was taken over."""
        return bool(self._renew(keys=[keys.EXPLAIN_JOBS], args=[keys.EXPLAIN_GROUP, job_id, self.consumer]))

    def beat(self) -> None:
        """Renew the current job's claim and this worker's health key."""
        with self._lock:
            job = self._job
            if job is not None and not self._job_lost.is_set() and not self.renew(job):
                log.warning("job %s was taken over by another worker: stopping it", job)
                self._job_lost.set()
        self.store.heartbeat(
            "explainer",
            self.consumer,
            {
                "kind": "explainer",
                "id": self.consumer,
                "pid": os.getpid(),
                "backend": self.backend,
                "scorer": self.scorer_name,
                "job": self._job_key if job is not None else None,
                "done": self.done,
                "failed": self.failed,
                "reclaim_s": self.settings.reclaim_s,
                "time": time.time(),
            },
            max(self.settings.reclaim_s, 3 * self.heartbeat_s),
        )

    def check(self) -> None:
        """Raise :class:`JobLost` when the current job's claim was taken over."""
        if self._job_lost.is_set():
            raise JobLost("another worker took this job over")

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception:  # Redis away for a moment: the next beat tries again
                log.exception("explainer heartbeat failed")

    # -- the loop -----------------------------------------------------------------------------
    def _next(self, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """One job: a stale one first, else a new one (waiting ``block_ms``; None: no wait,
        since Redis reads BLOCK 0 as "forever"). A stale job delivered more than
        ``max_deliveries`` times (its workers died on it each time) is given up, recorded as failed."""
        while True:
            claimed = self.r.xautoclaim(
                keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=1
            )
            if not claimed[1]:
                break
            job_id, f = claimed[1][0]
            pend = self.r.xpending_range(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, job_id, job_id, 1)
            tries = int(pend[0]["times_delivered"]) if pend else 1
            if f and tries <= self.settings.max_deliveries:
                log.info("reclaimed a stale job %s (delivery %d)", job_id, tries)
                return claimed[1]
            if f:
                job = {k.decode(): v.decode() for k, v in f.items()}
                log.warning(
                    "giving up job %s for %s/%s #%s after %d deliveries", job_id, job["run"], job["tap"], job["latent"], tries
                )
                store_explanation(
                    self.r,
                    self._failure(job, f"given up after {tries} deliveries: its worker died each time"),
                    keep=self.settings.history,
                )
                self.failed += 1
            self.r.xack(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, job_id)
        got = self.r.xreadgroup(keys.EXPLAIN_GROUP, self.consumer, {keys.EXPLAIN_JOBS: ">"}, count=1, block=block_ms)
        return got[0][1] if got else []

    def _failure(self, job: dict[str, str], error: str) -> dict[str, Any]:
        return {
            "run": job["run"],
            "tap": job["tap"],
            "latent": int(job["latent"]),
            "label": "",
            "text": "",
            "backend": self.backend,
            "worker": self.consumer,
            "reason": job.get("reason", ""),
            "error": _clean(error),
            "time": time.time(),
            "score": None,
        }

    def run(self, *, burst: bool = False, block_ms: int = 1000, max_jobs: int | None = None) -> int:
        stop = threading.Event()
        self.beat()
        beating = threading.Thread(target=self._heartbeat, args=(stop,), name="explainer-heartbeat", daemon=True)
        beating.start()
        try:
            while max_jobs is None or self.done + self.failed < max_jobs:
                entries = self._next(None if burst else block_ms)
                if not entries:
                    if burst:
                        break
                    continue
                for job_id, f in entries:
                    self.process(job_id, {k.decode(): v.decode() for k, v in f.items()})
        finally:
            stop.set()
            beating.join(timeout=5)
            self.store.clear_heartbeat("explainer", self.consumer)
        return self.done

    def process(self, job_id: bytes, job: dict[str, str]) -> dict[str, Any] | None:
        """Explain and score one job, store the result and ack it, unless the job was taken over."""
        run, tap, latent = job["run"], job["tap"], int(job["latent"])
        with self._lock:
            self._job, self._job_key, self._job_lost = job_id, f"{run}|{tap}|{latent}", threading.Event()
        try:
            try:
                e = self._explain(job_id, run, tap, latent, job)
            except JobLost:
                raise
            except Exception as err:  # one bad job must not stop the worker: record it, ack it
                self.failed += 1
                log.warning("explain job %s for %s/%s #%d failed: %s", job_id, run, tap, latent, err)
                e = self._failure(job, str(err))
            else:
                self.done += 1
            # last look before writing: renewing also gives this worker a full reclaim time to write and ack
            if self._job_lost.is_set() or not self.renew(job_id):
                raise JobLost("another worker took this job over")
            store_explanation(self.r, e, keep=self.settings.history)
            self.r.xack(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, job_id)
            return e if not e.get("error") else None
        except JobLost:
            self.lost += 1
            log.warning("explain job %s for %s/%s #%d was taken over; dropped here", job_id, run, tap, latent)
            return None
        finally:
            with self._lock:
                self._job = None

    def _explain(self, job_id: bytes, run: str, tap: str, latent: int, job: dict[str, str]) -> dict[str, Any]:
        ctx = build_context(self.store, run, tap, latent)
        if ctx is None:
            raise LookupError(f"no analytics for {run}/{tap} yet (its steps need paired metrics)")
        prompt = render_prompt(ctx)
        tags = {"Worker": self.consumer, "Job": job_id.decode() if isinstance(job_id, bytes) else str(job_id)}
        if self.llm is None:
            out = explain_rules(ctx)
        else:
            self.check()
            answer = str(self.llm.complete(prompt, tags=tags))
            try:
                out = parse_reply(answer, ctx.metrics)
            except ReplyError as err:
                raise ReplyError(f"the reply is not in the asked format: {err}") from err
            out = self._conditions(out, ctx)
        out = {"label": _clean(out["label"]).strip()[:80], "text": _clean(out["text"]).strip()} | {
            k: v for k, v in out.items() if k not in ("label", "text")
        }
        return {
            "run": run,
            "tap": tap,
            "latent": latent,
            **out,
            "backend": self.backend,
            "model": getattr(self.llm, "model", None),
            "worker": self.consumer,
            "prompt_hash": prompt_hash(prompt),
            "reason": job.get("reason", ""),
            "examples": ctx.example_steps,
            "time": time.time(),
            "score": self._score(ctx, out, tags),
        }

    def _conditions(self, out: dict[str, Any], ctx: LatentContext) -> dict[str, Any]:
        """The reply's CONDITIONS line, else what its prose states (read as the rules judge reads it)."""
        if ctx.tokens:
            return out | {"conditions": token_conditions(out["label"] + " " + out["text"], ctx)}
        if out["conditions"] or ctx.steps is None:
            return out
        s = ctx.steps
        ex = s.rows(EXPLAIN)
        _, hi = s.levels()
        ref = Reference(ctx.metrics, s.metrics[ex], s.act[ex] >= hi)
        return out | {"conditions": conditions_from_text(out["label"] + ". " + out["text"], ctx.metrics, ref)}

    def _score(self, ctx: LatentContext, out: dict[str, Any], tags: dict[str, str]) -> dict[str, Any] | None:
        if ctx.tokens or ctx.steps is None:
            return token_score(
                out["conditions"], ctx.metrics, ctx.heldout_values, ctx.heldout_metrics, tokens=ctx.heldout_tokens or None
            )
        if self.scorer is None:
            judge: Any = RuleJudge(ctx.steps, ctx.metrics)
        else:
            judge = LLMJudge(
                self.scorer, ctx.steps, ctx.metrics, name=self.scorer_name, tags=tags | {"Kind": "judge"}, check=self.check
            )
        try:
            return score_explanation(ctx, out, judge)
        except BackendError as err:  # the explanation stands; its score is what could not be had
            log.warning("scoring %s/%s #%d failed: %s", ctx.run, ctx.tap, ctx.latent, err)
            unscored = dict.fromkeys(("balanced_accuracy", "shuffled", "simulation", "simulation_shuffled"))
            return {"judge": self.scorer_name, "error": _clean(str(err))} | unscored | {"methods": {}}
