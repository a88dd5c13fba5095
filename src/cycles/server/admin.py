"""Provisioning routes at the reference admin paths (cycles-governance-admin-v0.1.25.yaml):
tenants, API keys, budgets and funding. The full admin plane builds on these."""

from __future__ import annotations

import hashlib
import secrets
from fractions import Fraction
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import scopes as S
from ..protocol import admin as a
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import FundCommand
from .auth import KEY_PREFIX_LEN, Principal, new_tenant_key
from .http import Ctx, decode, json_response, read_body
from .params import bad, bool_param, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, iso, parse_iso, str_param
from . import access, audit, events
from ..core import events as E
from .state import state_of

KEY_LIFETIME_MS = 90 * 24 * 3600 * 1000


async def _admin(request: Request, ctx: Ctx) -> Principal:
    return await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)


async def tenant_or_admin(request: Request, ctx: Ctx, permission: str) -> Principal:
    principal = await access.authenticate(request, ctx, allow_admin=True)
    principal.require(permission)
    if permission.endswith(":write") and not principal.is_admin:
        await refuse_if_suspended(request, principal.tenant_id or "")
    return principal


def owning_tenant(principal: Principal, body_tenant: str | None) -> str:
    """The tenant a create acts for: named in the body by an operator, the key's own for a tenant key
    (which must not name one: no creating objects for another tenant)."""
    if principal.is_admin:
        if not body_tenant:
            raise bad("tenant_id is required when using admin key authentication")
        return body_tenant
    if body_tenant is not None:
        raise bad("tenant_id must not be sent with a tenant API key; the key's tenant is used")
    return principal.tenant_id or ""


async def existing_tenant(store: Any, tenant_id: str) -> dict[str, Any]:
    """The tenant a create names, or 400: the spec answers a missing tenant on the creates of keys and
    budgets with 400 ("Invalid tenant"), and both say the same thing."""
    tenant = await store.get_tenant(tenant_id) if len(tenant_id) <= 64 else None
    if tenant is None:
        raise bad(f"Tenant {tenant_id[:64]} does not exist; create it first (POST /v1/admin/tenants, or "
                  f"`cycles admin tenants create {tenant_id[:64]} --name NAME`)")
    return tenant


def query_tenant(principal: Principal, q: Any) -> str:
    """The tenant a tenant-scoped read or fund acts on: ?tenant_id= for an operator (required), the
    key's own tenant for a tenant key."""
    if not principal.is_admin:
        return principal.tenant_id or ""
    tenant = str_param(q, "tenant_id", max_length=64)
    if tenant is None:
        raise bad("tenant_id query parameter is required when using admin key authentication")
    return tenant


async def refuse_if_suspended(request: Request, tenant_id: str) -> None:
    """A SUSPENDED tenant is read-only for its own keys (operators can still act on it); in-flight
    reservations may still be committed or released so no spend is lost."""
    rec = await state_of(request).store.get_tenant(tenant_id)
    if rec is not None and rec.get("status") == "SUSPENDED":
        raise ProtocolError(ErrorCode.TENANT_SUSPENDED, f"Tenant {tenant_id} is suspended; its keys are read-only")


def _tenant_wire(rec: dict[str, Any]) -> a.Tenant:
    fields = {k: v for k, v in rec.items() if k in a.Tenant.__struct_fields__}
    fields.setdefault("observe_mode", "ENFORCE")
    return a.Tenant(**fields)


