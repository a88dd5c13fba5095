"""Stores, chosen by URL: `sqlite:///path/to/file.db` (embedded, the default) `redis://host:port/db` or
`redis-cluster://host:port[,host:port...]/` (Redis Cluster, docs/redis.md)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlparse

from .base import Store


def default_data_dir() -> str:
    """`$CYCLES_DATA_DIR`, else `$XDG_DATA_HOME/cycles`, else `~/.local/share/cycles`."""
    if os.environ.get("CYCLES_DATA_DIR"):
        return os.environ["CYCLES_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "cycles")


def default_store_url(data_dir: str | None = None) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(data_dir or default_data_dir(), "cycles.db"))


def open_store(url: str) -> Store:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from .files import create_private
        from .sqlite import SQLiteStore

        # sqlite:///abs/path.db is absolute; sqlite:relative/path.db is relative to the working directory
        path = parsed.path
        if not path or parsed.netloc:
            raise ValueError(f"store URL {url!r} must look like sqlite:///path/to/file.db")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        sync = query.get("synchronous", "NORMAL").upper()
        if sync not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {sync}")
        create_private(path)
        return SQLiteStore(path, synchronous=sync, busy_timeout_ms=int(query.get("busy_timeout_ms", "10000")))
    if parsed.scheme in ("redis", "rediss"):
        from .redis import RedisStore

        return RedisStore(url)
    if parsed.scheme == "redis-cluster":
        from .redis_cluster import RedisClusterStore

        return RedisClusterStore(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path/to/file.db, redis://host:port/db or redis-cluster://host:port/")


__all__ = ["Store", "default_data_dir", "default_store_url", "open_store"]
