"""Policy routes (/v1/admin/policies) and the policy lookup the runtime runs before each reservation."""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import actions as A
from ..core import policies as P
from ..protocol import governance as g
from ..protocol.errors import ErrorCode, ProtocolError, VersionConflict
from ..store.base import Store
from . import audit, events
from .admin import existing_tenant, owning_tenant, query_tenant, tenant_or_admin
from .auth import Principal
from .http import Ctx, decode, json_response, read_body
from .params import (
    bad, bool_param, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, iso, parse_iso, str_param,
)
from .state import state_of

KIND = "policy"
MAX_POLICIES_PER_TENANT = 1000


def _wire(rec: dict[str, Any]) -> g.Policy:
    fields = {k: v for k, v in rec.items() if k in g.Policy.__struct_fields__}
    for name in A.RULE_FIELDS:  # v0.1.26: returned as [] when unset, never omitted
        if fields.get(name) is None:
            fields[name] = []
    return msgspec.convert(fields, g.Policy)


def _event_data(rec: dict[str, Any], changed: list[str] | None = None) -> dict[str, Any]:
    data = {"policy_id": rec["policy_id"], "name": rec.get("name"), "scope_pattern": rec["scope_pattern"]}
    if changed is not None:
        data["changed_fields"] = changed
    return data


def _validate(rec: dict[str, Any], tenant: str) -> None:
    """Checks a whole policy record (after a create or a merge of a patch)."""
    try:
        rec["scope_pattern"] = P.canonical_pattern(rec["scope_pattern"])
    except P.PatternError as exc:
        raise bad(str(exc)) from None
    segments, _ = P.parse_pattern(rec["scope_pattern"])
    if segments and segments[0][0] == "tenant" and segments[0][1] != tenant:
        raise bad(f"scope_pattern must stay inside tenant:{tenant}")
    for name in ("max_tokens", "max_steps_remaining", "cooldown_ms"):
        value = (rec.get("caps") or {}).get(name)
        if value is not None and value < 0:
            raise bad(f"caps.{name} must be >= 0")
    for name in ("effective_from", "effective_until"):
        rec[f"{name}_ms"] = parse_iso(rec[name], name) if rec.get(name) is not None else None
    if rec["effective_from_ms"] is not None and rec["effective_until_ms"] is not None \
            and rec["effective_until_ms"] <= rec["effective_from_ms"]:
        raise bad("effective_until must be after effective_from")
    ttl = rec.get("reservation_ttl_override") or {}
    if ttl.get("default_ttl_ms") and ttl.get("max_ttl_ms") and ttl["default_ttl_ms"] > ttl["max_ttl_ms"]:
        raise bad("reservation_ttl_override.default_ttl_ms must not exceed max_ttl_ms")
    try:
        A.validate_policy(rec)
    except A.ActionError as exc:
        raise bad(str(exc)) from None


async def _owned(request: Request, principal: Principal, policy_id: str) -> dict[str, Any]:
    rec = await state_of(request).store.get_doc(KIND, policy_id) if len(policy_id) <= 128 else None
    # Another tenant's policy answers exactly like a missing one: ids never leak across tenants.
    if rec is None or (not principal.is_admin and rec["tenant_id"] != principal.tenant_id):
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Policy {policy_id[:128]} not found")
    return rec


async def create_policy(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "policies:write")
    req = decode(await read_body(request), g.PolicyCreateRequest)
    tenant = owning_tenant(principal, req.tenant_id)
    st = state_of(request)
    await existing_tenant(st.store, tenant)  # the same 400 as key and budget creates
    now = iso(await st.store.now_ms())
    rec = msgspec.to_builtins(req)
    rec.update(tenant_id=tenant, policy_id="pol_" + secrets.token_hex(10), status="ACTIVE", created_at=now,
               updated_at=now)
    _validate(rec, tenant)
    existing = await st.store.list_docs(KIND, tenant)
    if any(p.get("name") == rec["name"] for p in existing):
        raise ProtocolError(ErrorCode.DUPLICATE_RESOURCE, f"Tenant {tenant} already has a policy named {rec['name']!r}")
    if len(existing) >= MAX_POLICIES_PER_TENANT:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"A tenant may have at most {MAX_POLICIES_PER_TENANT} policies",
                            status=400)
    audit.resource(ctx, rec["policy_id"])
    audit.target_tenant(ctx, tenant)
    events.emit(ctx, "policy.created", tenant, data=_event_data(rec))
    stored = await st.store.save_doc(KIND, tenant, rec["policy_id"], rec, None)
    return json_response(ctx, _wire(stored or rec), status=201)