async def create_tenant(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    req = decode(await read_body(request), a.TenantCreateRequest)
    audit.target_tenant(ctx, req.tenant_id)
    st = state_of(request)
    now = iso(await st.store.now_ms())
    record = msgspec.to_builtins(req)
    record.update(status="ACTIVE", created_at=now, updated_at=now)
    record.setdefault("default_commit_overage_policy", "ALLOW_IF_AVAILABLE")
    record.setdefault("default_reservation_ttl_ms", 60_000)
    record.setdefault("max_reservation_ttl_ms", 3_600_000)
    record.setdefault("max_reservation_extensions", 10)
    record.setdefault("reservation_expiry_policy", "AUTO_RELEASE")
    events.emit(ctx, "tenant.created", req.tenant_id, data={"tenant_id": req.tenant_id, "new_status": "ACTIVE"},
                only_if_created=True)
    stored, created = await st.store.create_tenant(record)
    if not created and stored.get("name") != req.name:
        raise ProtocolError(ErrorCode.DUPLICATE_RESOURCE, f"Tenant {req.tenant_id} exists with a different name")
    return json_response(ctx, _tenant_wire(stored), status=201 if created else 200)


async def get_tenant(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    tenant_id = request.path_params["tenant_id"]
    rec = await state_of(request).store.get_tenant(tenant_id) if len(tenant_id) <= 64 else None
    if rec is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id[:64]} not found")
    return json_response(ctx, _tenant_wire(rec))


async def update_tenant(request: Request, ctx: Ctx) -> Response:
    """Change a tenant's settings or status. CLOSED is terminal; the runtime refuses the tenant's
    mutations from the moment the flip commits (the full close cascade belongs to the admin plane)."""
    await _admin(request, ctx)
    tenant_id = request.path_params["tenant_id"]
    req = decode(await read_body(request), a.TenantUpdateRequest)
    st = state_of(request)
    if len(tenant_id) > 64:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id[:64]} not found")
    changes = msgspec.to_builtins(req)
    audit.target_tenant(ctx, tenant_id)
    before = await st.store.get_tenant(tenant_id)
    now_iso = iso(await st.store.now_ms())
    if before is not None:
        _tenant_events(ctx, before, changes, now_iso)
    rec = await st.store.update_tenant(tenant_id, changes, now_iso)
    if rec.get("cascade") == "PENDING":
        await finish_cascade(st.store, tenant_id)
        rec = await st.store.get_tenant(tenant_id) or rec
    return json_response(ctx, _tenant_wire(rec))


_SETTINGS = ("default_commit_overage_policy", "default_reservation_ttl_ms", "max_reservation_ttl_ms",
             "max_reservation_extensions", "observe_mode")


def _tenant_events(ctx: Ctx, before: dict[str, Any], changes: dict[str, Any], now_iso: str) -> None:
    """The events of a tenant PATCH: one for a status transition, one for changed defaults, one for
    other changed fields. The store refuses a change to a CLOSED tenant, and then none is written."""
    tenant = before["tenant_id"]
    old, new = before.get("status"), changes.get("status")
    if new and new != old:
        kind = {"SUSPENDED": "tenant.suspended", "CLOSED": "tenant.closed", "ACTIVE": "tenant.reactivated"}[new]
        # the cascade's events carry the same id (the stores build it from closed_at)
        corr = f"tenant_close_cascade:{tenant}:{now_iso}" if new == "CLOSED" else None
        events.emit(ctx, kind, tenant, data={"tenant_id": tenant, "previous_status": old, "new_status": new},
                    correlation_id=corr)
    changed = sorted(k for k, v in changes.items() if k != "status" and before.get(k) != v)
    settings = [k for k in changed if k in _SETTINGS]
    others = [k for k in changed if k not in _SETTINGS]
    if settings:
        events.emit(ctx, "tenant.settings_changed", tenant, data={"tenant_id": tenant, "changed_fields": settings})
    if others:
        events.emit(ctx, "tenant.updated", tenant, data={"tenant_id": tenant, "changed_fields": others})


async def finish_cascade(store: Any, tenant_id: str) -> None:
    """Run a CLOSED tenant's cascade to the end in bounded atomic steps. The CLOSED flip committed
    first, so every mutation of the tenant's objects is already refused while this runs; a crash
    leaves the tenant marked PENDING and startup finishes it."""
    while not await store.cascade_close(tenant_id):
        pass


