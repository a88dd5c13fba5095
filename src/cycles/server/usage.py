"""Usage over time, denial analytics and the live event stream (for the dashboard; plain API routes).

Nothing here is recorded on the hot path: spend over time is derived from what reserve/commit already
write (each COMMITTED reservation keeps its scope path, subject, action, unit, committed amount and
finalization time; each post-only event of POST /v1/events its charged amount and time), and denials
from the `reservation.denied` observations in the event log. So a tenant that never asks pays nothing
on reserve/commit. Each query reads a bounded number of rows
(MAX_SCAN); when the bound is hit the answer says `truncated: true` and covers the newest rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..core import scopes as S
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import AuditScan
from . import access
from .admin import _budget_scope
from .events import event_wire
from .http import Ctx, json_response
from .params import bad, bool_param, enum_param, int_param, iso, str_param, time_param
from .state import state_of

MAX_SCAN = 50_000
DEFAULT_WINDOW_MS = 24 * 3600 * 1000
MAX_BUCKETS = 1000
GROUPS = ("workspace", "app", "workflow", "agent", "toolset", "action_kind", "action_name", "scope", "unit")
TOP = 50


class UsagePoint(msgspec.Struct, omit_defaults=True):
    start: str
    start_ms: int
    amount: int
    count: int


class UsageGroup(msgspec.Struct, omit_defaults=True):
    key: str
    amount: int
    count: int


class UnitUsage(msgspec.Struct, omit_defaults=True):
    unit: str
    total: int
    count: int  # reservations and post-only events counted
    series: list[UsagePoint]
    groups: list[UsageGroup] = []
    events: int = 0  # of `count`: post-only accounting events (POST /v1/events)


class UsageResponse(msgspec.Struct, omit_defaults=True):
    tenant_id: str
    from_: str = msgspec.field(name="from")
    to: str = ""
    bucket_seconds: int = 0
    units: list[UnitUsage] = []
    group_by: str | None = None
    scope_prefix: str | None = None
    scanned: int = 0
    truncated: bool = False


class DenialResponse(msgspec.Struct, omit_defaults=True):
    from_: str = msgspec.field(name="from")
    to: str = ""
    bucket_seconds: int = 0
    total: int = 0
    series: list[UsagePoint] = []
    by_reason: list[UsageGroup] = []
    by_scope: list[UsageGroup] = []
    by_agent: list[UsageGroup] = []
    by_tool: list[UsageGroup] = []
    by_policy: list[UsageGroup] = []
    by_kind: list[UsageGroup] = []
    tenant_id: str | None = None
    observed: bool = False
    scanned: int = 0
    truncated: bool = False


def _window(q: Any, now_ms: int) -> tuple[int, int, int]:
    to_ms = time_param(q, "to") or now_ms
    from_ms = time_param(q, "from")
    if from_ms is None:
        from_ms = to_ms - DEFAULT_WINDOW_MS
    if from_ms >= to_ms:
        raise bad("from must be before to")
    span_s = max(1, (to_ms - from_ms) // 1000)
    default_bucket = next((b for b in (60, 300, 900, 3600, 21600, 86400) if span_s // b <= 96), 86400 * 7)
    bucket_s = int_param(q, "bucket_seconds", default=default_bucket, lo=1, hi=31 * 86400)
    if span_s // bucket_s > MAX_BUCKETS:
        raise bad(f"bucket_seconds gives more than {MAX_BUCKETS} buckets for this window; choose a larger one")
    return from_ms, to_ms, bucket_s


def _within(scope_path: str, prefix: str | None) -> bool:
    return prefix is None or scope_path == prefix or scope_path.startswith(prefix + "/")


def _scope_prefix(q: Any, tenant: str) -> str | None:
    raw = str_param(q, "scope_prefix", max_length=1024)
    return None if raw is None else _budget_scope(raw, tenant, "scope_prefix")


def _group_key(rec: dict[str, Any], subject: dict[str, Any], action: dict[str, Any], group_by: str) -> str:
    if group_by == "action_kind":
        return str(action.get("kind") or "(none)")
    if group_by == "action_name":
        return str(action.get("name") or "(none)")
    if group_by == "scope":
        return rec["scope_path"]
    if group_by == "unit":
        return rec["unit"]
    return str(subject.get(group_by) or "(none)")


async def _usage(request: Request, ctx: Ctx, tenant: str, scope_filter: tuple[str, ...]) -> Response:
    q = request.query_params
    store = state_of(request).store
    from_ms, to_ms, bucket_s = _window(q, await store.now_ms())
    prefix = _scope_prefix(q, tenant)
    unit = enum_param(q, "unit", m.UNITS)
    group_by = enum_param(q, "group_by", GROUPS)
    page = await store.scan_spend(tenant, from_ms, to_ms, MAX_SCAN)
    bucket_ms = bucket_s * 1000
    first = from_ms - from_ms % bucket_ms
    n = (to_ms - first) // bucket_ms + 1
    per_unit: dict[str, dict[str, Any]] = {}
    for rec in page.items:
        if unit is not None and rec["unit"] != unit:
            continue
        scope_path = rec["scope_path"]
        if not _within(scope_path, prefix) or (scope_filter and not S.within_filter(scope_path, scope_filter)):
            continue
        amount = rec["amount"]
        u = per_unit.get(rec["unit"])
        if u is None:
            u = per_unit[rec["unit"]] = {"amount": [0] * n, "count": [0] * n, "groups": defaultdict(lambda: [0, 0]),
                                         "events": 0}
        i = (rec["at_ms"] - first) // bucket_ms
        if 0 <= i < n:
            u["amount"][i] += amount
            u["count"][i] += 1
            u["events"] += rec["source"] == "event"
        if group_by:
            g = u["groups"][_group_key(rec, rec["subject"], rec["action"], group_by)]
            g[0] += amount
            g[1] += 1
    units = []
    for name in sorted(per_unit):
        u = per_unit[name]
        series = [UsagePoint(start=iso(first + i * bucket_ms), start_ms=first + i * bucket_ms, amount=u["amount"][i],
                             count=u["count"][i]) for i in range(n)]
        groups = sorted((UsageGroup(key=k, amount=v[0], count=v[1]) for k, v in u["groups"].items()),
                        key=lambda x: (-x.amount, x.key))[:TOP]
        units.append(UnitUsage(unit=name, total=sum(u["amount"]), count=sum(u["count"]), series=series, groups=groups,
                               events=u["events"]))
    return json_response(ctx, UsageResponse(
        tenant_id=tenant, from_=iso(from_ms), to=iso(to_ms), bucket_seconds=bucket_s, units=units, group_by=group_by,
        scope_prefix=prefix, scanned=len(page.items), truncated=page.has_more))


async def admin_usage(request: Request, ctx: Ctx) -> Response:
    await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    tenant = str_param(request.query_params, "tenant_id", max_length=64)
    if tenant is None:
        raise bad("tenant_id query parameter is required")
    return await _usage(request, ctx, tenant, ())


async def tenant_usage(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx)
    if not any(p in principal.permissions for p in ("reservations:list", "balances:read", "budgets:read")):
        principal.require("reservations:list")
    return await _usage(request, ctx, principal.tenant_id or "", tuple(principal.scope_filter))


# ---- denials ----

async def _denials(request: Request, ctx: Ctx, tenant: str | None, scope_filter: tuple[str, ...]) -> Response:
    q = request.query_params
    store = state_of(request).store
    from_ms, to_ms, bucket_s = _window(q, await store.now_ms())
    # observed=true: the would-be denials of tenants in observe mode (reservation.observed_denied)
    observed = bool_param(q, "observed") or False
    wanted = "reservation.observed_denied" if observed else "reservation.denied"
    bucket_ms = bucket_s * 1000
    first = from_ms - from_ms % bucket_ms
    n = (to_ms - first) // bucket_ms + 1
    amount, reasons, scopes, agents, tools = [0] * n, _counter(), _counter(), _counter(), _counter()
    policies, kinds = _counter(), _counter()
    scanned, after, truncated = 0, None, False
    while True:
        rows = await store.scan_events(AuditScan(tenant=tenant, from_ms=from_ms, to_ms=to_ms, descending=True,
                                                 after=after, limit=1000))
        for row in rows:
            if row.get("event_type") != wanted:
                continue
            data = row.get("data") or {}
            detail = data.get("deny_detail") or {}
            scope = data.get("scope") or row.get("scope") or ""
            if scope_filter and not S.within_filter(scope, scope_filter):
                continue
            i = (int(row["timestamp_ms"]) - first) // bucket_ms
            if 0 <= i < n:
                amount[i] += 1
            reasons[data.get("reason_code") or detail.get("reason_code") or "(none)"] += 1
            scopes[scope] += 1
            subject, action = data.get("subject") or {}, data.get("action") or {}
            agents[subject.get("agent") or "(none)"] += 1
            tools[action.get("name") or action.get("kind") or "(none)"] += 1
            kinds[action.get("kind") or "(none)"] += 1
            policies[data.get("policy_id") or detail.get("blocked_by_policy") or "(none)"] += 1
        scanned += len(rows)
        if len(rows) < 1000:
            break
        if scanned >= MAX_SCAN:
            truncated = True
            break
        after = (rows[-1]["timestamp_ms"], rows[-1]["event_id"])
    return json_response(ctx, DenialResponse(
        from_=iso(from_ms), to=iso(to_ms), bucket_seconds=bucket_s, total=sum(amount), tenant_id=tenant,
        series=[UsagePoint(start=iso(first + i * bucket_ms), start_ms=first + i * bucket_ms, amount=amount[i],
                           count=amount[i]) for i in range(n)],
        by_reason=_top(reasons), by_scope=_top(scopes), by_agent=_top(agents), by_tool=_top(tools),
        by_policy=_top(policies), by_kind=_top(kinds), observed=observed, scanned=scanned, truncated=truncated))


def _counter() -> dict[str, int]:
    return defaultdict(int)


def _top(counts: dict[str, int]) -> list[UsageGroup]:
    return [UsageGroup(key=k, amount=v, count=v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]]


async def admin_denials(request: Request, ctx: Ctx) -> Response:
    await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    return await _denials(request, ctx, str_param(request.query_params, "tenant_id", max_length=64), ())


async def tenant_denials(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx)
    principal.require("events:read")
    return await _denials(request, ctx, principal.tenant_id, tuple(principal.scope_filter))


# ---- live events (server-sent events) ----

STREAM_POLL_S = 0.5
STREAM_HEARTBEAT_S = 15.0
STREAM_MAX_S = 300.0  # the client reconnects (with Last-Event-ID); bounds a forgotten tab's cost


def _resume_point(request: Request, now_ms: int) -> tuple[int, str]:
    last = request.headers.get("last-event-id") or ""
    ts, _, event_id = last.partition(":")
    if ts.isdigit() and event_id and len(last) <= 200:
        return int(ts), event_id
    return now_ms, ""


async def _stream(request: Request, ctx: Ctx, tenant: str | None, tenant_view: bool) -> Response:
    from .events import event_filters, event_matches

    f = event_filters(request.query_params, tenant_view)
    store = state_of(request).store
    last = _resume_point(request, await store.now_ms())

    async def body() -> Any:
        nonlocal last
        started = beat = time.monotonic()
        yield b"retry: 2000\n: connected\n\n"
        while time.monotonic() - started < STREAM_MAX_S:
            if await request.is_disconnected():
                return
            try:
                rows = await store.scan_events(AuditScan(tenant=tenant, from_ms=last[0], descending=False,
                                                         after=last if last[1] else None, limit=200))
            except Exception:  # noqa: BLE001 - the client reconnects and resumes from Last-Event-ID
                return
            out = []
            for row in rows:
                last = (int(row["timestamp_ms"]), row["event_id"])
                if event_matches(row, f, tenant_view):
                    data = msgspec.json.encode(event_wire(row)).decode()
                    out.append(f"id: {last[0]}:{last[1]}\nevent: cycles\ndata: {data}\n\n")
            if out:
                yield "".join(out).encode()
                beat = time.monotonic()
            elif time.monotonic() - beat > STREAM_HEARTBEAT_S:
                yield b": keep-alive\n\n"
                beat = time.monotonic()
            if len(rows) < 200:
                await asyncio.sleep(STREAM_POLL_S)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Request-Id": ctx.request_id,
               "X-Cycles-Trace-Id": ctx.trace_id}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def admin_event_stream(request: Request, ctx: Ctx) -> Response:
    await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    return await _stream(request, ctx, str_param(request.query_params, "tenant_id", max_length=64), False)


async def tenant_event_stream(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx)
    principal.require("events:read")
    if principal.tenant_id is None:
        raise ProtocolError(ErrorCode.FORBIDDEN, "a tenant key is required")
    return await _stream(request, ctx, principal.tenant_id, True)
