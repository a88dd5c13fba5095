"""Authenticating a request: the key check (auth.Authenticator), what it means for the request's audit row,
and the record of a failed attempt.

Failed authentications are audited (tenant `__unauth__`) and, for tenant keys, emitted as
`api_key.auth_failed`, but a flood of bad keys must not fill the disk: at most RECORD_PER_SOURCE of them
per source address and RECORD_TOTAL in all (throttle.FailureRecords) are recorded per minute and process; the rest are counted
(`cycles_auth_failures_unrecorded_total`). Attempts refused with 429 by the throttle are not recorded.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ..protocol.errors import ErrorCode, ProtocolError
from .audit import authenticated
from .emit import emit
from .http import Ctx
from .state import state_of

def _source(request: Any) -> str | None:
    client = request.client
    return client.host if client else None


def cached(request: Request, ctx: Ctx) -> Any:
    """authenticate(runtime=True) when a tenant key's principal and governance view are cached and current
    (Authenticator.cached_runtime), without an await; None when the full check must run."""
    presented = request.headers.get("x-cycles-api-key")
    if not presented:
        return None
    hit = state_of(request).auth.cached_runtime(presented)
    if hit is None:
        return None
    principal, ctx.view = hit
    authenticated(request, ctx, principal)
    if principal.tenant_id:
        ctx.tenant = principal.tenant_id
    return principal


async def authenticate(request: Request, ctx: Ctx, *, allow_admin: bool = False, allow_tenant: bool = True,
                       runtime: bool = False) -> Any:
    """Authenticate the request and note the outcome for its audit row.

    With `runtime` (the runtime routes), a tenant key goes through the cached path and the tenant's
    governance view is left on `ctx.view` for the route (govcache)."""
    st = state_of(request)
    source = _source(request)
    try:
        presented = request.headers.get("x-cycles-api-key") if runtime and allow_tenant else None
        if presented:
            principal, ctx.view = await st.auth.runtime(presented, source)
        else:
            principal = await st.auth.authenticate(request.headers, allow_admin=allow_admin, allow_tenant=allow_tenant,
                                                   source=source)
    except ProtocolError as err:
        if err.code == ErrorCode.UNAUTHORIZED and st.failure_records.allow(source):
            ctx.auth_failed = True
            presented = request.headers.get("x-cycles-api-key")
            if presented and allow_tenant and ctx.journal is not None:
                emit(ctx, "api_key.auth_failed", "__system__", observation=True, data={
                    "key_prefix": presented[:14], "failure_reason": err.message, "source_ip": source})
        raise
    authenticated(request, ctx, principal)
    if principal.tenant_id:
        ctx.tenant = principal.tenant_id
    if principal.is_admin and ctx.audit is not None:
        ctx.audit.setdefault("metadata", {})["actor_type"] = "admin" if not allow_tenant else "admin_on_behalf_of"
        principal.require_admin(admin_permission(ctx.audit["resource_type"], request.method))
    return principal


_ADMIN_RESOURCES = {"tenant": "tenants", "budget": "budgets", "policy": "policies", "api_key": "apikeys",
                    "webhook": "webhooks", "event": "events", "audit": "audit"}


def admin_permission(resource_type: str, method: str) -> str:
    """The granular admin permission a route needs: admin:<resource>:read for reads, :write otherwise."""
    access = "read" if method in ("GET", "HEAD") else "write"
    resource = _ADMIN_RESOURCES.get(resource_type)
    if resource is None or (resource == "audit" and access == "write"):
        return f"admin:{access}"
    return f"admin:{resource}:{access}"
