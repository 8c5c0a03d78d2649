"""The LLM backends for real: a local HTTP server speaking the chat-completions format, and a
tiny random-weight GPT-2 with a tokenizer built here (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from chat_server import ChatServer
from helpers import spawn, wait_until
from test_explainer import _stream_planted

from explainer import Worker, WorkerSettings, best_explanation, explanation_history, explanations, file_job
from explainer.backends import BackendError, HFBackend, OpenAIBackend, _read_capped
from monitor.store import keys
from monitor.store.records import Store

GOOD = "LABEL: Pole leaning right\nEXPLANATION: Fires when the pole angle is high, the pole tilting right.\x1b[0m\nCONDITIONS: pole_angle > 0.02"


def test_openai_backend_explains_in_the_asked_format_and_is_scored(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _stream_planted(store)
    first = threading.Event()

    def answer(prompt: str, system: str, hdr: dict) -> str:
        if not first.is_set():
            first.set()
            threading.Event().wait(1.5)  # too slow: the client times out and tries again
        return GOOD

    srv = ChatServer(answer)
    monkeypatch.setenv("INTERLATENT_LLM_MODEL", "test-model")
    try:
        w = Worker(store, settings=WorkerSettings(backend=f"openai:{srv.url}", scorer="rules", llm_timeout_s=0.5), consumer="w")
        file_job(store.r, "cp", "h:out", 0, reason="test")
        assert w.run(burst=True) == 1
        (e,) = explanations(store.r, "cp")
        assert (e["label"], e["backend"], e["model"], e["worker"]) == (
            "Pole leaning right",
            f"openai:{srv.url}",
            "test-model",
            "w",
        )
        assert "\x1b" not in e["text"] and e["conditions"] == [{"metric": "pole_angle", "op": ">", "value": 0.02}]
        det = e["score"]["methods"]["detection"]
        assert det["balanced_accuracy"]["ci"][0] > det["baselines"]["shuffled"]["balanced_accuracy"]["ci"][1]
        calls = srv.log()
        assert len(calls) == 2 and calls[1].model == "test-model" and calls[1].worker == "w" and calls[1].job
        prompt = calls[1].prompt
        assert "pole_angle" in prompt and "LABEL:" in prompt and "CONDITIONS:" in prompt  # metrics, and the reply format
    finally:
        srv.close()


def test_a_reply_out_of_format_is_a_failure_beside_the_good_explanation(store: Store) -> None:
    _stream_planted(store, n=600)
    replies = iter([GOOD, "Sure! This unit likes the pole angle.", "LABEL: x\nLABEL: y\nEXPLANATION: z\nCONDITIONS: none"])
    srv = ChatServer(lambda *_: next(replies))
    try:
        w = Worker(store, settings=WorkerSettings(backend=f"openai:{srv.url}", scorer="rules"), consumer="w")
        for _ in range(3):
            file_job(store.r, "cp", "h:out", 0, reason="asked")
            w.run(burst=True)
        assert (w.done, w.failed) == (1, 2)
        hist = explanation_history(store.r, "cp", "h:out", 0)
        assert [bool(h.get("error")) for h in hist] == [False, True, True]
        assert "not in the asked format" in hist[1]["error"] and "LABEL: twice" in hist[2]["error"]
        best = best_explanation(store.r, "cp", "h:out", 0)
        assert best is not None and best["label"] == "Pole leaning right" and best["score"]["balanced_accuracy"] > 0.8
        assert best["failure"]["error"] == hist[2]["error"]  # recorded beside the good one, not over it
        assert store.explanation("cp", "h:out", 0)["label"] == "Pole leaning right"  # what alerts and the panel read
    finally:
        srv.close()


def test_openai_backend_gives_up_after_retries_and_records_it(store: Store) -> None:
    _stream_planted(store, n=400)
    srv = ChatServer(lambda *_: (500, b""))
    try:
        w = Worker(store, settings=WorkerSettings(backend=f"openai:{srv.url}", llm_retries=2), consumer="w")
        file_job(store.r, "cp", "h:out", 0, reason="test")
        assert w.run(burst=True) == 0 and w.failed == 1
        assert len(srv.log()) == 3
        (e,) = explanations(store.r, "cp")
        assert "did not answer after 3 tries" in e["error"]
    finally:
        srv.close()
    with pytest.raises(BackendError):
        OpenAIBackend("http://127.0.0.1:1", retries=0, timeout_s=0.5).complete("hi")


def test_reply_bodies_are_read_with_a_cap() -> None:
    huge = json.dumps({"choices": [{"message": {"content": "x" * 3_000_000}}]}).encode()
    srv = ChatServer(lambda *_: (200, huge))
    try:
        with pytest.raises(BackendError, match="cap"):
            OpenAIBackend(srv.url, retries=2).complete("hi")
        assert len(srv.log()) == 1  # an over-long reply is not asked for again
    finally:
        srv.close()

    class Stream(io.BytesIO):  # a reply with no Content-Length: the cap counts what is read
        headers: dict = {}

    with pytest.raises(BackendError, match="over the 100-byte cap"):
        _read_capped(Stream(b"y" * 1000), 100, time.monotonic() + 10)
    assert _read_capped(Stream(b"y" * 100), 100, time.monotonic() + 10) == b"y" * 100


def _tiny_gpt2(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = "[UNK] [PAD] [EOS] the pole cart is high low angle fires when left right pole_angle cart_pos step activation".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_layer=1, n_head=2, n_embd=16, n_positions=1024)).save_pretrained(folder)
    return folder


def test_hf_backend_runs_generate_on_a_local_model(tmp_path: Path, store: Store) -> None:
    _stream_planted(store, n=400)
    w = Worker(store, settings=WorkerSettings(backend=f"hf:{_tiny_gpt2(tmp_path / 'gpt2')}"), consumer="w")
    w.llm.max_new_tokens = 12
    file_job(store.r, "cp", "h:out", 0, reason="test")
    w.run(burst=True)
    (e,) = explanations(store.r, "cp")
    # random weights answer noise: it went through generate, and the worker refused it rather than guess
    assert e["backend"].startswith("hf:") and w.failed == 1 and "not in the asked format" in e["error"]
    with pytest.raises(BackendError, match="never downloaded"):
        HFBackend(str(tmp_path / "missing"))


WORKER = """
import sys
from explainer import Worker, WorkerSettings
from monitor.store.records import Store, connect
url, consumer, backend = sys.argv[1:4]
Worker(Store(connect(url)), settings=WorkerSettings.from_env(backend=backend, scorer="rules"), consumer=consumer).run(block_ms=100)
"""


@pytest.mark.timeout(120)
def test_no_job_is_worked_on_by_two_live_workers(redis_url: str, store: Store) -> None:
    """Two worker processes, three jobs, a reclaim time of 1 s. The first job's LLM call hangs:
    its worker keeps it (renewing its claim) while the other worker finishes the rest and sits
    idle, for well past the reclaim time; killed, its job goes to the other worker, once."""
    _stream_planted(store, n=600)
    release = threading.Event()
    latent_of: dict[str, int] = {}

    def answer(prompt: str, system: str, hdr: dict) -> str:
        if latent_of.get(hdr.get("x-interlatent-job", "")) == 0 and not release.is_set():
            release.wait(60)  # the first call about latent 0 hangs until its worker is dead
        return GOOD

    srv = ChatServer(answer)
    for j in range(3):
        file_job(store.r, "cp", "h:out", j, reason="test")
    latent_of.update({eid.decode(): int(f[b"latent"]) for eid, f in store.r.xrange(keys.EXPLAIN_JOBS)})
    env = {"INTERLATENT_EXPLAINER_RECLAIM_S": "1"}
    procs = {n: spawn(["-c", WORKER, redis_url, n, f"openai:{srv.url}"], env=env, stderr=subprocess.DEVNULL) for n in ("A", "B")}
    try:

        def hanging() -> object:
            calls = [c for c in srv.log() if latent_of[c.job] == 0 and c.end is None]
            others = explanations(store.r, "cp")
            return calls and len(others) == 2 and time.monotonic() - calls[0].start > 2.5 and calls[0]

        # latent 0's worker has held it for 2.5 reclaim times while the other had nothing to do
        call = wait_until(hanging, 60, what="jobs 1 and 2 done, job 0 hanging in its LLM call for 2.5 s")
        holder, other = call.worker, ({"A", "B"} - {call.worker}).pop()
        pending = store.r.xpending_range(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, "-", "+", 10)
        assert [(p["consumer"].decode(), latent_of[p["message_id"].decode()]) for p in pending] == [(holder, 0)]
        assert not [c for c in srv.log() if latent_of[c.job] == 0 and c.worker == other]
        live = {h["id"]: h for h in store.health() if h.get("kind") == "explainer"}
        assert live[holder]["job"] == "cp|h:out|0" and live[other]["job"] is None  # both visible, mid-call or idle

        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait()
        killed_at = time.monotonic()
        release.set()
        wait_until(lambda: len(explanations(store.r, "cp")) == 3, 30, what="job 0 reclaimed and explained")
        wait_until(lambda: holder not in {h["id"] for h in store.health()}, 10, what="the dead worker to drop out of status")
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        srv.close()
    calls = srv.log()
    for c in calls:  # no call about a job overlaps another live worker's call about it
        for d in calls:
            if c.job == d.job and c.worker != d.worker and c.start <= d.start:
                assert c.worker == holder and d.start > killed_at, (c, d)
    by_latent = {j: {c.worker for c in calls if latent_of[c.job] == j} for j in range(3)}
    assert by_latent[0] == {holder, other}
    assert all(len(explanation_history(store.r, "cp", "h:out", j)) == 1 for j in range(3))  # each explained once
    assert best_explanation(store.r, "cp", "h:out", 0)["worker"] == other
    assert (
        store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0 and store.r.scard(keys.explain_pending("cp")) == 0
    )


def test_a_worker_whose_job_was_taken_over_stores_nothing(store: Store) -> None:
    """A worker that stalled past the reclaim time finds its claim gone, and drops the job."""
    _stream_planted(store, n=400)
    file_job(store.r, "cp", "h:out", 0, reason="test")
    slow = Worker(store, settings=WorkerSettings(reclaim_s=60), consumer="slow")
    ((job_id, fields),) = slow._next(None)
    assert slow.renew(job_id)
    store.r.xclaim(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, "fast", 0, [job_id])  # another worker took it over
    assert not slow.renew(job_id)
    assert store.r.xpending_range(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP, "-", "+", 1)[0]["consumer"] == b"fast"  # not taken back
    assert slow.process(job_id, {k.decode(): v.decode() for k, v in fields.items()}) is None
    assert slow.lost == 1 and explanations(store.r, "cp") == []
    assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 1  # still the new owner's to ack
