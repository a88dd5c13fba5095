"""Governance events: emitting them with the change that causes them, and the event queries
(GET /v1/admin/events, /v1/admin/events/{event_id}, GET /v1/events)."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import events as E
from ..protocol import governance as g
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import AuditScan
from . import access
from .emit import drop_events, emit  # noqa: F401 - events.emit is where the routes queue their events
from .http import Ctx, json_response
from .params import decode_cursor, enum_param, filter_hash, int_param, iso, page_log, str_param, time_param
from .state import state_of


# ---- queries ----

def event_filters(q: Any, tenant_view: bool) -> dict[str, Any]:
    f: dict[str, Any] = {
        "event_type": enum_param(q, "event_type", E.EVENT_TYPES),
        "category": enum_param(q, "category", E.CATEGORIES),
        "scope": str_param(q, "scope", max_length=1024),
        "correlation_id": str_param(q, "correlation_id", max_length=256),
    }
    if not tenant_view:
        f["trace_id"] = str_param(q, "trace_id", max_length=64)
        f["request_id"] = str_param(q, "request_id", max_length=256)
        f["search"] = (str_param(q, "search", max_length=128) or "").strip().lower() or None
    return f


def event_matches(row: dict[str, Any], f: dict[str, Any], tenant_view: bool) -> bool:
    if tenant_view and row.get("category") not in E.TENANT_CATEGORIES:
        return False
    for name in ("event_type", "category", "correlation_id", "trace_id", "request_id"):
        if f.get(name) is not None and row.get(name) != f[name]:
            return False
    if f.get("scope") is not None and not (row.get("scope") or "").startswith(f["scope"]):
        return False
    if f.get("search") is not None:
        hay = " ".join(str(row.get(k) or "") for k in ("correlation_id", "scope", "event_id", "event_type")).lower()
        if f["search"] not in hay:
            return False
    return True


def event_wire(row: dict[str, Any]) -> g.Event:
    fields = {k: v for k, v in row.items() if k in g.Event.__struct_fields__}
    fields["timestamp"] = iso(row["timestamp_ms"])
    if not fields.get("scope"):
        fields.pop("scope", None)
    return msgspec.convert(fields, g.Event)



async def _list(request: Request, ctx: Ctx, tenant: str | None, tenant_view: bool) -> Response:
    q = request.query_params
    f = event_filters(q, tenant_view)
    desc = (enum_param(q, "sort_dir", ("asc", "desc")) or "desc") == "desc"
    # Events are kept in time order; the spec's other sort keys are accepted and answered in time order.
    enum_param(q, "sort_by", ("event_type", "category", "scope", "tenant_id", "timestamp"))
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    scan = AuditScan(tenant=tenant, from_ms=time_param(q, "from"), to_ms=time_param(q, "to"), descending=desc)
    fh = filter_hash({"t": tenant, "from": scan.from_ms, "to": scan.to_ms, "desc": desc, **f})
    page, more, next_cursor = await page_log(state_of(request).store.scan_events, scan, "event_id",
                                             lambda row: event_matches(row, f, tenant_view), limit, fh,
                                             decode_cursor(q.get("cursor"), fh))
    return json_response(ctx, g.EventListResponse(events=[event_wire(r) for r in page], has_more=more,
                                                  next_cursor=next_cursor))


async def list_events(request: Request, ctx: Ctx) -> Response:
    await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    tenant = str_param(request.query_params, "tenant_id", max_length=64)
    return await _list(request, ctx, tenant, tenant_view=False)


async def get_event(request: Request, ctx: Ctx) -> Response:
    await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    event_id = request.path_params["event_id"]
    row = await state_of(request).store.get_event(event_id) if len(event_id) <= 128 else None
    if row is None:
        raise ProtocolError(ErrorCode.EVENT_NOT_FOUND, f"Event {event_id[:128]} not found")
    return json_response(ctx, event_wire(row))


async def list_tenant_events(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx)
    principal.require("events:read")
    return await _list(request, ctx, principal.tenant_id, tenant_view=True)
