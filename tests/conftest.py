"""Fixtures shared by every test. `STORES` lists the store kinds; every server test runs on each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from support import Server, Tenant, new_tenant, start_server

# CYCLES_TEST_STORES narrows the kinds (e.g. "redis-cluster" alone); the cluster is 3 primaries + 3 replicas
STORES = [k for k in os.environ.get("CYCLES_TEST_STORES", "sqlite,redis,redis-cluster").split(",") if k]


# Redis Cluster (kind redis-cluster) runs every store-parametrized test when CYCLES_TEST_STORES names it; by
# default, within CI's time budget, it runs the store-level suites and these server suites (docs/redis.md)
CLUSTER_DEFAULT_MODULES = {"test_store_admin.py", "test_ledger_model.py", "test_analyzer.py",
                           "test_webhook_delivery.py", "test_runtime_semantics.py", "test_admin_plane.py", "test_idempotency.py", "test_events.py",
                           "test_redis_outbox.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "CYCLES_TEST_STORES" in os.environ:
        return
    dropped = [i for i in items if "redis-cluster" in i.nodeid and i.path.name not in CLUSTER_DEFAULT_MODULES]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not any(i is d for d in dropped)]


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real Redis Cluster for the session (per xdist worker): 3 primaries with a replica each."""
    from redis_support import RedisClusterNodes

    rc = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster")).start()
    yield rc
    rc.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: object) -> str:
    return redis_cluster.url  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def store_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second Redis Cluster for the store-level tests, which flush it for every test: the session's
    `cycles serve` runs on `redis_cluster`, and its sweeper, dispatcher and data must not share theirs (one
    primary gives each its own database; a cluster has only database 0)."""
    from redis_support import RedisClusterNodes

    rc = RedisClusterNodes(tmp_path_factory.mktemp("store-cluster")).start()
    yield rc.url
    rc.stop()


def store_url(kind: str, tmp: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'cycles.db'}"
    if kind == "redis":
        return request.getfixturevalue("redis_url")
    if kind == "redis-cluster":
        return request.getfixturevalue("redis_cluster_url")
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
