"""What the ASGI, Django and Flask middlewares share: the request's subject, and a denial as an HTTP answer.

The subject of a request is `subject(request)` when given, else the tenant from a header
(`X-Cycles-Tenant` by default) and the authenticated user's name in `user_scope` (default `workspace`).
While the request is served it is the default subject of every integration call (`cycles.integrations.*`)
below the options given to that integration; `request_subject()` returns it for your own `@cycles` code.

A Cycles denial that escapes the view (`BudgetExceededError` and the other spend denials, or a
`RateLimitedError`) becomes a 402 (spend) or 429 (rate) answer whose body is the Cycles error body:
`{"error": code, "message": ..., "request_id": ..., "reason_code": ..., "details": ...}` with
`Retry-After` when the server gave one.
"""

from __future__ import annotations

import contextvars
import json
import math
from typing import Any, Callable

from ..client import errors as e
from ._common import SUBJECT_FIELDS, _request_subject, request_subject

SPEND_DENIALS = ("BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING", "BUDGET_FROZEN", "BUDGET_CLOSED",
                 "TENANT_CLOSED")
DEFAULT_STATUS = {**{code: 402 for code in SPEND_DENIALS}, "LIMIT_EXCEEDED": 429}


class WebOptions:
    def __init__(self, *, subject: Callable[[Any], dict[str, Any] | None] | None = None,
                 tenant_header: str | None = "X-Cycles-Tenant", user_scope: str | None = "workspace",
                 status_for: dict[str, int] | None = None) -> None:
        if user_scope is not None and user_scope not in SUBJECT_FIELDS:
            raise ValueError(f"user_scope must be None or one of {', '.join(SUBJECT_FIELDS)}")
        self.subject = subject
        self.tenant_header = tenant_header
        self.user_scope = user_scope
        self.status_for = {**DEFAULT_STATUS, **(status_for or {})}

    def subject_of(self, request: Any, header: Callable[[str], str | None], user: str | None) -> dict[str, Any]:
        if self.subject is not None:
            found = self.subject(request) or {}
            unknown = set(found) - set(SUBJECT_FIELDS) - {"dimensions"}
            if unknown:
                raise ValueError(f"subject() returned unknown fields {sorted(unknown)}")
            return {k: v for k, v in found.items() if v}
        out: dict[str, Any] = {}
        if self.tenant_header:
            tenant = header(self.tenant_header)
            if tenant:
                out["tenant"] = tenant
        if self.user_scope and user:
            out[self.user_scope] = user
        return out

    def answer(self, err: BaseException) -> tuple[int, dict[str, str], bytes] | None:
        """(status, headers, body) for a Cycles denial; None for anything else (it propagates)."""
        if not isinstance(err, e.CyclesProtocolError) or isinstance(err, e.CyclesTransportError):
            return None
        code = err.error_code or err.reason_code
        status = self.status_for.get(code or "")
        if status is None:
            return None
        body = {"error": code, "message": err.message, "request_id": err.request_id or "",
                "reason_code": err.reason_code}
        if err.details:
            body["details"] = err.details
        headers = {"content-type": "application/json"}
        if err.retry_after_ms is not None:
            headers["retry-after"] = str(max(0, math.ceil(err.retry_after_ms / 1000)))
        return status, headers, json.dumps(body).encode()


def enter(subject: dict[str, Any]) -> contextvars.Token:
    return _request_subject.set(subject)


def leave(token: contextvars.Token) -> None:
    try:
        _request_subject.reset(token)
    except ValueError:  # reset from another context (a streamed body finished elsewhere)
        _request_subject.set(None)


__all__ = ["WebOptions", "request_subject", "enter", "leave", "SPEND_DENIALS", "DEFAULT_STATUS"]
