"""Transports of `cycles mcp`: stdio (default) and Streamable HTTP with a bearer token."""

from __future__ import annotations

import hmac
import json
import sys
from typing import Any

from .. import __version__
from .config import MOCK_BANNER, Settings, check_http_token
from .server import build_server, make_backend


class BearerAuth:
    """ASGI middleware: `Authorization: Bearer <token>` on every path except /health (constant-time compare)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "UNAUTHORIZED", "message": "missing or invalid bearer token"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="cycles-mcp"'),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def banner(settings: Settings) -> None:
    if settings.mock:
        print(MOCK_BANNER, file=sys.stderr, flush=True)


async def serve_stdio(settings: Settings) -> None:
    from mcp.server.stdio import stdio_server

    banner(settings)
    backend = make_backend(settings)
    server = build_server(settings, backend)
    try:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await backend.aclose()


def http_app(settings: Settings, host: str, token: str | None) -> Any:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    backend = make_backend(settings)
    server = build_server(settings, backend)

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__, "mock": settings.mock})

    app = server.streamable_http_app(stateless_http=True, host=host, custom_starlette_routes=[
        Route("/health", health, methods=["GET"])])
    return BearerAuth(app, token) if token else app


def serve_http(settings: Settings, host: str, port: int, token: str | None, log_level: str = "warning") -> None:
    import uvicorn

    token = check_http_token(host, token)
    banner(settings)
    app = http_app(settings, host, token)
    print(f"Cycles MCP (Streamable HTTP) on http://{host}:{port}/mcp"
          f"{' (bearer token required)' if token else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="on")
