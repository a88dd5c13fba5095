"""A small admin API client: a server at a URL with the operator key, or LOCAL mode, where the server
app runs in this process on a store URL and is reached through `httpx.ASGITransport`."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:7878"
LOCAL_URL = "http://cycles.local"  # never resolved: LOCAL requests go to the in-process app
RETRIES = 3


class ApiError(Exception):
    """A non-2xx answer, with the server's error code and message."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id

    @classmethod
    def of(cls, response: httpx.Response) -> "ApiError":
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            text = response.text[:200] or response.reason_phrase
            return cls(response.status_code, f"HTTP_{response.status_code}", text)
        return cls(response.status_code, str(body.get("error") or f"HTTP_{response.status_code}"),
                   str(body.get("message") or ""), body.get("request_id"))


class UsageError(Exception):
    """The connection options cannot work (e.g. no admin key)."""


@dataclass
class Connection:
    url: str = DEFAULT_URL
    admin_key: str | None = None
    store: str | None = None

    def describe(self) -> str:
        return f"store {self.store} (local)" if self.store else self.url


def _wire(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


class AdminClient:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
                retry: bool = False) -> httpx.Response:
        """Send one request; non-2xx raises ApiError. GETs, and writes that carry an idempotency key
        (retry=True), are resent on transport errors: the server answers a replay with the original result."""
        query = {k: _wire(v) for k, v in (params or {}).items() if v is not None}
        attempts = RETRIES if retry or method == "GET" else 1
        for attempt in range(attempts):
            try:
                response = self.http.request(method, path, params=query, json=body)
                break
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if not 200 <= response.status_code < 300:
            raise ApiError.of(response)
        return response

    def call(self, method: str, path: str, **kw: Any) -> Any:
        response = self.request(method, path, **kw)
        return response.json() if response.content else None

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.call("GET", path, params=params)

    def page(self, path: str, params: dict[str, Any], key: str, all_pages: bool = False) -> dict[str, Any]:
        """One page of a cursor-paginated list, or with all_pages every page merged into one."""
        first = self.get(path, params)
        if not all_pages:
            return first
        items, page = list(first.get(key) or []), first
        while page.get("has_more") and page.get("next_cursor"):
            page = self.get(path, {**params, "cursor": page["next_cursor"]})
            items += page.get(key) or []
        return {key: items, "has_more": False}


class _InProcess(httpx.BaseTransport):
    """Serves a synchronous httpx client from an ASGI app, on an event loop this object owns.

    The app's lifespan (auth setup, store close) runs around the whole session, as it would in a server.
    """

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.asgi = httpx.ASGITransport(app=app)
        self.lifespan = app.router.lifespan_context(app)
        try:
            self.loop.run_until_complete(self.lifespan.__aenter__())
        except BaseException:
            self.loop.close()
            raise

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> tuple[int, httpx.Headers, bytes]:
            response = await self.asgi.handle_async_request(request)
            return response.status_code, response.headers, await response.aread()

        status, headers, content = self.loop.run_until_complete(send())
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.loop.run_until_complete(self.lifespan.__aexit__(None, None, None))
        finally:
            self.loop.close()


@contextlib.contextmanager
def connect(conn: Connection) -> Iterator[AdminClient]:
    if conn.store:
        from .. import startup
        from ..server.app import create_app

        startup.check_store_url(conn.store)
        startup.ensure_data_dir(conn.store)
        startup.probe_store(conn.store)

        # A key that exists only for this invocation and never leaves the process.
        key = "cyc_local_" + secrets.token_urlsafe(32)
        try:
            app = create_app(store_url=conn.store, admin_key=key, sweep_interval_s=0, local=True)
        except ValueError as err:  # open_store's verdict on the URL
            raise UsageError(f"--store: {err}") from None
        transport = _InProcess(app)
        http = httpx.Client(base_url=LOCAL_URL, headers={"X-Admin-API-Key": key}, transport=transport)
    else:
        if not conn.admin_key:
            raise UsageError("no admin key: pass --admin-key or set CYCLES_ADMIN_API_KEY "
                             "(or use --store STORE_URL to work on a store directly)")
        http = httpx.Client(base_url=conn.url, headers={"X-Admin-API-Key": conn.admin_key}, timeout=30)
    with http:
        yield AdminClient(http)
