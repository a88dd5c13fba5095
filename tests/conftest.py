"""Fixtures shared by every test. `STORES` lists the store kinds; every server test runs on each."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support import Server, Tenant, new_tenant, start_server

STORES = ["sqlite", "redis"]


@pytest.fixture(scope="session", params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the session (database 0 serves the session's `cycles serve`)."""
    from redis_support import RedisServer

    rs = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield rs.url
    rs.stop()


def store_url(kind: str, tmp: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'cycles.db'}"
    if kind == "redis":
        return request.getfixturevalue("redis_url")
    raise ValueError(kind)


@pytest.fixture(scope="session")
def server(store_kind: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    """One server per store kind for the whole session; tests isolate themselves with fresh tenants."""
    tmp = tmp_path_factory.mktemp(f"server-{store_kind}")
    srv = start_server(store_url(store_kind, tmp, request), tmp)
    yield srv
    srv.stop()


@pytest.fixture
def tenant(server: Server) -> Tenant:
    return new_tenant(server)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    """Build a store of the current kind directly (no server), optionally with an injected clock."""
    made = []

    def make(clock=None, name: str = "direct"):
        if store_kind == "sqlite":
            from cycles.store.sqlite import SQLiteStore

            kwargs = {"clock": clock} if clock is not None else {}
            store = SQLiteStore(str(tmp_path / f"{name}.db"), **kwargs)
        elif store_kind == "redis":
            from cycles.store.redis import RedisStore

            store = RedisStore(request.getfixturevalue("redis_url"), clock=clock)
        else:
            raise ValueError(store_kind)
        made.append(store)
        return store

    yield make
    for store in made:
        if getattr(store, "_conn", None) is not None:
            store._conn.close()
