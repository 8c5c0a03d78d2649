"""Start and stop Interlatent's services: an embedded Redis (unless given a URL), the monitor, an
explainer worker and the panel."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from monitor.store.embedded import EmbeddedRedis, free_port, port_free
from monitor.store.records import Store, connect

__all__ = ["Services"]

log = logging.getLogger(__name__)


class Services:
    """The processes ``interlatent up`` runs. Children get one BLAS/torch thread each, so they
    share the machine politely with the agent."""

    def __init__(
        self,
        *,
        data_dir: Path,
        redis_url: str | None = None,
        endpoint: str,
        log_dir: Path | None = None,
        extra_monitor_args: list[str] | None = None,
        explainer: bool = True,
        panel_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.redis_url = redis_url
        self.endpoint = endpoint
        self.log_dir = log_dir
        self.extra_monitor_args = extra_monitor_args or []
        self.explainer = explainer
        self.panel_port = panel_port  # None: no panel
        self.panel_url: str | None = None
        self.embedded: EmbeddedRedis | None = None
        self.children: dict[str, subprocess.Popen] = {}
        self._logs: list[IO] = []

    def start(self, timeout_s: float = 30.0) -> Services:
        if self.redis_url is None:
            self.embedded = EmbeddedRedis(self.data_dir)
            self.redis_url = self.embedded.start()
        store = Store(connect(self.redis_url))
        self._spawn(
            "monitor",
            [
                "monitor",
                "--redis",
                self.redis_url,
                "--endpoint",
                self.endpoint,
                "--data-dir",
                str(self.data_dir),
                *self.extra_monitor_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while not any(h.get("kind") == "monitor" and h.get("pid") == self.children["monitor"].pid for h in store.health()):
            if self.children["monitor"].poll() is not None or time.monotonic() > deadline:
                self.stop()
                where = f"; its log is {self.log_dir / 'monitor.log'}" if self.log_dir else ""
                raise RuntimeError(f"the monitor did not come up on {self.endpoint}{where}")
            time.sleep(0.1)
        if self.explainer:
            self._spawn("explainer", ["explainer", "--redis", self.redis_url])
        if self.panel_port is not None:
            port = self.panel_port
            if not port_free(port):
                port = free_port()
                log.warning("panel port %d is taken; serving the panel on %d", self.panel_port, port)
            self._spawn("panel", ["panel", "--redis", self.redis_url, "--port", str(port)])
            self.panel_url = f"http://127.0.0.1:{port}"
        store.r.close()
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        out: IO | int | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        cmd = [sys.executable, "-m", "monitor", *args]
        self.children[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def wait(self) -> int:
        """Block until a child exits (or Ctrl-C); returns its exit code."""
        while True:
            for name, p in self.children.items():
                rc = p.poll()
                if rc is not None:
                    log.warning("%s exited with %s", name, rc)
                    return rc
            time.sleep(0.5)

    def stop(self) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.children.items():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop, killing it", name)
                p.kill()
                p.wait()
        self.children = {}
        for f in self._logs:
            f.close()
        self._logs = []
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