async def get_policy(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "policies:read")
    return json_response(ctx, _wire(await _owned(request, principal, request.path_params["policy_id"])))


async def update_policy(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "policies:write")
    req = decode(await read_body(request), g.PolicyUpdateRequest)
    changes = {k: v for k, v in msgspec.to_builtins(req).items()}
    if not changes:
        raise bad("request body must change at least one field")
    st = state_of(request)
    for _ in range(5):  # re-read and re-apply when another writer changed the policy meanwhile
        rec = await _owned(request, principal, request.path_params["policy_id"])
        audit.target_tenant(ctx, rec["tenant_id"])
        merged = {**rec, **changes, "updated_at": iso(await st.store.now_ms())}
        _validate(merged, rec["tenant_id"])
        events.drop_events(ctx)  # a retry after a lost race queues its event again
        events.emit(ctx, "policy.updated", rec["tenant_id"],
                    data=_event_data(merged, sorted(k for k, v in changes.items() if rec.get(k) != v)))
        try:
            stored = await st.store.save_doc(KIND, rec["tenant_id"], rec["policy_id"], merged, rec["version"])
            return json_response(ctx, _wire(stored or merged))
        except VersionConflict:
            continue
    raise VersionConflict(f"policy {rec['policy_id']}")


async def delete_policy(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "policies:write")
    st = state_of(request)
    for _ in range(5):
        rec = await _owned(request, principal, request.path_params["policy_id"])
        audit.target_tenant(ctx, rec["tenant_id"])
        events.drop_events(ctx)
        events.emit(ctx, "policy.deleted", rec["tenant_id"], data=_event_data(rec))
        try:
            await st.store.save_doc(KIND, rec["tenant_id"], rec["policy_id"], None, rec["version"])
            return Response(status_code=204, headers={"X-Request-Id": ctx.request_id, "X-Cycles-Trace-Id": ctx.trace_id})
        except VersionConflict:
            continue
    raise VersionConflict(f"policy {request.path_params['policy_id']}")


async def list_policies(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "policies:read")
    q = request.query_params
    tenant = query_tenant(principal, q)
    pattern = str_param(q, "scope_pattern", max_length=1024)
    status = enum_param(q, "status", ("ACTIVE", "DISABLED"))
    quotas = bool_param(q, "has_action_quotas")
    kind = str_param(q, "references_action_kind", max_length=64)
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    fh = filter_hash({"t": tenant, "p": pattern, "s": status, "q": quotas, "k": kind})
    cursor = decode_cursor(q.get("cursor"), fh)
    after = cursor.get("k") if cursor else None
    if after is not None and not isinstance(after, str):
        raise bad("cursor is not a cursor this server issued")
    rows = [r for r in await state_of(request).store.list_docs(KIND, tenant)
            if (pattern is None or r["scope_pattern"] == pattern) and (status is None or r["status"] == status)
            and (after is None or r["policy_id"] > after)
            and (quotas is None or bool(r.get("action_quotas") or r.get("risk_class_quotas")) == quotas)
            and (kind is None or _references(r, kind))]
    rows.sort(key=lambda r: r["policy_id"])
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor({"k": page[-1]["policy_id"], "f": fh}) if more else None
    return json_response(ctx, g.PolicyListResponse(policies=[_wire(r) for r in page], next_cursor=next_cursor,
                                                   has_more=more))


def _references(rec: dict[str, Any], kind: str) -> bool:
    return (kind in (rec.get("allowed_action_kinds") or ()) or kind in (rec.get("denied_action_kinds") or ())
            or any(q.get("action_kind") == kind for q in rec.get("action_quotas") or ()))


async def resolve_for(store: Store, tenant: str, scopes: list[str]) -> P.Resolution:
    """What the tenant's policies impose on a reservation at `scopes`, evaluated now."""
    policies = await store.list_docs(KIND, tenant)
    if not policies:
        return P.Resolution()
    return P.resolve(policies, scopes, await store.now_ms())