async def create_api_key(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    req = decode(await read_body(request), a.ApiKeyCreateRequest)
    st = state_of(request)
    tenant = await existing_tenant(st.store, req.tenant_id)
    if tenant.get("status") == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {req.tenant_id} is closed")
    now = await st.store.now_ms()
    expires_ms = parse_iso(req.expires_at, "expires_at") if req.expires_at else now + KEY_LIFETIME_MS
    if expires_ms <= now:
        raise bad("expires_at must be in the future")
    secret = new_tenant_key()
    key_id = "key_" + secrets.token_hex(8)
    audit.resource(ctx, key_id)
    audit.target_tenant(ctx, req.tenant_id)

    permissions = list(dict.fromkeys(req.permissions)) if req.permissions is not None else list(a.DEFAULT_PERMISSIONS)
    events.emit(ctx, "api_key.created", req.tenant_id, data={"key_id": key_id, "key_name": req.name,
                                                            "new_status": "ACTIVE", "permissions": permissions})
    record = {
        "key_id": key_id, "key_prefix": secret[:KEY_PREFIX_LEN], "tenant_id": req.tenant_id, "name": req.name,
        "description": req.description, "permissions": permissions, "scope_filter": req.scope_filter,
        "status": "ACTIVE", "created_at": iso(now), "expires_at": iso(expires_ms), "expires_at_ms": expires_ms,
        "metadata": req.metadata, "secret_hash": await st.auth.hash_new(secret),
    }
    await st.store.create_api_key(record)
    st.auth.created(secret, key_id)
    body = a.ApiKeyCreateResponse(key_id=key_id, key_secret=secret, key_prefix=record["key_prefix"],
                                  tenant_id=req.tenant_id, created_at=record["created_at"],
                                  expires_at=record["expires_at"], permissions=permissions)
    return json_response(ctx, body, status=201)


def ledger_wire(rec: dict[str, Any]) -> a.BudgetLedger:
    led = rec["ledger"]
    unit = led.unit
    extra = rec.get("extra") or {}
    return a.BudgetLedger(
        ledger_id=rec["ledger_id"], scope=led.scope, unit=unit,
        allocated=m.Amount(unit=unit, amount=led.allocated),
        remaining=m.SignedAmount(unit=unit, amount=led.remaining),
        status=led.status, created_at=iso(rec["created_at_ms"]), tenant_id=rec["tenant_id"], scope_path=led.scope,
        reserved=m.Amount(unit=unit, amount=led.reserved), spent=m.Amount(unit=unit, amount=led.spent),
        debt=m.Amount(unit=unit, amount=led.debt), overdraft_limit=m.Amount(unit=unit, amount=led.overdraft_limit),
        is_over_limit=led.is_over_limit, commit_overage_policy=rec.get("commit_overage_policy"),
        rollover_policy=extra.get("rollover_policy"), period_start=extra.get("period_start"),
        period_end=extra.get("period_end"), updated_at=iso(rec["updated_at_ms"]), metadata=extra.get("metadata"),
    )


def _budget_scope(scope: str, tenant: str, name: str = "scope") -> str:
    try:
        pairs = S.parse(scope)
    except S.ScopeError as exc:
        raise bad(str(exc)) from None
    if pairs[0] != ("tenant", tenant.lower()):
        raise bad(f"{name} must start with tenant:{tenant}")
    return "/".join(f"{level}:{value}" for level, value in pairs)


def _same_unit(unit: str, *amounts: m.Amount | None) -> None:
    for amount in amounts:
        if amount is not None and amount.unit != unit:
            raise ProtocolError(ErrorCode.UNIT_MISMATCH, f"Amount unit {amount.unit} does not match the budget unit {unit}",
                                details={"requested_unit": amount.unit, "expected_units": [unit]})


def _period(req: a.BudgetCreateRequest) -> dict[str, Any]:
    """The period fields of a new budget (stored in its extra). A budget without period_start has
    no periods; with one it renews at every boundary by its rollover_policy (default NONE)."""
    from ..core import periods

    if req.period_start is None:
        if req.period_end or req.period_interval or req.period_timezone or req.rollover_policy not in (None, "NONE"):
            raise bad("period_start is required with period_end, period_interval, period_timezone or a rollover_policy")
        return {"rollover_policy": req.rollover_policy} if req.rollover_policy else {}
    start = parse_iso(req.period_start, "period_start")
    try:
        if req.period_end is None:
            if req.period_interval is None:
                raise periods.PeriodError("period_end or period_interval is required with period_start")
            end = periods.boundary(start, start, 1, req.period_interval, req.period_timezone)
        else:
            end = parse_iso(req.period_end, "period_end")
        periods.validate(start, end, req.period_interval, req.period_timezone)
    except periods.PeriodError as exc:
        raise bad(str(exc)) from None
    return {"rollover_policy": req.rollover_policy or "NONE", "period_start": iso(start), "period_end": iso(end),
            "period_interval": req.period_interval, "period_timezone": req.period_timezone,
            "period_anchor_ms": start, "period_first_end_ms": end, "period_end_ms": end, "period_index": 0,
            "period_allocation": req.allocated.amount}


async def create_budget(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "budgets:write")
    req = decode(await read_body(request), a.BudgetCreateRequest)
    tenant = owning_tenant(principal, req.tenant_id)
    if principal.is_admin:  # a tenant key's own tenant exists; an operator may name any
        await existing_tenant(state_of(request).store, tenant)
    _same_unit(req.unit, req.allocated, req.overdraft_limit)
    extra: dict[str, Any] = {"metadata": req.metadata} if req.metadata is not None else {}
    extra.update(_period(req))
    record = {"tenant_id": tenant, "scope": _budget_scope(req.scope, tenant), "unit": req.unit,
              "allocated": req.allocated.amount,
              "overdraft_limit": req.overdraft_limit.amount if req.overdraft_limit else 0,
              "commit_overage_policy": req.commit_overage_policy, "extra": extra}
    events.emit(ctx, "budget.created", tenant, scope=record["scope"],
                data={"scope": record["scope"], "unit": req.unit, "operation": "CREATE",
                      "new_state": {"allocated": req.allocated.amount, "overdraft_limit": record["overdraft_limit"]}})
    rec = await state_of(request).store.create_budget(record)
    return json_response(ctx, ledger_wire(rec), status=201)


BUDGET_SORTS = ("tenant_id", "scope", "unit", "status", "commit_overage_policy", "utilization", "debt")
MAX_SORTED_BUDGETS = 20_000


def _fraction(q: Any, name: str) -> Fraction | None:
    """A utilization bound in [0, 1], kept exact: amounts are never compared through floats."""
    raw = q.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = Fraction(raw.strip())
    except (ValueError, ZeroDivisionError):
        raise bad(f"{name} must be a number between 0 and 1") from None
    if not 0 <= value <= 1:
        raise bad(f"{name} must be between 0 and 1")
    return value


def utilization(rec: dict[str, Any]) -> Fraction:
    led = rec["ledger"]
    return Fraction(led.spent, led.allocated) if led.allocated > 0 else Fraction(0)


def _sort_value(rec: dict[str, Any], sort_by: str) -> Any:
    led = rec["ledger"]
    return {"tenant_id": rec["tenant_id"], "scope": led.scope, "unit": led.unit, "status": led.status,
            "commit_overage_policy": rec.get("commit_overage_policy") or "", "utilization": utilization(rec),
            "debt": led.debt}[sort_by]


async def _list_budgets_sorted(request: Request, ctx: Ctx, tenant: str | None, filters: dict[str, Any],
                               ext: dict[str, Any], limit: int) -> Response:
    """Filters and orders the store cannot index: hydrate the candidates (bounded), then keyset-page."""
    store = state_of(request).store
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        page = await store.list_budgets(tenant, filters, 1000, after)
        rows += page.items
        if len(rows) > MAX_SORTED_BUDGETS:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"More than {MAX_SORTED_BUDGETS} budgets match; narrow the "
                                "filters (tenant_id, scope_prefix, unit, status)", status=400)
        if not page.has_more:
            break
        last = page.items[-1]
        after = (last["tenant_id"], last["ledger"].scope, last["ledger"].unit)
    lo, hi, search = ext["utilization_min"], ext["utilization_max"], ext["search"]
    rows = [r for r in rows if (lo is None or utilization(r) >= lo) and (hi is None or utilization(r) <= hi)
            and (search is None or search in r["tenant_id"].lower() or search in r["ledger"].scope.lower())]
    sort_by = ext["sort_by"] or "utilization"

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (_sort_value(r, sort_by), r["tenant_id"], r["ledger"].scope, r["ledger"].unit)

    rows.sort(key=key, reverse=ext["desc"])
    fh = filter_hash({"t": tenant, **filters, **{k: str(v) for k, v in ext.items()}})
    cursor = decode_cursor(request.query_params.get("cursor"), fh)
    if cursor is not None:
        k = cursor.get("k")
        if not (isinstance(k, list) and len(k) == 4 and all(isinstance(x, str) for x in k)):
            raise bad("cursor is not a cursor this server issued")
        try:
            first = Fraction(k[0]) if sort_by == "utilization" else int(k[0]) if sort_by == "debt" else k[0]
        except ValueError:
            raise bad("cursor is not a cursor this server issued") from None
        mark = (first, k[1], k[2], k[3])
        rows = [r for r in rows if (key(r) < mark if ext["desc"] else key(r) > mark)]
    page_rows, more = rows[:limit], len(rows) > limit
    next_cursor = None
    if more:
        last_key = key(page_rows[-1])
        next_cursor = encode_cursor({"k": [str(last_key[0]), *last_key[1:]], "f": fh})
    return json_response(ctx, a.BudgetListResponse(ledgers=[ledger_wire(r) for r in page_rows],
                                                   next_cursor=next_cursor, has_more=more))


