"""What every `interlatent` command shares: settings from flags and the environment."""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from agent_side.wire import DEFAULT_ENDPOINT
from monitor.store.embedded import default_data_dir
from monitor.store.records import ConfigError, Store, connect, resolve_redis_url

__all__ = ["Settings", "pin_threads", "sigterm_as_interrupt"]


@dataclass
class Settings:
    redis_url: str | None
    endpoint: str
    data_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            redis_url=getattr(args, "redis", None) or os.environ.get("INTERLATENT_REDIS_URL") or None,
            endpoint=getattr(args, "endpoint", None) or os.environ.get("INTERLATENT_ENDPOINT") or DEFAULT_ENDPOINT,
            data_dir=Path(getattr(args, "data_dir", None) or default_data_dir()),
        )

    def store(self) -> Store:
        return Store(connect(resolve_redis_url(self.redis_url, self.data_dir)))

    def store_with_run(self, run: str) -> Store:
        """The store, or a :class:`ConfigError` naming the runs there are."""
        store = self.store()
        runs = store.runs()
        if run not in runs:
            raise ConfigError(f"no run {run!r}; runs: {', '.join(runs) or '(none yet)'}")
        return store


def pin_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def sigterm_as_interrupt() -> None:
    """Let SIGTERM stop a command the way Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
