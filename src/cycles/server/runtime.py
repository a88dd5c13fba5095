"""Runtime routes of cycles-protocol-v0: reservations, decide, balances, events."""

from __future__ import annotations

import hashlib
from typing import Any, Awaitable, Callable, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import policies as P
from ..core import scopes as S
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import EventCommand, ReservationQuery, ReserveCommand, SettleCommand, StaleGovernance
from . import render
from .auth import Principal
from .govcache import TenantView
from .http import Ctx, check_idempotency_header, decode, json_response, read_body
from .params import (
    bad, bool_param, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, str_param, time_param,
)
from . import access, action_rules, events, evidence, policies
from .state import state_of

T = TypeVar("T")
_ATTEMPTS = 3
RESERVATION_STATUSES = ("ACTIVE", "COMMITTED", "RELEASED", "EXPIRED")
SORT_KEYS = ("reservation_id", "tenant", "scope_path", "status", "reserved", "created_at_ms", "expires_at_ms")


async def _auth(request: Request, ctx: Ctx, permission: str, *, allow_admin: bool = False,
                runtime: bool = False) -> Principal:
    principal = access.cached(request, ctx) if runtime else None
    if principal is None:
        principal = await access.authenticate(request, ctx, allow_admin=allow_admin, runtime=runtime)
    try:
        principal.require(permission)
    except ProtocolError:
        if await _current(request, ctx, principal):
            raise
        principal = await access.authenticate(request, ctx, allow_admin=allow_admin, runtime=runtime)
        principal.require(permission)
    return principal


async def _current(request: Request, ctx: Ctx, principal: Principal) -> bool:
    """After a refusal decided on cached data (a permission, a scope filter): whether the cache was current,
    so the refusal stands. Allowing on stale data is caught by the store; refusing is caught here."""
    if ctx.view is None:
        return True
    st = state_of(request)
    if await st.store.governance_gen(principal.tenant_id or "") == ctx.view.gen:
        return True
    st.auth.forget(principal.tenant_id or "")
    ctx.view = None
    return False


async def _acting(request: Request, ctx: Ctx, permission: str, principal: Principal,
                  act: Callable[[Principal, int | None], Awaitable[T]], *, allow_admin: bool = False) -> T:
    """Run a runtime operation for a key checked through the governance cache (govcache): the store refuses
    it when the tenant's keys, record or policies changed since the cache was read (StaleGovernance), and
    it runs again on fresh reads. The last attempt goes unchecked, as an uncached request would, so a
    tenant whose governance changes continuously still gets answers."""
    for attempt in range(_ATTEMPTS):
        view = ctx.view
        gen = view.gen if view is not None and attempt < _ATTEMPTS - 1 else None
        try:
            return await act(principal, gen)
        except StaleGovernance:
            state_of(request).auth.forget(principal.tenant_id or "")
            ctx.view = None
        except ProtocolError as err:
            if err.status != 403 or gen is None or await _current(request, ctx, principal):
                raise
        principal = await _auth(request, ctx, permission, allow_admin=allow_admin, runtime=True)
    raise AssertionError("unreachable: the last attempt is never refused as stale")


def _tenant_record(ctx: Ctx, gen: int | None) -> dict[str, Any] | None:
    """The tenant record of the view whose generation the store will check (store.base.ReserveCommand)."""
    view = ctx.view
    return view.tenant if gen is not None and view is not None and view.gen == gen else None


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\x00")
    return digest.hexdigest()


# An agent sends the same subject on every call: its fields, scope path and scopes are derived once per
# distinct subject (without dimensions) and copied per request, so no request shares a mutable list or dict.
_SUBJECTS: dict[tuple[str | None, ...], tuple[dict[str, Any], str, list[str]]] = {}
_SUBJECTS_MAX = 10_000