async def list_budgets(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "budgets:read")
    q = request.query_params
    tenant = str_param(q, "tenant_id", max_length=64) if principal.is_admin else principal.tenant_id
    filters: dict[str, Any] = {
        "scope_prefix": str_param(q, "scope_prefix", max_length=1024),
        "unit": enum_param(q, "unit", m.UNITS),
        "status": enum_param(q, "status", ("ACTIVE", "FROZEN", "CLOSED")),
        "over_limit": bool_param(q, "over_limit"),
        "has_debt": bool_param(q, "has_debt"),
    }
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    extended = {"utilization_min": _fraction(q, "utilization_min"), "utilization_max": _fraction(q, "utilization_max"),
                "search": (str_param(q, "search", max_length=128) or "").strip().lower() or None,
                "sort_by": enum_param(q, "sort_by", BUDGET_SORTS),
                "desc": (enum_param(q, "sort_dir", ("asc", "desc")) or "desc") == "desc"}
    lo, hi = extended["utilization_min"], extended["utilization_max"]
    if lo is not None and hi is not None and lo > hi:
        raise bad("utilization_min must not exceed utilization_max")
    if any(extended[k] is not None for k in ("utilization_min", "utilization_max", "search", "sort_by")):
        return await _list_budgets_sorted(request, ctx, tenant, filters, extended, limit)
    fh = filter_hash({"t": tenant, **filters})
    cursor = decode_cursor(q.get("cursor"), fh)
    after = None
    if cursor is not None:
        k = cursor.get("k")
        if not (isinstance(k, list) and len(k) == 3 and all(isinstance(x, str) for x in k)):
            raise bad("cursor is not a cursor this server issued")
        after = tuple(k)
    page = await state_of(request).store.list_budgets(tenant, filters, limit, after)  # type: ignore[arg-type]
    next_cursor = None
    if page.has_more and page.items:
        last = page.items[-1]
        next_cursor = encode_cursor({"k": [last["tenant_id"], last["ledger"].scope, last["ledger"].unit], "f": fh})
    return json_response(ctx, a.BudgetListResponse(ledgers=[ledger_wire(r) for r in page.items],
                                                   next_cursor=next_cursor, has_more=page.has_more))


