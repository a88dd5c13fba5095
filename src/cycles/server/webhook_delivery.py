"""Webhook delivery routes: the test probe, the delivery log, replay and resend.

    POST /v1/admin/webhooks/{id}/test                            testWebhookSubscription
    GET  /v1/admin/webhooks/{id}/deliveries                      listWebhookDeliveries
    POST /v1/admin/webhooks/{id}/replay                          replayEvents (202, 409 REPLAY_IN_PROGRESS)
    POST /v1/admin/webhooks/{id}/deliveries/{delivery_id}/resend resendWebhookDelivery (extension, 202)
    POST /v1/webhooks/{id}/test                                  testTenantWebhook (webhooks:write)
    GET  /v1/webhooks/{id}/deliveries                            listTenantWebhookDeliveries (webhooks:read)

The engine itself (dispatch, claims, retries) is cycles.webhooks.dispatch / deliver.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from ..core.events import SYSTEM_TENANT
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.models import Wire, encode
from ..store.base import new_event_id
from ..webhooks import dispatch as D
from ..webhooks.send import Result, Sender, build_headers, open_box
from ..webhooks.subscriptions import load_url_policy
from . import access, audit
from .auth import Principal
from .events import event_wire
from .http import Ctx, decode, json_response, read_body
from .params import (bad, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, iso, parse_iso,
                     str_param, time_cursor, time_param)
from .state import state_of

TEST_TIMEOUT_S = 10.0
WIRE_STATUSES = ("PENDING", "SUCCESS", "FAILED", "RETRYING")
_TRACE = re.compile(r"^[0-9a-f]{32}$")
_FLAGS = re.compile(r"^[0-9a-f]{2}$")


# ---- wire ----

class WebhookDelivery(Wire):
    delivery_id: str
    subscription_id: str
    event_id: str
    status: Literal["PENDING", "SUCCESS", "FAILED", "RETRYING"]
    attempted_at: str
    event_type: str | None = None
    completed_at: str | None = None
    attempts: int | None = None
    response_status: int | None = None
    response_time_ms: int | None = None
    error_message: str | None = None
    next_retry_at: str | None = None
    trace_id: str | None = None
    trace_flags: str | None = None
    traceparent_inbound_valid: bool | None = None


class WebhookDeliveryListResponse(Wire):
    deliveries: list[WebhookDelivery]
    has_more: bool
    next_cursor: str | None = None


class WebhookTestResponse(Wire):
    success: bool
    response_status: int | None = None
    response_time_ms: int | None = None
    error_message: str | None = None
    event_id: str | None = None


class WebhookReplayRequest(Wire):
    from_: str | None = msgspec.field(name="from", default=None)
    to: str | None = None
    event_types: Annotated[list[Annotated[str, Meta(min_length=1, max_length=128)]], Meta(max_length=128)] | None = None
    max_events: Annotated[int, Meta(ge=1, le=D.REPLAY_MAX_EVENTS)] = 100


class WebhookReplayResponse(Wire):
    replay_id: str
    events_queued: int
    estimated_completion_seconds: int


class WebhookResendResponse(Wire):
    """Extension: the new delivery, and its provenance (the resend's replay_id and the original delivery)."""

    delivery: WebhookDelivery
    replay_id: str
    resent_from: str


def wire_status(d: dict[str, Any]) -> str:
    status = d.get("status")
    if status == "SUCCEEDED":
        return "SUCCESS"
    if status == "FAILED":
        return "FAILED"
    attempts = int(d.get("attempts") or 0)
    # PENDING after a failed attempt, or a second (or later) attempt running: a retry.
    if (status == "PENDING" and attempts >= 1) or attempts >= 2:
        return "RETRYING"
    return "PENDING"


def delivery_wire(d: dict[str, Any]) -> WebhookDelivery:
    status = wire_status(d)
    attempted = d.get("last_attempt_at_ms") or d.get("created_at_ms") or 0
    trace = d.get("trace_id") if isinstance(d.get("trace_id"), str) and _TRACE.match(d["trace_id"]) else None
    flags = d.get("trace_flags") if isinstance(d.get("trace_flags"), str) and _FLAGS.match(d["trace_flags"]) else None
    return WebhookDelivery(
        delivery_id=d["delivery_id"], subscription_id=d["subscription_id"], event_id=d["event_id"], status=status,
        attempted_at=iso(int(attempted)), event_type=d.get("event_type"),
        completed_at=iso(int(d["completed_at_ms"])) if d.get("completed_at_ms") else None,
        attempts=int(d.get("attempts") or 0), response_status=d.get("response_status"),
        response_time_ms=d.get("duration_ms"), error_message=d.get("error"),
        next_retry_at=iso(int(d["next_attempt_at_ms"])) if status == "RETRYING" and d.get("next_attempt_at_ms")
        and d.get("status") == "PENDING" else None,
        trace_id=trace, trace_flags=flags)


# ---- shared ----

def _not_found(subscription_id: str) -> ProtocolError:
    return ProtocolError(ErrorCode.WEBHOOK_NOT_FOUND, f"Webhook subscription {subscription_id[:128]} not found")


async def _load(request: Request, principal: Principal) -> dict[str, Any]:
    sid = request.path_params["subscription_id"]
    rec = await state_of(request).store.get_doc(D.SUB_KIND, sid) if len(sid) <= 128 else None
    # Another tenant's subscription answers exactly like a missing one.
    if rec is None or (not principal.is_admin and rec.get("tenant_id") != principal.tenant_id):
        raise _not_found(sid)
    return rec


async def _admin(request: Request, ctx: Ctx) -> Principal:
    return await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)


