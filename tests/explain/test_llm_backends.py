"""The LLM backends for real: a local HTTP server speaking the chat-completions format, and a
tiny random-weight GPT-2 with a tokenizer built here (nothing is downloaded)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_explainer import _stream_planted

from explainer import Worker, explanations, file_job
from explainer.backends import BackendError, HFBackend, OpenAIBackend
from monitor.store.records import Store


class ChatServer:
    """Answers chat completions; ``script`` says, per request, 'ok', 'slow' or 'fail'."""

    def __init__(self, script: list[str], answer: str) -> None:
        self.requests: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                mode = script[min(len(outer.requests), len(script)) - 1]
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "fail":
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out or was killed: that is what some tests do

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_openai_backend_explains_and_is_scored(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _stream_planted(store)
    srv = ChatServer(["slow", "ok"], "Pole leaning right\nFires when pole_angle is high, i.e. the pole tilts right.\x1b[0m")
    monkeypatch.setenv("INTERLATENT_LLM_MODEL", "test-model")
    try:
        w = Worker(store, backend=f"openai:{srv.url}", consumer="w")
        w.llm.timeout_s = 0.5  # the first reply is too slow: timed out, then retried
        file_job(store.r, "cp", "h:out", 0, reason="test")
        assert w.run(burst=True) == 1
        (e,) = explanations(store.r, "cp")
        assert (e["label"], e["backend"], e["model"]) == ("Pole leaning right", f"openai:{srv.url}", "test-model")
        assert "\x1b" not in e["text"] and e["conditions"][0] == {**e["conditions"][0], "metric": "pole_angle", "op": ">"}
        assert e["score"]["balanced_accuracy"] > e["score"]["shuffled"] + 0.2
        assert len(srv.requests) == 2 and srv.requests[1]["model"] == "test-model"
        assert "pole_angle" in srv.requests[1]["messages"][1]["content"]  # the prompt shows the metrics
    finally:
        srv.close()


def test_openai_backend_gives_up_after_retries_and_records_it(store: Store) -> None:
    _stream_planted(store, n=400)
    srv = ChatServer(["fail"], "")
    try:
        w = Worker(store, backend=f"openai:{srv.url}", consumer="w")
        w.llm.retries = 2
        file_job(store.r, "cp", "h:out", 0, reason="test")
        assert w.run(burst=True) == 0 and w.failed == 1
        assert len(srv.requests) == 3
        (e,) = explanations(store.r, "cp")
        assert "did not answer after 3 tries" in e["error"]
    finally:
        srv.close()
    with pytest.raises(BackendError):
        OpenAIBackend("http://127.0.0.1:1", retries=0, timeout_s=0.5).complete("hi")


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
    w = Worker(store, backend=f"hf:{_tiny_gpt2(tmp_path / 'gpt2')}", consumer="w")
    w.llm.max_new_tokens = 12
    file_job(store.r, "cp", "h:out", 0, reason="test")
    assert w.run(burst=True) == 1
    (e,) = explanations(store.r, "cp")
    assert e["backend"].startswith("hf:") and e["model"] == "gpt2"
    assert len(e["label"]) <= 80 and len(e["text"]) <= 600 and (e["label"] or e["text"])  # noise, but it went through generate
    with pytest.raises(BackendError, match="never downloaded"):
        HFBackend(str(tmp_path / "missing"))


def test_a_worker_killed_mid_job_has_its_job_reclaimed(redis_url: str, store: Store) -> None:
    import signal
    import subprocess

    from helpers import spawn, wait_until

    from monitor.store import keys

    _stream_planted(store, n=400)
    srv = ChatServer(["slow"] * 100, "never read")  # every reply takes 1.5 s: the first worker dies waiting
    try:
        file_job(store.r, "cp", "h:out", 0, reason="test")
        dying = spawn(
            ["-m", "monitor", "explainer", "--backend", f"openai:{srv.url}", "--redis", redis_url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: srv.requests, what="the first worker to be mid-job")
        dying.send_signal(signal.SIGKILL)
        dying.wait()
        assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 1  # read, never acked
        assert Worker(store, consumer="second", claim_idle_ms=0).run(burst=True) == 1
        assert store.r.xpending(keys.EXPLAIN_JOBS, keys.EXPLAIN_GROUP)["pending"] == 0
        (e,) = explanations(store.r, "cp")
        assert e["backend"] == "rules" and "pole_angle" in e["label"]
    finally:
        srv.close()
