"""`CyclesMiddleware` for Django: each request's Cycles subject, and a Cycles denial raised by a view
answered with 402/429 and the Cycles error body. See `cycles.integrations.web`.

    MIDDLEWARE = [..., "cycles.integrations.django.CyclesMiddleware"]
    CYCLES_MIDDLEWARE = {"tenant_header": "X-Tenant", "user_scope": "workspace"}   # optional

`subject` may be a callable or a dotted path to one (it gets the HttpRequest). The default user is
`request.user.get_username()` when authenticated.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.utils.module_loading import import_string

from .web import WebOptions, enter, leave


class CyclesMiddleware:
    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        options = dict(getattr(settings, "CYCLES_MIDDLEWARE", {}) or {})
        if isinstance(options.get("subject"), str):
            options["subject"] = import_string(options["subject"])
        self.web = WebOptions(**options)

    def __call__(self, request: Any) -> Any:
        user = getattr(request, "user", None)
        name = user.get_username() if user is not None and getattr(user, "is_authenticated", False) else None
        token = enter(self.web.subject_of(request, request.headers.get, name))
        try:
            return self.get_response(request)
        finally:
            leave(token)

    def process_exception(self, request: Any, exception: Exception) -> Any:
        answer = self.web.answer(exception)
        if answer is None:
            return None
        status, headers, body = answer
        response = HttpResponse(body, status=status, content_type=headers.pop("content-type"))
        for k, v in headers.items():
            response[k] = v
        return response


__all__ = ["CyclesMiddleware"]