async def _tenant_plane(request: Request, ctx: Ctx, permission: str) -> Principal:
    principal = await access.authenticate(request, ctx, allow_admin=True)
    principal.require(permission)
    return principal


def _actor(principal: Principal, tenant_plane: bool) -> dict[str, Any]:
    if principal.is_admin:
        kind = "admin_on_behalf_of" if tenant_plane else "admin"
    else:
        kind = "api_key"
    return {k: v for k, v in {"type": kind, "key_id": principal.key_id}.items() if v is not None}


# ---- test ----

async def _test(request: Request, ctx: Ctx, principal: Principal, tenant_plane: bool) -> Response:
    st = state_of(request)
    store = st.store
    sub = await _load(request, principal)
    owner = sub["tenant_id"]
    if owner != SYSTEM_TENANT:
        tenant = await store.get_tenant(owner)
        if tenant is not None and tenant.get("status") == "CLOSED":
            raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {owner} is CLOSED; its webhooks cannot be tested")
    if principal.is_admin:
        audit.target_tenant(ctx, owner)
    now = await store.now_ms()
    event_id = new_event_id(now)
    event = {
        "event_id": event_id, "event_type": D.TEST_EVENT, "category": "system", "timestamp_ms": now,
        "tenant_id": owner, "scope": None, "actor": _actor(principal, tenant_plane), "source": "cycles-server",
        "data": {"component": "webhook_dispatcher", "severity": "info",
                 "message": "Test event: your endpoint is reachable and receives signed Cycles webhooks.",
                 "details": {"subscription_id": sub["subscription_id"]}},
        "request_id": ctx.request_id, "trace_id": ctx.trace_id,
    }
    body = encode(event_wire(event))
    delivery_id = D.random_delivery_id()
    try:
        headers = build_headers(sub, open_box(st.secret_box), body, delivery_id=delivery_id, event_id=event_id,
                                event_type=D.TEST_EVENT, trace_id=ctx.trace_id, trace_flags=ctx.trace_flags,
                                request_id=ctx.request_id, now_ms=now)
    except Exception as exc:  # noqa: BLE001 - SealedUnreadable (another key), HeaderUnusable (stored before validation)
        headers = None
        unusable = str(exc) if isinstance(exc, ValueError) else "the delivery headers could not be built"
    if headers is None:
        result = Result("refused", error=unusable, retryable=False, sent=False)
    else:
        sender = Sender(per_endpoint=1)
        try:
            result = await sender.post(sub["url"], await load_url_policy(store), body, headers, TEST_TIMEOUT_S)
        finally:
            await sender.aclose()
    done = await store.now_ms()
    record = D.new_delivery(event, sub, now, delivery_id=delivery_id, due_ms=now)
    record.update(status="SUCCEEDED" if result.ok else "FAILED", attempts=1, due_ms=None, next_attempt_at_ms=None,
                  first_attempt_at_ms=now, last_attempt_at_ms=now, completed_at_ms=done,
                  response_status=result.status, duration_ms=result.duration_ms, error=result.error, test=True,
                  trace_id=ctx.trace_id, trace_flags=ctx.trace_flags)
    # The probe's event (never dispatched: it is point-to-point) and its delivery record are written
    # together, with the request's audit row.
    if ctx.journal is not None:
        ctx.journal.append({**event, "journal": "event"})
    await store.save_doc(D.DELIVERY_KIND, owner, delivery_id, record, None, guard_tenant=False)
    m = st.metrics
    m.webhook_attempts.labels(result.outcome).inc()
    return json_response(ctx, WebhookTestResponse(success=result.ok, response_status=result.status,
                                                  response_time_ms=result.duration_ms, error_message=result.error,
                                                  event_id=event_id))


