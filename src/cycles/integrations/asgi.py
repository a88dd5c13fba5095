"""`CyclesMiddleware`: ASGI middleware (Starlette, FastAPI, any ASGI app) setting each request's Cycles
subject and answering a Cycles denial with 402/429 and the Cycles error body. See `cycles.integrations.web`.

    app.add_middleware(CyclesMiddleware, tenant_header="X-Tenant")            # Starlette / FastAPI
    app = CyclesMiddleware(app, subject=lambda scope: {"tenant": ...})       # any ASGI app

`subject(scope)` gets the ASGI scope; the default user is `scope["user"].display_name` (or `.username`)
when an authentication middleware set one.
"""

from __future__ import annotations

from typing import Any

from .web import WebOptions, enter, leave


def _user(scope: dict[str, Any]) -> str | None:
    user = scope.get("user")
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return getattr(user, "display_name", None) or getattr(user, "username", None)


class CyclesMiddleware:
    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.web = WebOptions(**options)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        subject = self.web.subject_of(scope, lambda name: headers.get(name.lower()), _user(scope))
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        token = enter(subject)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:  # noqa: BLE001 - only Cycles denials are answered, the rest re-raised
            answer = self.web.answer(err)
            if answer is None or started or scope["type"] != "http":
                raise
            status, hdrs, body = answer
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()]})
            await send({"type": "http.response.body", "body": body})
        finally:
            leave(token)


__all__ = ["CyclesMiddleware"]
