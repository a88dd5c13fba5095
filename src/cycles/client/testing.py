"""Test your guarded code against a REAL Cycles server, in process, without mocks.

    def test_my_agent(cycles_tenant):
        client = cycles_tenant.client()            # a CyclesClient wired to the in-process server
        cycles_tenant.budget(1_000_000)            # USD_MICROCENTS on tenant:<id>
        run_my_agent(client)
        assert cycles_tenant.spent() == 4200

The server is the actual ASGI application (`cycles.server.app.create_app`) on a temporary embedded
SQLite store, with its lifespan running (admin key loaded, expiry sweeper on), driven through the
client's transport seam: `httpx.ASGITransport` behind a bridge so both the sync and the async client
can use it. Fixtures: `cycles_server` (one per test) and `cycles_tenant` (a fresh tenant with an API
key holding every runtime permission). Registered as the `cycles` pytest plugin (entry point
`pytest11`), or import the fixtures from this module into a conftest.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx

from .aio import AsyncCyclesClient
from .config import CyclesConfig
from .sync import CyclesClient

ADMIN_KEY = "cycles-testing-admin-key"
BASE_URL = "http://cycles.test"
PERMISSIONS = ["reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
               "reservations:list", "balances:read", "budgets:read", "budgets:write"]


class InProcessServer:
    """The real app on its own event-loop thread; `transport()` / `async_transport()` reach it."""

    def __init__(self, directory: str | Path | None = None, *, sweep_interval_s: float = 0.1) -> None:
        from ..server.app import create_app
        from ..store.sqlite import SQLiteStore

        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cycles-test-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cycles-test-server", daemon=True)
        self._thread.start()

        async def build() -> Any:
            store = SQLiteStore(str(self.directory / "cycles.db"))
            app = create_app(store, admin_key=ADMIN_KEY, sweep_interval_s=sweep_interval_s)
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            return app, lifespan

        self.app, self._lifespan = self._run(build())
        self._asgi = httpx.ASGITransport(app=self.app)
        self.base_url = BASE_URL
        self.admin_key = ADMIN_KEY

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _handle(self, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        resp = await self._asgi.handle_async_request(request)
        content = await resp.aread()
        return resp.status_code, resp.headers.raw, content

    def transport(self) -> httpx.BaseTransport:
        return _SyncBridge(self)

    def async_transport(self) -> httpx.AsyncBaseTransport:
        return _AsyncBridge(self)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, transport=self.transport(),
                            headers={"X-Admin-API-Key": self.admin_key})

    def new_tenant(self, tenant_id: str | None = None, permissions: list[str] | None = None) -> "TestTenant":
        tenant_id = tenant_id or f"t-{uuid.uuid4().hex[:12]}"
        with self.admin() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": tenant_id, "name": tenant_id})
            r.raise_for_status()
            r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant_id, "name": "test",
                                                    "permissions": permissions or PERMISSIONS})
            r.raise_for_status()
        return TestTenant(self, tenant_id, r.json()["key_secret"])

    def close(self) -> None:
        if not self.loop.is_running():
            return
        try:
            self._run(self._lifespan.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _SyncBridge(httpx.BaseTransport):
    def __init__(self, server: InProcessServer) -> None:
        self.server = server

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        status, headers, content = self.server._run(self.server._handle(request))
        return httpx.Response(status, headers=headers, content=content, request=request)


class _AsyncBridge(httpx.AsyncBaseTransport):
    def __init__(self, server: InProcessServer) -> None:
        self.server = server

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        fut = asyncio.run_coroutine_threadsafe(self.server._handle(request), self.server.loop)
        status, headers, content = await asyncio.wrap_future(fut)
        return httpx.Response(status, headers=headers, content=content, request=request)


class TestTenant:
    __test__ = False  # not a pytest test class

    def __init__(self, server: InProcessServer, tenant_id: str, api_key: str) -> None:
        self.server = server
        self.tenant_id = tenant_id
        self.api_key = api_key

    def config(self, **kw: Any) -> CyclesConfig:
        kw.setdefault("journal_dir", str(self.server.directory / "journal"))
        return CyclesConfig(base_url=self.server.base_url, api_key=self.api_key, tenant=self.tenant_id, **kw)

    def client(self, **kw: Any) -> CyclesClient:
        return CyclesClient(self.config(**kw), transport=self.server.transport())

    def async_client(self, **kw: Any) -> AsyncCyclesClient:
        return AsyncCyclesClient(self.config(**kw), transport=self.server.async_transport())

    def budget(self, amount: int, *, scope: str = "", unit: str = "USD_MICROCENTS", **extra: Any) -> dict[str, Any]:
        full = f"tenant:{self.tenant_id}" + (f"/{scope}" if scope else "")
        body = {"tenant_id": self.tenant_id, "scope": full, "unit": unit, "allocated": {"unit": unit, "amount": amount},
                **extra}
        with self.server.admin() as c:
            r = c.post("/v1/admin/budgets", json=body)
            r.raise_for_status()
            return r.json()

    def balance(self, scope: str = "", unit: str = "USD_MICROCENTS") -> dict[str, Any]:
        full = f"tenant:{self.tenant_id}" + (f"/{scope}" if scope else "")
        with httpx.Client(base_url=self.server.base_url, transport=self.server.transport(),
                          headers={"X-Cycles-API-Key": self.api_key}) as c:
            r = c.get("/v1/balances", params={"tenant": self.tenant_id, "include_children": "true", "limit": 200})
            r.raise_for_status()
        for b in r.json()["balances"]:
            if b["scope"] == full and b["remaining"]["unit"] == unit:
                return b
        raise LookupError(f"no balance for {full} in {unit}")

    def spent(self, scope: str = "", unit: str = "USD_MICROCENTS") -> int:
        return self.balance(scope, unit)["spent"]["amount"]

    def reserved(self, scope: str = "", unit: str = "USD_MICROCENTS") -> int:
        return self.balance(scope, unit)["reserved"]["amount"]


try:
    import pytest
except ImportError:  # pragma: no cover - the module is usable without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def cycles_server(tmp_path: Path) -> Iterator[InProcessServer]:
        """A real Cycles server (the ASGI app on a temporary SQLite store), in process."""
        server = InProcessServer(tmp_path / "cycles-server")
        try:
            yield server
        finally:
            server.close()

    @pytest.fixture
    def cycles_tenant(cycles_server: InProcessServer) -> TestTenant:
        """A fresh tenant on `cycles_server` with an all-permissions API key."""
        return cycles_server.new_tenant()
