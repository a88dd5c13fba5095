"""Direct dispatch of the runtime routes every agent calls before and after each action.

The reserve / commit / release / extend / decide / event routes are matched here, before Starlette: they
need none of its router (a regex per route), middleware stack or request object, and they are most of a
busy server's traffic. Everything else (and any method or path these do not own exactly) goes on to the
Starlette app unchanged. The handlers are the same wrapped endpoints Starlette serves (http.endpoint):
the same correlation ids, errors, journal and metrics.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.requests import ClientDisconnect

Endpoint = Callable[[Any], Awaitable[Any]]
_RESERVATION_ACTIONS = ("commit", "release", "extend")
_UNREAD = object()


class _Client:
    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


class HotRequest:
    """What the runtime handlers read of a request: headers (lower-case names), path parameters, the
    client address, the body, and the app (its state). Duck-typed to starlette.requests.Request."""

    __slots__ = ("scope", "_receive", "headers", "path_params", "method", "app", "_body", "_client")

    def __init__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                 path_params: dict[str, str]) -> None:
        self.scope = scope
        self._receive = receive
        # uvicorn gives lower-case names; a repeated header keeps its first value, as Starlette's get() does
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            if key not in headers:
                headers[key] = value.decode("latin-1")
        self.headers = headers
        self.path_params = path_params
        self.method = scope["method"]
        self.app = scope["app"]
        self._body: bytes | None = None
        self._client: Any = _UNREAD

    @property
    def client(self) -> _Client | None:
        if self._client is _UNREAD:  # read three times per request (audit row, throttles, failure records)
            client = self.scope.get("client")
            self._client = _Client(client[0], client[1]) if client else None
        return self._client

    async def stream(self) -> Any:
        if self._body is not None:
            yield self._body
            return
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def body(self) -> bytes:
        if self._body is None:
            message = await self._receive()  # a small JSON body comes whole, in one message
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body = message.get("body", b"")
            if message.get("more_body", False):
                chunks = [body]
                async for chunk in self.stream():
                    chunks.append(chunk)
                body = b"".join(chunks)
            self._body = body
        return self._body


class DirectRequest:
    """A hot-route request read by server.lean straight off the connection: its headers (lower-case names, the
    first value of a repeated header), path parameters, client address and whole body. Duck-typed to
    starlette.requests.Request as HotRequest is."""

    __slots__ = ("headers", "path_params", "app", "client", "received")
    method = "POST"

    def __init__(self, headers: dict[str, str], path_params: dict[str, str], client: tuple[str, int] | None,
                 app: Any, body: bytes) -> None:
        self.headers = headers
        self.path_params = path_params
        self.app = app
        self.client = _Client(client[0], client[1]) if client else None
        self.received = body  # whole, within MAX_BODY_BYTES (server.lean checked its Content-Length)

    async def body(self) -> bytes:
        return self.received

    async def stream(self) -> Any:
        if self.received:
            yield self.received


class HotRoutes:
    """ASGI app: the runtime POST routes directly, the rest through `app`."""

    def __init__(self, app: Any, endpoints: dict[tuple[str, str], Endpoint]) -> None:
        self.app = app
        self.state = app.state
        self._exact = {path: fn for (method, path), fn in endpoints.items() if method == "POST" and "{" not in path}
        self._actions = {path.rsplit("/", 1)[1]: fn for (method, path), fn in endpoints.items()
                         if method == "POST" and path.startswith("/v1/reservations/{reservation_id}/")}

    def match(self, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        """The endpoint of a POST to `path` and its path parameters, when this dispatch owns it."""
        fn = self._exact.get(path)
        if fn is not None:
            return fn, {}
        if path.startswith("/v1/reservations/"):
            rid, _, action = path[17:].partition("/")
            fn = self._actions.get(action)
            if fn is not None and rid and "/" not in action:
                return fn, {"reservation_id": rid}
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            found = self.match(scope["path"])
            if found is not None:
                fn, params = found
                scope["app"] = self.app
                response = await fn(HotRequest(scope, receive, params))
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": response.raw_headers})
                await send({"type": "http.response.body", "body": response.body})
                return
        await self.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:  # router, routes, ... of the Starlette app
        return getattr(self.app, name)
