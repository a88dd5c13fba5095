"""Fixtures of the integration tests: the fake provider server (session), Cycles clients for a fresh
tenant of the real session server (tests/conftest.py), and helpers reading what the server recorded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_providers import FakeProviderServer  # noqa: E402

from cycles.client import CyclesClient, CyclesConfig  # noqa: E402
from support import free_port  # noqa: E402


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeProviderServer]:
    srv = FakeProviderServer(free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture
def fake(fake_server: FakeProviderServer):
    fake_server.state.requests.clear()
    return fake_server.state


@pytest.fixture
def config(tenant, tmp_path: Path) -> CyclesConfig:
    return CyclesConfig(base_url=tenant.server.base_url, api_key=tenant.key, tenant=tenant.tenant_id,
                        journal_dir=str(tmp_path / "journal"), retry_initial_delay=0.05, retry_max_delay=0.2)


@pytest.fixture
def cycles_client(config: CyclesConfig) -> Iterator[CyclesClient]:
    c = CyclesClient(config)
    yield c
    c.close()


@pytest.fixture
def funded(tenant):
    tenant.budget(amount=10**12)
    return tenant
