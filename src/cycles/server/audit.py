"""The audit log: one row per authenticated governance-plane mutation and per failed authentication.

A mutation's row rides in the journal of its request and is written by the store inside the same
transaction as the change (no change without its row). Rows of requests that changed nothing (a
refused request, an idempotent replay of a create) are written on their own when the request ends.
Reads are not audited, except failed authentications on any route.

Runtime operations of a tenant key (reserve, commit, release, extend, decide, events) write no audit
row: the spec's correlation contract asks for one per request that hits the governance plane, and the
runtime's own record is the reservation (or event) row, its idempotency record and the events it emits,
all written in the same transaction. Their request still rides in the journal as a `context` entry that
gives those events their request id, trace id and actor. An operator acting on a reservation with the
admin key (a release on behalf of a tenant) is audited as before.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from ..protocol.errors import ProtocolError
from ..store.base import start_journal
from .http import Ctx
from .state import state_of

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ADMIN_SENTINEL = "__admin__"
UNAUTH_SENTINEL = "__unauth__"
_ID_PARAMS = ("reservation_id", "tenant_id", "key_id", "policy_id", "subscription_id", "event_id")
RUNTIME_TAGS = frozenset({"Reservations", "Decisions", "Events"})
RESOURCE_TYPES = {"Tenants": "tenant", "Budgets": "budget", "API Keys": "api_key", "Policies": "policy",
                  "Reservations": "reservation", "Decisions": "decision", "Events": "event", "Webhooks": "webhook",
                  "Operators": "admin_key", "Configuration": "config"}


_PROCESS = secrets.token_hex(5)  # ids are unique per process prefix; no random syscall per request
_SEQ = itertools.count()


def new_log_id() -> str:
    return f"log_{_PROCESS}{next(_SEQ):014x}"


def hooks(operation: str, tag: str, success_status: int) -> tuple[Callable[[Request, Ctx], Any], Any]:
    resource_type = RESOURCE_TYPES.get(tag, tag.lower())
    runtime = tag in RUNTIME_TAGS

    def begin(request: Request, ctx: Ctx) -> Any:
        ctx.journal = []
        ctx.audit = {
            "journal": "audit", "log_id": new_log_id(), "operation": operation, "resource_type": resource_type,
            "request_id": ctx.request_id, "trace_id": ctx.trace_id, "status": success_status,
            "source_ip": request.client.host if request.client else None,
            "user_agent": (request.headers.get("user-agent") or "")[:256] or None,
        }
        ctx.runtime = runtime
        params = request.path_params
        for name in _ID_PARAMS if params else ():
            if name in params:
                ctx.audit["resource_id"] = str(params[name])[:256]
                break
        return start_journal(ctx.journal)

    async def finish(request: Request, ctx: Ctx, response: Response, failure: ProtocolError | None) -> None:
        row = ctx.audit
        if row is None:
            return
        journal = ctx.journal or []
        if row.get("journal") == "context" and (not journal or (len(journal) == 1 and journal[0] is row)):
            journal.clear()  # a runtime request that left no event: its row is context only, nothing to write
            return
        # Events that record an observation (a denial, a failed authentication) are written even
        # though no change took them; events of a change that did not happen are dropped.
        leftover = [e for e in journal if e.get("journal") == "event" and e.get("observation")]
        if row.get("journal") == "context":
            if leftover:  # no row of its own (module docstring); it gives the events their request ids
                leftover.insert(0, row)
        elif row in journal:
            row["status"] = response.status_code
            leftover.insert(0, row)
        elif ctx.principal is None and ctx.auth_failed:
            row.update(tenant_id=UNAUTH_SENTINEL, status=response.status_code)
            leftover.insert(0, row)
        if response.status_code >= 400 and row in leftover:
            row["error_code"] = failure.code.value if failure else "INTERNAL_ERROR"
        journal.clear()
        if leftover:
            await state_of(request).store.append_journal(leftover)

    return begin, finish


def authenticated(request: Request, ctx: Ctx, principal: Any) -> None:
    """Called by authentication: from now on the request's mutations carry its row."""
    ctx.principal = principal
    row = ctx.audit
    if row is None:
        return
    row["tenant_id"] = ADMIN_SENTINEL if principal.is_admin else principal.tenant_id
    row["key_id"] = principal.key_id
    if ctx.runtime and not principal.is_admin:
        row["journal"] = "context"
    if request.method in MUTATING and ctx.journal is not None and row not in ctx.journal:
        ctx.journal.append(row)


def target_tenant(ctx: Ctx, tenant: str | None) -> None:
    """Name the tenant an admin-key mutation acted on (its row's tenant_id is the admin sentinel)."""
    if ctx.audit is not None and tenant:
        ctx.audit.setdefault("metadata", {})["target_tenant_id"] = tenant


def resource(ctx: Ctx, resource_id: str | None) -> None:
    if ctx.audit is not None and resource_id:
        ctx.audit["resource_id"] = resource_id
