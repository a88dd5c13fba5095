"""Fixtures shared by every test. `STORES` lists the store kinds; every server test runs on each."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support import Server, Tenant, new_tenant, start_server

STORES = ["sqlite"]


def store_url(kind: str, tmp: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'cycles.db'}"
    raise ValueError(kind)


@pytest.fixture(scope="session", params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def server(store_kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per store kind for the whole session; tests isolate themselves with fresh tenants."""
    tmp = tmp_path_factory.mktemp(f"server-{store_kind}")
    srv = start_server(store_url(store_kind, tmp), tmp)
    yield srv
    srv.stop()


@pytest.fixture
def tenant(server: Server) -> Tenant:
    return new_tenant(server)


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path):
    """Build a store of the current kind directly (no server), optionally with an injected clock."""
    from cycles.store.sqlite import SQLiteStore

    made = []

    def make(clock=None, name: str = "direct"):
        if store_kind == "sqlite":
            kwargs = {"clock": clock} if clock is not None else {}
            store = SQLiteStore(str(tmp_path / f"{name}.db"), **kwargs)
        else:
            raise ValueError(store_kind)
        made.append(store)
        return store

    yield make
    for store in made:
        if getattr(store, "_conn", None) is not None:
            store._conn.close()
