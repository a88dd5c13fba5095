"""`CyclesFlask`: a Flask extension setting each request's Cycles subject and answering a Cycles denial
with 402/429 and the Cycles error body. See `cycles.integrations.web`.

    CyclesFlask(app, tenant_header="X-Tenant")        # or: ext = CyclesFlask(); ext.init_app(app)

`subject(request)` gets flask's request; the default user is `g.user` (its `username`, or the value itself
when a str) when the app set one.
"""

from __future__ import annotations

from typing import Any

from flask import Response, g, request

from ..client import errors as e
from .web import WebOptions, enter, leave


def _user() -> str | None:
    user = g.get("user")
    if user is None:
        return None
    return user if isinstance(user, str) else getattr(user, "username", None)


class CyclesFlask:
    def __init__(self, app: Any = None, **options: Any) -> None:
        self.web = WebOptions(**options)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        app.before_request(self._before)
        app.teardown_request(self._teardown)
        app.register_error_handler(e.CyclesProtocolError, self._denied)
        app.extensions["cycles"] = self

    def _before(self) -> None:
        g._cycles_token = enter(self.web.subject_of(request, request.headers.get, _user()))

    def _teardown(self, exc: BaseException | None) -> None:
        token = g.pop("_cycles_token", None)
        if token is not None:
            leave(token)

    def _denied(self, err: e.CyclesProtocolError) -> Any:
        answer = self.web.answer(err)
        if answer is None:
            raise err
        status, headers, body = answer
        return Response(body, status=status, headers=headers)


__all__ = ["CyclesFlask"]