async def test_webhook(request: Request, ctx: Ctx) -> Response:
    return await _test(request, ctx, await _admin(request, ctx), tenant_plane=False)


async def test_tenant_webhook(request: Request, ctx: Ctx) -> Response:
    return await _test(request, ctx, await _tenant_plane(request, ctx, "webhooks:write"), tenant_plane=True)


# ---- the delivery log ----

async def _deliveries(request: Request, ctx: Ctx, principal: Principal) -> Response:
    sub = await _load(request, principal)
    q = request.query_params
    status = enum_param(q, "status", WIRE_STATUSES)
    from_ms, to_ms = time_param(q, "from"), time_param(q, "to")
    replay_id = str_param(q, "replay_id", max_length=64)  # extension: the deliveries of one replay / resend
    event_id = str_param(q, "event_id", max_length=128)   # extension
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    fh = filter_hash({"s": sub["subscription_id"], "st": status, "from": from_ms, "to": to_ms, "r": replay_id,
                      "e": event_id})
    cursor = decode_cursor(q.get("cursor"), fh)
    after = time_cursor(cursor) if cursor is not None else None
    rows = []
    for d in await state_of(request).store.list_docs(D.DELIVERY_KIND, sub["tenant_id"]):
        if d.get("subscription_id") != sub["subscription_id"]:
            continue
        created = int(d.get("created_at_ms") or 0)
        if (from_ms is not None and created < from_ms) or (to_ms is not None and created > to_ms):
            continue
        if status is not None and wire_status(d) != status:
            continue
        if replay_id is not None and d.get("replay_id") != replay_id:
            continue
        if event_id is not None and d.get("event_id") != event_id:
            continue
        key = (created, d["delivery_id"])
        if after is not None and key >= after:
            continue
        rows.append((key, d))
    rows.sort(key=lambda r: r[0], reverse=True)  # newest first
    page = rows[:limit]
    more = len(rows) > limit
    next_cursor = encode_cursor({"k": list(page[-1][0]), "f": fh}) if more else None
    return json_response(ctx, WebhookDeliveryListResponse(deliveries=[delivery_wire(d) for _, d in page],
                                                          has_more=more, next_cursor=next_cursor))


async def list_deliveries(request: Request, ctx: Ctx) -> Response:
    return await _deliveries(request, ctx, await _admin(request, ctx))


async def list_tenant_deliveries(request: Request, ctx: Ctx) -> Response:
    return await _deliveries(request, ctx, await _tenant_plane(request, ctx, "webhooks:read"))


# ---- replay and resend ----

def _estimate_s(n: int) -> int:
    return 0 if n == 0 else max(1, math.ceil(n / 10))


