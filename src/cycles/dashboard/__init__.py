"""The operator dashboard: a static single-page app served by `cycles serve` at /dashboard.

Every asset ships inside this package (no CDN, no build step, no node). The pages talk to the same API
as the CLI, with the key the operator typed (kept in the tab's sessionStorage only), so permissions and
the audit log are exactly the API's. Responses carry a strict Content-Security-Policy: scripts and
styles only from this origin, no inline script, no framing.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).with_name("static")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class _Secured:
    """Adds the security headers to every response of the wrapped app."""

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)  # type: ignore[operator]


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


def routes() -> list[Route | Mount]:
    return [
        Route("/dashboard", _index, methods=["GET", "HEAD"]),
        Mount("/dashboard/static", app=_Secured(StaticFiles(directory=STATIC)), name="dashboard"),
    ]