def _subject(subject: m.Subject, principal: Principal) -> tuple[dict[str, Any], str, list[str]]:
    if subject.tenant is not None and subject.tenant.lower() != (principal.tenant_id or "").lower():
        if not any(getattr(subject, level) for level in S.LEVELS):
            raise bad("subject must contain at least one of tenant, workspace, app, workflow, agent, toolset")
        raise ProtocolError(ErrorCode.FORBIDDEN, "subject.tenant does not match the tenant of the API key")
    key = None
    if subject.dimensions is None:
        key = (subject.tenant, subject.workspace, subject.app, subject.workflow, subject.agent, subject.toolset)
        known = _SUBJECTS.get(key)
        if known is not None:
            return dict(known[0]), known[1], list(known[2])
    fields = msgspec.to_builtins(subject)
    if not any(fields.get(level) for level in S.LEVELS):
        raise bad("subject must contain at least one of tenant, workspace, app, workflow, agent, toolset")
    path, scopes = S.derive(fields)
    if key is not None:
        if len(_SUBJECTS) >= _SUBJECTS_MAX:
            _SUBJECTS.clear()
        _SUBJECTS[key] = (dict(fields), path, list(scopes))
    return fields, path, scopes


async def _govern(store: Any, principal: Principal, cmd: ReserveCommand, view: TenantView | None) -> bool:
    """Apply the key's scope_filter and the tenant's policies to a reservation request; returns whether the
    request or the policies use v0.1.26 action governance."""
    principal.require_scope(cmd.scope_path)
    if view is not None and not view.policies:
        # a tenant without policies (the view is current: the store checks its generation with the operation)
        # has nothing to resolve: no caps, limits or store arguments, and no action rules to plan
        if cmd.action["kind"].startswith("custom."):
            await action_rules.plan(store, cmd, view)  # an unknown custom kind is still refused
        return action_rules.uses_extension(cmd, False)
    if view is None:
        res = await policies.resolve_for(store, cmd.tenant, cmd.scopes)
    else:
        res = P.resolve(view.policies, cmd.scopes, await store.now_ms() if view.timed else 0)
    cmd.caps = res.caps
    cmd.policy = res.store_args()
    for lim in res.limits:
        bucket = (lim.bucket, lim.limit, lim.policy_id, lim.scope)
        (cmd.limits if lim.kind == "reserve" else cmd.commit_limits).append(bucket)
    return action_rules.uses_extension(cmd, await action_rules.plan(store, cmd, view))


def _denied(ctx: Ctx, cmd: ReserveCommand, reason: str, details: dict[str, Any] | None) -> None:
    details = details or {}
    # the event always carries a DenyDetail (v0.1.26), whoever asked
    detail = action_rules.error_detail(reason, details)["deny_detail"]
    events.emit(ctx, "reservation.denied", cmd.tenant, scope=details.get("scope") or cmd.scope_path, observation=True,
                data={"scope": cmd.scope_path, "unit": cmd.unit, "reason_code": reason, "requested_amount": cmd.amount,
                      "subject": cmd.subject, "action": cmd.action,
                      "policy_id": details.get("policy_id") or detail.get("blocked_by_policy"),
                      "deny_detail": detail, "dry_run": cmd.dry_run or cmd.endpoint == "decide"})


def _rid(request: Request) -> str:
    rid = request.path_params["reservation_id"]
    if not 1 <= len(rid) <= 128:
        raise bad("reservation_id must be 1 to 128 characters")
    return rid


# The hot routes' handlers return the coroutine of the shared implementation instead of awaiting it in one
# of their own (one frame and suspension fewer per request); the endpoint wrapper awaits it the same.
def create_reservation(request: Request, ctx: Ctx) -> Awaitable[Response]:
    return _evaluate(request, ctx, m.ReservationCreateRequest, "reserve")


def decide(request: Request, ctx: Ctx) -> Awaitable[Response]:
    return _evaluate(request, ctx, m.DecisionRequest, "decide")


