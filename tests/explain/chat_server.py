"""A local OpenAI-compatible chat-completions server for the explainer's tests: ``answer(prompt,
system, headers)`` says what to reply (a string; a ``(status, body)`` pair; or a callable that
blocks first), and every request is logged with who called (the worker's ``X-Interlatent-*``
headers) and when it started and ended (``time.monotonic``, the test's own clock)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    worker: str
    job: str
    kind: str
    prompt: str
    system: str
    model: str
    start: float
    end: float | None = None  # None while the reply is being made
    extra: dict[str, Any] = field(default_factory=dict)


class ChatServer:
    def __init__(self, answer: Callable[[str, str, dict[str, str]], Any]) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                system, prompt = req["messages"][0]["content"], req["messages"][1]["content"]
                hdr = {k.lower(): v for k, v in self.headers.items()}
                call = Call(
                    worker=hdr.get("x-interlatent-worker", ""),
                    job=hdr.get("x-interlatent-job", ""),
                    kind=hdr.get("x-interlatent-kind", "explain"),
                    prompt=prompt,
                    system=system,
                    model=req.get("model", ""),
                    start=time.monotonic(),
                )
                with outer.lock:
                    outer.calls.append(call)
                got = answer(prompt, system, hdr)
                status, body = got if isinstance(got, tuple) else (200, got)
                if isinstance(body, str):
                    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": body}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out or was killed: that is what some tests do
                finally:
                    call.end = time.monotonic()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def log(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
