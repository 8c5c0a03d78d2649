"""Helpers the tests share: waiting for a condition, processes with this checkout importable, a
monitor on a real socket in a thread, a word-level tokenizer. Fixtures are in conftest.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.service.ingest import Monitor
from monitor.store.records import Store

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = ROOT / "tests" / "agents"


def wait_until(cond: Callable[[], object], timeout_s: float = 20.0, every_s: float = 0.05, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


class LiveMonitor:
    """A real Monitor bound to ``endpoint`` (default: a random loopback port), its loop in a thread."""

    def __init__(self, store: Store, endpoint: str = "tcp://127.0.0.1:0") -> None:
        self.monitor = Monitor(store, endpoint=endpoint, flush_ms=50)
        self.endpoint = self.monitor.endpoint
        self.thread = threading.Thread(target=self.monitor.run, daemon=True)
        self.thread.start()

    def finish(self) -> Monitor:
        """Stop the loop (it flushes to Redis on the way out) and return the monitor."""
        self.monitor.stop()
        self.thread.join(timeout=10)
        return self.monitor

    def close(self) -> None:
        if self.thread.is_alive():
            self.finish()
        self.monitor.close()


def free_endpoint() -> str:
    """A free loopback endpoint whose port + 1 is free too: a monitor binds its steering channel
    there, and stops if it cannot."""
    for _ in range(100):
        with socket.socket() as s, socket.socket() as nxt:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                nxt.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return f"tcp://127.0.0.1:{port}"
    raise AssertionError("no pair of free loopback ports")


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """A Python subprocess with this checkout importable and one torch/BLAS thread."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, *args], env=env, cwd=str(ROOT), **kw)


def spawn_monitor(redis_url: str, endpoint: str, *extra: str) -> subprocess.Popen:
    return spawn(
        [
            "-m",
            "monitor",
            "monitor",
            "--redis",
            redis_url,
            "--endpoint",
            endpoint,
            "--flush-ms",
            "50",
            "--metrics-port",
            "-1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def word_tokenizer(words: list[str]) -> Any:
    """A HuggingFace fast tokenizer with one token per word of ``words`` (the first is unk and pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], pad_token=words[0], eos_token=words[0])