async def _evaluate(request: Request, ctx: Ctx, typ: type, endpoint: str) -> Response:
    """createReservation (live and dry run) and decide: the same evaluation, one store step."""
    principal = await _auth(request, ctx, "reservations:create", runtime=True)
    raw = getattr(request, "received", None)  # the direct path read the whole body with the head
    if raw is None:
        raw = await read_body(request)
    req = decode(raw, typ)
    check_idempotency_header(request, req.idempotency_key)
    subject, path, scopes = _subject(req.subject, principal)
    payload_hash = _hash(m.canonical(req))
    dry_run = endpoint == "reserve" and req.dry_run
    st = state_of(request)
    emit = st.evidence is not None and st.evidence.emit
    action_rules.warn_deprecated(ctx, req.action.kind)

    async def act(principal: Principal, gen: int | None) -> tuple[ReserveCommand, Any, bool]:
        cmd = ReserveCommand(
            tenant=principal.tenant_id or "", endpoint=endpoint, idempotency_key=req.idempotency_key,
            payload_hash=payload_hash, subject=subject, action=msgspec.to_builtins(req.action),
            unit=req.estimate.unit, amount=req.estimate.amount, scope_path=path, scopes=scopes, metadata=req.metadata,
            gen=gen, tenant_record=_tenant_record(ctx, gen))
        if endpoint == "reserve":
            cmd.dry_run, cmd.ttl_ms, cmd.grace_ms, cmd.overage_policy = (req.dry_run, req.ttl_ms, req.grace_period_ms,
                                                                         req.overage_policy)
            cmd.observe_mode = req.observe_mode
        aware = await _govern(st.store, principal, cmd, ctx.view)
        try:
            return cmd, await st.store.reserve(cmd), aware
        except ProtocolError as err:
            if err.status in (409, 429):  # budget, governance and policy denials, not malformed requests
                if aware and err.status == 409:
                    err.details = action_rules.error_detail(err.code.value, err.details)
                st.metrics.decision(endpoint, "DENY", err.code.value)
                _denied(ctx, cmd, err.code.value, err.details)
            raise

    try:
        cmd, out, aware = await _acting(request, ctx, "reservations:create", principal, act)
    except ProtocolError as err:
        if emit:
            await evidence.stamp_denial(request, ctx, endpoint, raw, err)
        raise
    body = render.reservation_create(out) if endpoint == "reserve" else render.decision(out)
    shadow = bool(out.result.get("observed"))
    if body.decision == "DENY" and body.deny_detail is None and (aware or shadow):
        body.deny_detail = action_rules.base_detail(out.result)
    if not out.replay:
        reason = body.reason_code or body.decision
        st.metrics.decision("observe" if shadow else "dry_run" if dry_run else endpoint, body.decision, reason)
        if shadow:
            action_rules.observed(ctx, cmd, body.decision, body.reason_code, body.deny_detail, out.result.get("caps"))
        elif body.decision == "DENY":
            _denied(ctx, cmd, reason, {"deny_detail": body.deny_detail or action_rules.base_detail(out.result)})
    if emit:
        await evidence.stamp(request, ctx, endpoint, raw, body, out, tenant=principal.tenant_id)
    return json_response(ctx, body)


async def _settle(request: Request, ctx: Ctx, kind: str) -> Response:
    rid = _rid(request)
    permission = f"reservations:{kind}"
    allow_admin = kind == "release"
    principal = await _auth(request, ctx, permission, allow_admin=allow_admin, runtime=True)
    typ = {"commit": m.CommitRequest, "release": m.ReleaseRequest, "extend": m.ReservationExtendRequest}[kind]
    raw = getattr(request, "received", None)  # the direct path read the whole body with the head
    if raw is None:
        raw = await read_body(request)
    req = decode(raw, typ)
    check_idempotency_header(request, req.idempotency_key)
    payload_hash = _hash(rid.encode(), m.canonical(req))
    st = state_of(request)
    store = st.store
    emit = kind != "extend" and st.evidence is not None and st.evidence.emit

    async def act(principal: Principal, gen: int | None) -> Response:
        cmd = SettleCommand(tenant=None if principal.is_admin else principal.tenant_id, reservation_id=rid,
                            idempotency_key=req.idempotency_key, payload_hash=payload_hash, gen=gen,
                            tenant_record=_tenant_record(ctx, gen))
        if isinstance(req, m.CommitRequest):
            cmd.actual, cmd.unit, cmd.metadata = req.actual.amount, req.actual.unit, req.metadata
            out = await store.commit(cmd)
            body: Any = render.commit(out)
        elif isinstance(req, m.ReleaseRequest):
            cmd.reason = req.reason
            out = await store.release(cmd)
            body = render.release(out)
        else:
            cmd.extend_by_ms = req.extend_by_ms
            return json_response(ctx, render.extend(await store.extend(cmd)))
        if emit:
            await evidence.stamp(request, ctx, kind, raw, body, out, tenant=cmd.tenant, rid=rid)
        return json_response(ctx, body)

    if not emit:
        return await _acting(request, ctx, permission, principal, act, allow_admin=allow_admin)
    try:
        return await _acting(request, ctx, permission, principal, act, allow_admin=allow_admin)
    except ProtocolError as err:
        await evidence.stamp_denial(request, ctx, kind, raw, err, rid=rid)
        raise


