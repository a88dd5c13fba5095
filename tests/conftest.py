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