async def replay_events(request: Request, ctx: Ctx) -> Response:
    principal = await _admin(request, ctx)
    sub = await _load(request, principal)
    req = decode(await read_body(request), WebhookReplayRequest)
    store = state_of(request).store
    audit.target_tenant(ctx, sub["tenant_id"])
    now = await store.now_ms()
    from_ms = parse_iso(req.from_, "from") if req.from_ else None
    to_ms = parse_iso(req.to, "to") if req.to else now
    if from_ms is not None and from_ms > to_ms:
        raise bad("from must not be after to")
    try:
        D.check_event_types(req.event_types)
    except ValueError as exc:
        raise bad(f"event_types: {exc}") from None
    if await D.replay_running(store, sub["subscription_id"], now) is not None:
        raise ProtocolError(ErrorCode.REPLAY_IN_PROGRESS,
                            f"A replay to subscription {sub['subscription_id']} is still running")
    try:
        events = await D.select_replay(store, sub, from_ms, to_ms, req.event_types, req.max_events)
    except D.ReplayRejected as exc:
        raise bad(str(exc)) from None
    replay_id = D.new_replay_id()
    lock = await D.acquire_replay_lock(store, sub, replay_id, now)  # the first write: carries the audit row
    if lock is None:
        raise ProtocolError(ErrorCode.REPLAY_IN_PROGRESS,
                            f"A replay to subscription {sub['subscription_id']} is still running")
    ids = await D.enqueue(store, sub, events, replay_id, now, metrics=state_of(request).metrics)
    estimate = _estimate_s(len(ids))
    await D.finish_replay_lock(store, lock, ids, estimate, now)
    return json_response(ctx, WebhookReplayResponse(replay_id=replay_id, events_queued=len(ids),
                                                    estimated_completion_seconds=estimate), status=202)


async def resend_delivery(request: Request, ctx: Ctx) -> Response:
    principal = await _admin(request, ctx)
    sub = await _load(request, principal)
    store = state_of(request).store
    audit.target_tenant(ctx, sub["tenant_id"])
    did = request.path_params["delivery_id"]
    original = await store.get_doc(D.DELIVERY_KIND, did) if len(did) <= 128 else None
    if original is None or original.get("subscription_id") != sub["subscription_id"]:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Delivery {did[:128]} not found for this subscription")
    if original.get("test") or original.get("event_type") == D.TEST_EVENT:
        raise bad("test probes are not resent; POST .../test sends a new one")
    event = await store.get_event(original["event_id"])
    if event is None:
        raise ProtocolError(ErrorCode.EVENT_NOT_FOUND, f"Event {original['event_id']} is no longer stored")
    if sub.get("status") == "DISABLED":
        raise bad("the subscription is DISABLED; re-enable it (status ACTIVE) before resending")
    if not D.deliverable(sub, event):
        raise bad("the subscription may no longer receive this event (its selectors or the tenant boundary refuse it)")
    now = await store.now_ms()
    replay_id = D.new_replay_id()
    ids = await D.enqueue(store, sub, [event], replay_id, now, resent_from=did, metrics=state_of(request).metrics,
                          source="resend")
    if not ids:
        raise bad("the delivery could not be queued (the subscription changed meanwhile); try again")
    new = await store.get_doc(D.DELIVERY_KIND, ids[0])
    return json_response(ctx, WebhookResendResponse(delivery=delivery_wire(new or {}), replay_id=replay_id,
                                                    resent_from=did), status=202)


DELIVERY_FILTERS = (
    ("status", "string", "PENDING, SUCCESS, FAILED or RETRYING"),
    ("from", "date-time", "created at or after"), ("to", "date-time", "created at or before"),
    ("replay_id", "string", "Extension: only the deliveries of this replay or resend"),
    ("event_id", "string", "Extension: only the deliveries of this event"),
    ("limit", "integer", "1..100, default 50"), ("cursor", "string", "Opaque cursor from the previous page"),
)