def commit(request: Request, ctx: Ctx) -> Awaitable[Response]:
    return _settle(request, ctx, "commit")


def release(request: Request, ctx: Ctx) -> Awaitable[Response]:
    return _settle(request, ctx, "release")


def extend(request: Request, ctx: Ctx) -> Awaitable[Response]:
    return _settle(request, ctx, "extend")


async def get_reservation(request: Request, ctx: Ctx) -> Response:
    rid = _rid(request)
    principal = await _auth(request, ctx, "reservations:list", allow_admin=True)
    st = state_of(request)
    rec = await st.store.get_reservation(rid)
    if rec is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Reservation {rid} not found")
    if not principal.is_admin and rec["tenant_id"] != principal.tenant_id:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"Reservation {rid} belongs to another tenant")
    now = await st.store.now_ms()
    if rec["status"] == "EXPIRED" or (rec["status"] == "ACTIVE" and now > rec["deadline_ms"]):
        raise ProtocolError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {rid} has expired",
                            details={"expires_at_ms": rec["expires_at_ms"]})
    detail = render.reservation(rec, detail=True)
    if st.evidence is not None and st.evidence.emit:
        detail.evidence = (await evidence.reservation_evidence(st.evidence, st.store, [rid]))[0]
    return json_response(ctx, detail)


async def list_reservations(request: Request, ctx: Ctx) -> Response:
    principal = await _auth(request, ctx, "reservations:list", allow_admin=True)
    q = request.query_params
    tenant_param = str_param(q, "tenant", max_length=128)
    if principal.is_admin:
        if tenant_param is None:
            raise bad("tenant query parameter is required when using admin key authentication")
        tenant = tenant_param
    else:
        if tenant_param is not None and tenant_param.lower() != (principal.tenant_id or "").lower():
            raise ProtocolError(ErrorCode.FORBIDDEN, "tenant does not match the tenant of the API key")
        tenant = principal.tenant_id or ""
    query = ReservationQuery(tenant=tenant, limit=int_param(q, "limit", default=50, lo=1, hi=200))
    query.status = enum_param(q, "status", RESERVATION_STATUSES)
    query.idempotency_key = str_param(q, "idempotency_key")
    for level in S.LEVELS[1:]:
        value = str_param(q, level, max_length=128)
        if value is not None:
            query.subject[level] = value
    for col, lo_name, hi_name in (("created_at_ms", "from", "to"), ("expires_at_ms", "expires_from", "expires_to"),
                                   ("finalized_at_ms", "finalized_from", "finalized_to")):
        lo, hi = time_param(q, lo_name), time_param(q, hi_name)
        if lo is not None and hi is not None and lo > hi:
            raise bad(f"{lo_name} must not be after {hi_name}")
        if lo is not None or hi is not None:
            query.windows[col] = (lo, hi)
    query.sort_by = enum_param(q, "sort_by", SORT_KEYS) or "created_at_ms"
    query.sort_dir = enum_param(q, "sort_dir", ("asc", "desc")) or "desc"
    include = frozenset(t.strip() for t in (q.get("include") or "").split(",") if t.strip())
    filters = filter_hash({"t": tenant, "s": query.status, "k": query.idempotency_key, "subj": query.subject,
                           "w": {k: list(v) for k, v in query.windows.items()}, "sb": query.sort_by, "sd": query.sort_dir})
    cursor = decode_cursor(q.get("cursor"), filters)
    if cursor is not None:
        if not isinstance(cursor.get("id"), str):
            raise bad("cursor is not a cursor this server issued")
        query.after = (cursor.get("v"), cursor["id"])
    st = state_of(request)
    page = await st.store.list_reservations(query)
    items = [render.reservation(rec, include) for rec in page.items]
    if "evidence" in include and st.evidence is not None and st.evidence.emit and items:
        found = await evidence.reservation_evidence(st.evidence, st.store, [i.reservation_id for i in items])
        for item, ev in zip(items, found):
            item.evidence = ev
    next_cursor = None
    if page.has_more and page.items:
        last = page.items[-1]
        sort_col = {"tenant": "tenant_id", "reserved": "amount"}.get(query.sort_by, query.sort_by)
        next_cursor = encode_cursor({"v": last[sort_col], "id": last["reservation_id"], "f": filters})
    return json_response(ctx, m.ReservationListResponse(reservations=items, next_cursor=next_cursor,
                                                        has_more=page.has_more))


