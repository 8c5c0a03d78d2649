"""Each latent's explanation history in a real Redis: the last N kept with their scores, failures
beside the best current explanation and never over it, and out-of-range latents refused."""

from __future__ import annotations

import json

import pytest

from monitor.store import keys
from monitor.store.jobs import (
    DRIFT_REASON,
    best_explanation,
    explanation_history,
    explanations,
    file_job,
    store_explanation,
)
from monitor.store.records import ConfigError, Store


def _e(label: str, ba: float | None, t: float, *, reason: str = "asked", error: str = "") -> dict:
    e = {"run": "r", "tap": "latents:x", "latent": 1, "label": label, "text": "", "backend": "rules", "reason": reason, "time": t}
    e["score"] = None if ba is None else {"balanced_accuracy": ba}
    return e | ({"error": error, "label": ""} if error else {})


def test_history_keeps_the_last_n_and_the_best_current_one(store: Store) -> None:
    r = store.r
    assert best_explanation(r, "r", "latents:x", 1) is None
    store_explanation(r, _e("", None, 1.0, error="LLM down"))
    assert best_explanation(r, "r", "latents:x", 1) is None and store.explanation("r", "latents:x", 1)["error"] == "LLM down"
    store_explanation(r, _e("good", 0.9, 2.0))
    store_explanation(r, _e("worse", 0.7, 3.0))
    assert best_explanation(r, "r", "latents:x", 1)["label"] == "good"  # the best scored, not the newest
    store_explanation(r, _e("", None, 4.0, error="timed out"))
    best = best_explanation(r, "r", "latents:x", 1)
    assert best["label"] == "good" and best["failure"]["error"] == "timed out"  # beside, not over
    assert store.explanation("r", "latents:x", 1) == best  # what alerts and the panel read today
    store_explanation(r, _e("best", 0.95, 5.0))
    assert "failure" not in best_explanation(r, "r", "latents:x", 1)
    hist = explanation_history(r, "r", "latents:x", 1)
    assert [h["label"] or h["error"] for h in hist] == ["LLM down", "good", "worse", "timed out", "best"]
    assert [h["score"] and h["score"]["balanced_accuracy"] for h in hist] == [None, 0.9, 0.7, None, 0.95]
    for k in range(6, 16):
        store_explanation(r, _e(f"e{k}", 0.5, float(k)), keep=10)
    hist = explanation_history(r, "r", "latents:x", 1)
    assert len(hist) == 10 and hist[0]["label"] == "e6" and hist[-1]["label"] == "e15"
    assert best_explanation(r, "r", "latents:x", 1)["label"] == "e15"  # "best" has left the history: newest of equals
    assert [e["label"] for e in explanations(r, "r")] == ["e15"]  # one record per latent, no history fields


def test_after_a_drift_only_newer_explanations_are_current(store: Store) -> None:
    r = store.r
    store_explanation(r, _e("old behaviour", 0.99, 1.0))
    store_explanation(r, _e("new behaviour", 0.8, 2.0, reason=DRIFT_REASON))
    store_explanation(r, _e("asked again", 0.75, 3.0))
    assert best_explanation(r, "r", "latents:x", 1)["label"] == "new behaviour"
    store_explanation(r, _e("", None, 4.0, reason=DRIFT_REASON, error="LLM down"))  # a failed drift job changes nothing
    assert best_explanation(r, "r", "latents:x", 1)["label"] == "new behaviour"


def test_a_minimal_record_is_stored_and_the_queued_mark_cleared(store: Store) -> None:
    r = store.r
    assert file_job(r, "lm", "latents:sae", 3, reason="asked")
    store_explanation(r, {"run": "lm", "tap": "latents:sae", "latent": 3, "label": "L", "text": "", "backend": "test"})
    assert best_explanation(r, "lm", "latents:sae", 3)["label"] == "L" and r.scard(keys.explain_pending("lm")) == 0
    assert json.loads(r.hget(keys.explanations("lm"), "latents:sae/3"))["label"] == "L"  # the field the panel reads


def test_a_latent_past_the_taps_width_is_refused(store: Store) -> None:
    store.r.hset(keys.run_taps("r"), "h:out", json.dumps({"width": 4, "dtype": "float32", "rows": 10, "frames": 1}))
    with pytest.raises(ConfigError, match="has 4 channels"):
        file_job(store.r, "r", "h:out", 4, reason="asked")
    assert store.r.xlen(keys.EXPLAIN_JOBS) == 0 and store.r.scard(keys.explain_pending("r")) == 0
    assert file_job(store.r, "r", "h:out", 3, reason="asked")
    assert file_job(store.r, "r", "latents:new", 9, reason="enough examples")  # a tap not registered yet: not refused
