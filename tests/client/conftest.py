"""Fixtures of the SDK tests: clients pointed at the real session server (tests/conftest.py), with a
private journal directory per test and an optional fault-injecting transport in front."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults import AsyncFaultTransport, FaultTransport, Script  # noqa: E402

from cycles.client import AsyncCyclesClient, CyclesClient, CyclesConfig  # noqa: E402

FAST = dict(retry_initial_delay=0.05, retry_max_delay=0.2, retry_flush_timeout=5.0)


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def make_config(tenant, journal_dir) -> Callable[..., CyclesConfig]:
    def make(**kw: Any) -> CyclesConfig:
        base = dict(base_url=tenant.server.base_url, api_key=tenant.key, tenant=tenant.tenant_id,
                    journal_dir=str(journal_dir), **FAST)
        base.update(kw)
        return CyclesConfig(**base)

    return make


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def client(make_config, script) -> Iterator[CyclesClient]:
    c = CyclesClient(make_config(), transport=FaultTransport(script))
    yield c
    c.close()


@pytest.fixture
def make_client(make_config) -> Iterator[Callable[..., CyclesClient]]:
    made: list[CyclesClient] = []

    def make(script: Script | None = None, **kw: Any) -> CyclesClient:
        c = CyclesClient(make_config(**kw), transport=FaultTransport(script or Script()))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def make_async_client(make_config) -> Callable[..., AsyncCyclesClient]:
    def make(script: Script | None = None, **kw: Any) -> AsyncCyclesClient:
        return AsyncCyclesClient(make_config(**kw), transport=AsyncFaultTransport(script or Script()))

    return make