async def balances(request: Request, ctx: Ctx) -> Response:
    principal = await _auth(request, ctx, "balances:read")
    q = request.query_params
    wanted: dict[str, str] = {}
    for level in S.LEVELS:
        value = str_param(q, level, max_length=128)
        if value is not None:
            wanted[level] = value.lower()
    if not wanted:
        raise bad("at least one of tenant, workspace, app, workflow, agent, toolset is required")
    tenant = principal.tenant_id or ""
    if "tenant" in wanted and wanted["tenant"] != tenant.lower():
        raise ProtocolError(ErrorCode.FORBIDDEN, "tenant does not match the tenant of the API key")
    include_children = bool_param(q, "include_children") or False
    limit = int_param(q, "limit", default=50, lo=1, hi=200)
    filters = filter_hash({"t": tenant, "w": wanted, "c": include_children})
    cursor = decode_cursor(q.get("cursor"), filters)
    after = None
    if cursor is not None:
        if not (isinstance(cursor.get("s"), str) and isinstance(cursor.get("u"), str)):
            raise bad("cursor is not a cursor this server issued")
        after = (cursor["s"], cursor["u"])
    page = await state_of(request).store.balances(tenant, wanted, include_children, limit, after)
    items = [render.ledger_balance(item["ledger"]) for item in page.items]
    next_cursor = None
    if page.has_more and page.items:
        last = page.items[-1]["ledger"]
        next_cursor = encode_cursor({"s": last.scope, "u": last.unit, "f": filters})
    return json_response(ctx, m.BalanceResponse(balances=items, next_cursor=next_cursor, has_more=page.has_more))


async def create_event(request: Request, ctx: Ctx) -> Response:
    principal = await _auth(request, ctx, "reservations:commit", runtime=True)
    req = decode(await read_body(request), m.EventCreateRequest)
    check_idempotency_header(request, req.idempotency_key)
    subject, path, scopes = _subject(req.subject, principal)
    payload_hash = _hash(m.canonical(req))
    store = state_of(request).store

    async def act(principal: Principal, gen: int | None) -> Response:
        cmd = EventCommand(
            tenant=principal.tenant_id or "", idempotency_key=req.idempotency_key, payload_hash=payload_hash,
            subject=subject, action=msgspec.to_builtins(req.action), unit=req.actual.unit, amount=req.actual.amount,
            scope_path=path, scopes=scopes, overage_policy=req.overage_policy, metadata=req.metadata,
            metrics=msgspec.to_builtins(req.metrics) if req.metrics else None, client_time_ms=req.client_time_ms,
            gen=gen, tenant_record=_tenant_record(ctx, gen))
        return json_response(ctx, render.event(await store.create_event(cmd)), status=201)

    return await _acting(request, ctx, "reservations:commit", principal, act)
