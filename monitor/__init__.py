"""The monitoring service: receive, validate, keep live statistics in Redis, the CLI."""

from monitor.embedded import EmbeddedRedis
from monitor.ingest import Monitor, MonitorResult
from monitor.services import Services
from monitor.store import ConfigError, Store, connect

__all__ = ["ConfigError", "EmbeddedRedis", "Monitor", "MonitorResult", "Services", "Store", "connect"]