async def fund_budget(request: Request, ctx: Ctx) -> Response:
    principal = await tenant_or_admin(request, ctx, "budgets:write")
    q = request.query_params
    tenant = query_tenant(principal, q)
    scope_raw, unit = str_param(q, "scope", max_length=1024), enum_param(q, "unit", m.UNITS)
    if scope_raw is None or unit is None:
        raise bad("scope and unit query parameters are required")
    scope = _budget_scope(scope_raw, tenant)
    raw = await read_body(request)
    req = decode(raw, a.BudgetFundingRequest)
    header = request.headers.get("x-idempotency-key")
    if header is not None and header != req.idempotency_key:
        raise bad("X-Idempotency-Key header and body idempotency_key must match")
    _same_unit(unit, req.amount, req.spent)
    payload = hashlib.sha256(scope.encode() + b"\x00" + unit.encode() + b"\x00" + m.canonical(req)).hexdigest()
    cmd = FundCommand(tenant=tenant, scope=scope, unit=unit, operation=req.operation, amount=req.amount.amount,
                      spent=req.spent.amount if req.spent else None, idempotency_key=req.idempotency_key,
                      payload_hash=payload, reason=req.reason)
    events.emit(ctx, E.FUNDING_EVENTS[req.operation], tenant, scope=scope, data_from_result=True,
                data={"scope": scope, "unit": unit, "reason": req.reason,
                      "spent_override_provided": req.spent is not None if req.operation == "RESET_SPENT" else None})
    out = await state_of(request).store.fund(cmd)
    r = out.result
    u = r["unit"]
    pa, pr, pd, ps = r["previous"]
    na, nr, nd, ns = r["new"]
    body = a.BudgetFundingResponse(
        operation=r["operation"], previous_allocated=m.Amount(unit=u, amount=pa), new_allocated=m.Amount(unit=u, amount=na),
        previous_remaining=m.SignedAmount(unit=u, amount=pr), new_remaining=m.SignedAmount(unit=u, amount=nr),
        previous_debt=m.Amount(unit=u, amount=pd), new_debt=m.Amount(unit=u, amount=nd),
        previous_spent=m.Amount(unit=u, amount=ps), new_spent=m.Amount(unit=u, amount=ns),
        timestamp=iso(r["timestamp_ms"]),
    )
    return json_response(ctx, body)
