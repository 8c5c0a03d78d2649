"""The monitoring service: receive, validate, keep live statistics in Redis, the CLI.

One subpackage per layer, dependencies pointing down (ARCHITECTURE.md; `make lint` checks them):
``cli`` > ``panel``, ``tools`` > ``service``, ``experiments`` > ``alerts``, ``transcoders`` >
``store`` > ``stats``. The names below load their modules on first use, so importing
``monitor`` (or the CLI's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ConfigError", "EmbeddedRedis", "Monitor", "MonitorResult", "Services", "Store", "connect"]

_HOME = {
    "ConfigError": "monitor.store.records",
    "Store": "monitor.store.records",
    "connect": "monitor.store.records",
    "EmbeddedRedis": "monitor.store.embedded",
    "Monitor": "monitor.service.ingest",
    "MonitorResult": "monitor.service.ingest",
    "Services": "monitor.tools.services",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
