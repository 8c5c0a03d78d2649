"""Shared state: every Redis key (keys), reading and writing records (records), explain jobs, recordings on disk, the embedded Redis."""

from monitor.store.records import ConfigError, Store, connect, resolve_redis_url

__all__ = ["ConfigError", "Store", "connect", "resolve_redis_url"]
