"""v0.1.26 action-kind routes: the public registry (GET /v1/action-kinds, /v1/action-kinds/{kind}) and the
operator view of action quota counters (GET /v1/admin/action-quota-counters, POST .../reset)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import actions as A
from ..protocol import actions as w
from ..protocol.errors import ErrorCode, ProtocolError
from . import access, audit, events
from .admin import query_tenant
from .http import Ctx, decode, json_response, read_body
from .params import bad, bool_param, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, iso, str_param
from .state import state_of
from .throttle import PublicLimit

# The registry is unauthenticated: per source address, at most this many answers a minute (304s are free),
# shared by every server of a Redis store.
PUBLIC_PER_MINUTE = int(os.environ.get("CYCLES_ACTION_KINDS_PER_MINUTE", "60"))
_public = PublicLimit("action-kinds", PUBLIC_PER_MINUTE)


def _etag() -> str:
    reg = A.registry()
    digest = hashlib.sha256(msgspec.json.encode([reg.version, list(reg.builtin.values())])).hexdigest()[:32]
    return f'"{digest}"'


async def _cached_or_throttled(request: Request, ctx: Ctx, etag: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "X-Request-Id": ctx.request_id,
                                                  "X-Cycles-Trace-Id": ctx.trace_id})
    source = request.client.host if request.client else "-"
    retry = await _public.retry_after(state_of(request).store, source)
    if retry is not None:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"Too many registry requests; retry in {retry} s", status=429,
                            headers={"Retry-After": str(retry)})
    return None


def _with_etag(resp: Response, etag: str) -> Response:
    resp.headers["ETag"] = etag
    resp.headers["Cache-Control"] = "public, max-age=3600"
    return resp


async def list_action_kinds(request: Request, ctx: Ctx) -> Response:
    etag = _etag()
    q = request.query_params
    risk = enum_param(q, "risk_class", A.RISK_CLASSES)
    deprecated = bool_param(q, "deprecated") or False
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    fh = filter_hash({"r": risk, "d": deprecated})
    cursor = decode_cursor(q.get("cursor"), fh)
    after = cursor.get("k") if cursor else None
    if after is not None and not isinstance(after, str):
        raise bad("cursor is not a cursor this server issued")
    cached = await _cached_or_throttled(request, ctx, etag)
    if cached is not None:
        return cached
    kinds = [k for k in A.registry().builtin.values()
             if (risk is None or k["risk_class"] == risk) and (deprecated or not k.get("deprecated"))
             and (after is None or k["kind"] > after)]
    kinds.sort(key=lambda k: k["kind"])
    page, more = kinds[:limit], len(kinds) > limit
    body = w.ActionKindRegistry(version=A.registry().version, kinds=[msgspec.convert(k, w.ActionKind) for k in page],
                                has_more=more,
                                next_cursor=encode_cursor({"k": page[-1]["kind"], "f": fh}) if more else None)
    return _with_etag(json_response(ctx, body), etag)


async def get_action_kind(request: Request, ctx: Ctx) -> Response:
    etag = _etag()
    kind = request.path_params["kind"]
    cached = await _cached_or_throttled(request, ctx, etag)
    if cached is not None:
        return cached
    entry = A.registry().builtin.get(kind) if len(kind) <= 64 else None
    if entry is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Action kind {kind[:64]} is not in the registry")
    return _with_etag(json_response(ctx, msgspec.convert(entry, w.ActionKind)), etag)


# ---- counters ----

def _state(rec: dict[str, Any]) -> w.ActionQuotaState:
    scope, kind, risk, window, window_key = A.split_key(rec["counter"])
    used, limit = int(rec["used"]), int(rec.get("limit") or 1)
    return w.ActionQuotaState(
        action_kind=kind, risk_class=risk, scope=scope, scope_path=scope, window=window, window_key=window_key,
        used=used, limit=limit, remaining=max(0, limit - used), policy_id=rec.get("policy_id") or None,
        expires_at=iso(int(rec["expires_at_ms"])) if window != "per_run" and rec.get("expires_at_ms") else None,
        last_incremented_at=iso(int(rec["last_ms"])) if rec.get("last_ms") else None)


async def _counter_reader(request: Request, ctx: Ctx) -> tuple[Any, bool]:
    """Admin key, or a tenant key with action_quotas:read, or (deprecated, v0.1.26 only) balances:read."""
    principal = await access.authenticate(request, ctx, allow_admin=True)
    if principal.is_admin:
        return principal, False
    try:
        principal.require("action_quotas:read")
        return principal, False
    except ProtocolError:
        principal.require("balances:read")
        return principal, True


async def list_counters(request: Request, ctx: Ctx) -> Response:
    principal, deprecated = await _counter_reader(request, ctx)
    q = request.query_params
    tenant = query_tenant(principal, q)
    scope = str_param(q, "scope", max_length=1024)
    kind = str_param(q, "action_kind", max_length=64)
    window = enum_param(q, "window", A.WINDOWS)
    run_id = str_param(q, "run_id", max_length=256)
    include_zero = bool_param(q, "include_zero") or False
    limit = int_param(q, "limit", default=50, lo=1, hi=200)
    fh = filter_hash({"t": tenant, "s": scope, "k": kind, "w": window, "r": run_id, "z": include_zero})
    cursor = decode_cursor(q.get("cursor"), fh)
    after = cursor.get("k") if cursor else None
    if after is not None and not isinstance(after, str):
        raise bad("cursor is not a cursor this server issued")
    rows = []
    for rec in await state_of(request).store.action_counters(tenant):
        c_scope, c_kind, _risk, c_window, c_key = A.split_key(rec["counter"])
        if ((scope is None or c_scope.startswith(scope.lower())) and (kind is None or c_kind == kind)
                and (window is None or c_window == window) and (run_id is None or (c_window == "per_run"
                                                                                   and c_key == run_id))
                and (include_zero or int(rec["used"]) > 0) and (after is None or rec["counter"] > after)):
            rows.append(rec)
    page, more = rows[:limit], len(rows) > limit
    body = w.ActionQuotaCounterListResponse(
        counters=[_state(r) for r in page], has_more=more,
        next_cursor=encode_cursor({"k": page[-1]["counter"], "f": fh}) if more else None)
    resp = json_response(ctx, body)
    resp.headers["X-Cycles-Tenant"] = tenant
    if deprecated:
        resp.headers["X-Cycles-Permission-Deprecated"] = "balances:read"
    return resp


async def reset_counter(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    req = decode(await read_body(request), w.ActionQuotaCounterResetRequest)
    if not req.tenant_id:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "tenant_id is required",
                            details={"missing_required_field": "tenant_id"})
    if (req.action_kind == A.RISK) != (req.risk_class is not None):
        raise bad("risk_class is required with action_kind __risk__, and only then")
    key = f"{A.counter_key(req.scope.lower(), req.action_kind, req.risk_class, req.window)}|{req.window_key}"
    audit.target_tenant(ctx, req.tenant_id)
    audit.resource(ctx, key)
    events.emit(ctx, "quota.counter_reset", req.tenant_id, scope=req.scope.lower(),
                correlation_id="quota:" + hashlib.sha256(key.encode()).hexdigest()[:32], data={
                    "scope": req.scope.lower(), "action_kind": req.action_kind, "risk_class": req.risk_class,
                    "window": req.window, "window_key": req.window_key, "actor_id": principal.key_id or "admin",
                    "reason": req.reason, "tenant_id": req.tenant_id}, data_from_result=True)
    rec = await state_of(request).store.reset_action_counter(req.tenant_id, key)
    return json_response(ctx, w.ActionQuotaCounterResetResponse(counter=_state(rec),
                                                                previous_used=rec["previous_used"]))
