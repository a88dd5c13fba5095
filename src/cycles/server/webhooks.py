"""Webhook subscription routes: the admin plane (/v1/admin/webhooks, bulk-action, the webhook security
config) and the tenant self-service plane (/v1/webhooks). Delivery, /test, /deliveries and /replay
live in webhook_delivery.py. The record and its rules: cycles.webhooks.subscriptions; the wire structs: cycles.webhooks.wire."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core.events import SYSTEM_TENANT
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError, VersionConflict
from ..store.base import reset_journal, start_journal
from ..webhooks import subscriptions as W
from ..webhooks import urlpolicy, wire
from . import access, audit, bulk, events
from .admin import owning_tenant, refuse_if_suspended
from .auth import Principal
from .http import Ctx, check_idempotency_header, decode, json_response, read_body
from .params import bad, decode_cursor, encode_cursor, enum_param, filter_hash, int_param, str_param
from .state import state_of

MAX_SUBSCRIPTIONS_PER_OWNER = 200
RESOLVE_TIMEOUT_S = 5.0
_RETRIES = 5


class WebhookBulkActionResponse(m.Wire):
    action: str
    total_matched: int
    succeeded: list[bulk.BulkActionRowOutcome]
    failed: list[bulk.BulkActionRowOutcome]
    skipped: list[bulk.BulkActionRowOutcome]
    idempotency_key: str


# ---- shared ----

async def _admin(request: Request, ctx: Ctx) -> Principal:
    return await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)


async def _tenant_plane(request: Request, ctx: Ctx, permission: str) -> Principal:
    """A tenant key with `permission`, or the admin key acting on behalf of a tenant."""
    principal = await access.authenticate(request, ctx, allow_admin=True)
    principal.require(permission)
    if permission.endswith(":write") and not principal.is_admin:
        await refuse_if_suspended(request, principal.tenant_id or "")
    return principal


def _not_found(subscription_id: str) -> ProtocolError:
    return ProtocolError(ErrorCode.WEBHOOK_NOT_FOUND, f"Webhook subscription {subscription_id[:128]} not found")


async def _load(request: Request, principal: Principal) -> dict[str, Any]:
    sid = request.path_params["subscription_id"]
    rec = await state_of(request).store.get_doc(W.KIND, sid) if len(sid) <= 128 else None
    # Another tenant's subscription answers exactly like a missing one: ids never leak across tenants.
    if rec is None or (not principal.is_admin and rec.get("tenant_id") != principal.tenant_id):
        raise _not_found(sid)
    return rec


def _guarded(owner: str) -> bool:
    """The store's CLOSED-tenant guard applies to tenant-owned documents; __system__ is no tenant."""
    return owner != SYSTEM_TENANT


async def _require_open_owner(request: Request, owner: str) -> None:
    if owner == SYSTEM_TENANT:
        return
    tenant = await state_of(request).store.get_tenant(owner)
    if tenant is None:
        raise ProtocolError(ErrorCode.TENANT_NOT_FOUND, f"Tenant {owner} not found")
    if tenant.get("status") == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {owner} is CLOSED; its webhook subscriptions cannot change")


async def check_url(request: Request, url: str) -> None:
    """The URL against the current webhook security config, its host resolved (off the event loop)."""
    policy = await W.load_url_policy(state_of(request).store)
    W.check_url_syntax(url, policy)
    try:
        await asyncio.wait_for(asyncio.to_thread(urlpolicy.resolve, url, policy), RESOLVE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise W.url_invalid("url host did not resolve in time") from None
    except (ValueError, OSError) as exc:  # UrlRejected, and anything the resolver raises
        raise W.url_invalid(str(exc)) from None


def _no_content(ctx: Ctx) -> Response:
    return Response(status_code=204, headers={"X-Request-Id": ctx.request_id, "X-Cycles-Trace-Id": ctx.trace_id})


# ---- create / get / update / delete (both planes) ----

async def _create(request: Request, ctx: Ctx, req: wire.WebhookCreateRequest, owner: str) -> Response:
    st = state_of(request)
    audit.target_tenant(ctx, owner)
    await _require_open_owner(request, owner)
    rec, secret = W.build_record(req, owner, st.secret_box, await st.store.now_ms())
    await check_url(request, rec["url"])
    if len(await st.store.list_docs(W.KIND, owner)) >= MAX_SUBSCRIPTIONS_PER_OWNER:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{owner} may have at most {MAX_SUBSCRIPTIONS_PER_OWNER} "
                                                      "webhook subscriptions", status=400)
    sid = rec["subscription_id"]
    audit.resource(ctx, sid)
    events.emit(ctx, "webhook.created", owner, data=W.event_data(rec, new="ACTIVE"),
                correlation_id=f"webhook_create:{sid}")
    stored = await st.store.save_doc(W.KIND, owner, sid, rec, None, guard_tenant=_guarded(owner))
    return json_response(ctx, wire.WebhookCreateResponse(subscription=W.to_wire(stored or rec), signing_secret=secret),
                         status=201)


async def _update(request: Request, ctx: Ctx, principal: Principal) -> Response:
    req = decode(await read_body(request), wire.WebhookUpdateRequest)
    st = state_of(request)
    checked_url: str | None = None
    for _ in range(_RETRIES):  # re-read and re-apply when another writer changed the subscription meanwhile
        rec = await _load(request, principal)
        owner = rec["tenant_id"]
        audit.target_tenant(ctx, owner)
        await _require_open_owner(request, owner)
        merge = W.merge_patch(rec, req, st.secret_box, await st.store.now_ms())
        if merge.noop:  # nothing changes: no write, no event
            return json_response(ctx, W.to_update_response(rec, None))
        if merge.url_changed and checked_url != merge.record["url"]:
            await check_url(request, merge.record["url"])
            checked_url = merge.record["url"]
        sid = request.path_params["subscription_id"]
        events.drop_events(ctx)  # a retry after a lost race queues its event again
        events.emit(ctx, merge.event_type(), owner,
                    data=W.event_data(rec, previous=merge.previous_status, new=merge.new_status, changed=merge.changed),
                    correlation_id=f"webhook_update:{sid}:{ctx.request_id}")
        try:
            stored = await st.store.save_doc(W.KIND, owner, sid, merge.record, rec["version"],
                                             guard_tenant=_guarded(owner))
        except VersionConflict:
            continue
        except ProtocolError as err:
            if err.code == ErrorCode.NOT_FOUND:
                continue  # deleted meanwhile: the next read answers 404
            raise
        return json_response(ctx, W.to_update_response(stored or merge.record, merge.generated_secret))
    raise VersionConflict(f"webhook subscription {request.path_params['subscription_id'][:128]}")


async def _delete(request: Request, ctx: Ctx, principal: Principal) -> Response:
    st = state_of(request)
    for _ in range(_RETRIES):
        rec = await _load(request, principal)
        owner = rec["tenant_id"]
        audit.target_tenant(ctx, owner)
        sid = request.path_params["subscription_id"]
        events.drop_events(ctx)
        events.emit(ctx, "webhook.deleted", owner, data=W.event_data(rec, previous=rec.get("status")),
                    correlation_id=f"webhook_delete:{sid}")
        try:
            await st.store.save_doc(W.KIND, owner, sid, None, rec["version"], guard_tenant=_guarded(owner))
        except VersionConflict:
            continue
        except ProtocolError as err:
            if err.code == ErrorCode.NOT_FOUND:
                continue
            raise
        return _no_content(ctx)
    raise VersionConflict(f"webhook subscription {request.path_params['subscription_id'][:128]}")


# ---- listing ----

async def _list(request: Request, ctx: Ctx, tenant: str | None) -> Response:
    q = request.query_params
    status = enum_param(q, "status", W.STATUSES)
    event_type = W.check_event_type(str_param(q, "event_type", max_length=128))
    search = (str_param(q, "search", max_length=128) or "").strip().lower() or None
    sort_by = enum_param(q, "sort_by", W.SORT_KEYS) or "consecutive_failures"
    desc = (enum_param(q, "sort_dir", ("asc", "desc")) or "desc") == "desc"
    limit = int_param(q, "limit", default=50, lo=1, hi=100)
    key = W.sort_key(sort_by)
    rows = [r for r in await state_of(request).store.list_docs(W.KIND, tenant)
            if W.matches(r, status=status, event_type=event_type, search=search)]
    rows.sort(key=key, reverse=desc)
    fh = filter_hash({"t": tenant, "s": status, "e": event_type, "q": search, "sb": sort_by, "d": desc})
    cursor = decode_cursor(q.get("cursor"), fh)
    if cursor is not None:
        after = cursor.get("k")
        if not (isinstance(after, list) and len(after) == 2 and isinstance(after[1], str)
                and isinstance(after[0], int if sort_by == "consecutive_failures" else str)
                and not isinstance(after[0], bool)):
            raise bad("cursor is not a cursor this server issued")
        position = (after[0], after[1])
        rows = [r for r in rows if (key(r) < position if desc else key(r) > position)]
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor({"k": list(key(page[-1])), "f": fh}) if more else None
    return json_response(ctx, wire.WebhookListResponse(subscriptions=[W.to_wire(r) for r in page], has_more=more,
                                                    next_cursor=next_cursor))


# ---- admin plane ----

async def create_webhook(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    req = decode(await read_body(request), wire.WebhookCreateRequest)
    query_tenant = str_param(request.query_params, "tenant_id", max_length=64)
    if query_tenant is not None and req.tenant_id is not None and query_tenant != req.tenant_id:
        raise bad("tenant_id query parameter and body tenant_id differ")
    owner = query_tenant or req.tenant_id or SYSTEM_TENANT
    return await _create(request, ctx, req, owner)


async def list_webhooks(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    return await _list(request, ctx, str_param(request.query_params, "tenant_id", max_length=64))


async def get_webhook(request: Request, ctx: Ctx) -> Response:
    principal = await _admin(request, ctx)
    return json_response(ctx, W.to_wire(await _load(request, principal)))


async def update_webhook(request: Request, ctx: Ctx) -> Response:
    return await _update(request, ctx, await _admin(request, ctx))


async def delete_webhook(request: Request, ctx: Ctx) -> Response:
    return await _delete(request, ctx, await _admin(request, ctx))


# ---- tenant plane ----

async def create_tenant_webhook(request: Request, ctx: Ctx) -> Response:
    principal = await _tenant_plane(request, ctx, "webhooks:write")
    req = decode(await read_body(request), wire.WebhookCreateRequest)
    query_tenant = str_param(request.query_params, "tenant", max_length=64) if principal.is_admin else None
    owner = owning_tenant(principal, req.tenant_id or query_tenant)
    if owner == SYSTEM_TENANT:
        raise bad("system-wide subscriptions are created with POST /v1/admin/webhooks")
    return await _create(request, ctx, req, owner)


async def list_tenant_webhooks(request: Request, ctx: Ctx) -> Response:
    principal = await _tenant_plane(request, ctx, "webhooks:read")
    tenant_param = str_param(request.query_params, "tenant", max_length=64)
    if principal.is_admin:
        if tenant_param is None:
            raise bad("tenant query parameter is required when using admin key authentication")
        tenant = tenant_param
    else:
        if tenant_param is not None and tenant_param != principal.tenant_id:
            raise ProtocolError(ErrorCode.FORBIDDEN, "tenant does not match the tenant of the API key")
        tenant = principal.tenant_id or ""
    return await _list(request, ctx, tenant)


async def get_tenant_webhook(request: Request, ctx: Ctx) -> Response:
    principal = await _tenant_plane(request, ctx, "webhooks:read")
    return json_response(ctx, W.to_wire(await _load(request, principal)))


async def update_tenant_webhook(request: Request, ctx: Ctx) -> Response:
    return await _update(request, ctx, await _tenant_plane(request, ctx, "webhooks:write"))


async def delete_tenant_webhook(request: Request, ctx: Ctx) -> Response:
    return await _delete(request, ctx, await _tenant_plane(request, ctx, "webhooks:write"))


# ---- bulk action ----

class _RowFailure(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_BULK_TARGET = {"PAUSE": "PAUSED", "RESUME": "ACTIVE"}
_BULK_EVENT = {"PAUSE": "webhook.paused", "RESUME": "webhook.resumed", "DELETE": "webhook.deleted"}


async def bulk_action_webhooks(request: Request, ctx: Ctx) -> Response:
    principal = await _admin(request, ctx)
    req = decode(await read_body(request), wire.WebhookBulkActionRequest)
    check_idempotency_header(request, req.idempotency_key)
    f = req.filter
    search = (f.search or "").strip().lower() or None
    event_type = W.check_event_type(f.event_type)
    if f.tenant_id is None and f.status is None and event_type is None and search is None:
        raise bad("filter must name at least one of tenant_id, status, event_type or search "
                  "(an empty filter would act on every subscription)")
    bulk._note(ctx, actor_type="admin", action=req.action, filter=msgspec.to_builtins(f),
               idempotency_key=req.idempotency_key)
    if f.tenant_id is not None:
        audit.target_tenant(ctx, f.tenant_id)
    store = state_of(request).store
    idem = bulk._Idempotency(store, audit.ADMIN_SENTINEL, "bulkActionWebhooks", req.idempotency_key, req)
    replay = await idem.lookup()
    if replay is not None:
        bulk._note(ctx, replay=True)
        return bulk._respond(ctx, replay)

    rows = sorted((r for r in await store.list_docs(W.KIND, f.tenant_id)
                   if r.get("subscription_id") and W.matches(r, status=f.status, event_type=event_type, search=search)),
                  key=lambda r: r["subscription_id"])
    bulk._gates(ctx, len(rows), req.expected_count)
    correlation = f"webhook_bulk_action:{req.action.lower()}:{ctx.request_id}"
    actor = {k: v for k, v in {"type": "admin", "key_id": principal.key_id,
                               "source_ip": ctx.audit and ctx.audit.get("source_ip")}.items() if v is not None}

    async def apply(succeeded: list[bulk.BulkActionRowOutcome], failed: list[bulk.BulkActionRowOutcome],
                    skipped: list[bulk.BulkActionRowOutcome]) -> None:
        for row in rows:
            sid = row["subscription_id"]

            async def one(sid: str = sid) -> str | None:
                try:
                    return await _bulk_row(store, sid, req.action, correlation, ctx, actor)
                except _RowFailure as err:
                    failed.append(bulk.BulkActionRowOutcome(id=sid, error_code=err.code, message=err.message))
                    return bulk.ROW_FAILED  # type: ignore[return-value]

            reason = await bulk.guarded_row(sid, req.action, failed, one)
            if reason is bulk.ROW_FAILED:
                continue
            (succeeded if reason is None else skipped).append(bulk.BulkActionRowOutcome(id=sid, reason=reason))

    def response(succeeded: Any, failed: Any, skipped: Any) -> WebhookBulkActionResponse:
        return WebhookBulkActionResponse(action=req.action, total_matched=len(rows), succeeded=succeeded,
                                         failed=failed, skipped=skipped, idempotency_key=req.idempotency_key)

    return await bulk._run(ctx, idem, apply, response)


async def _bulk_row(store: Any, sid: str, action: str, correlation: str, ctx: Ctx, actor: dict[str, Any]) -> str | None:
    """Apply the action to one subscription: None when it changed, else the skip reason. Its event is
    written in the same transaction as the row."""
    for _ in range(_RETRIES):
        rec = await store.get_doc(W.KIND, sid)
        if rec is None:
            if action == "DELETE":
                return "ALREADY_DELETED"
            raise ProtocolError(ErrorCode.NOT_FOUND, f"Webhook subscription {sid} not found")
        owner, status = rec["tenant_id"], rec.get("status")
        if action == "DELETE":
            new_rec = None
            data = W.event_data(rec, previous=status)
        else:
            target = _BULK_TARGET[action]
            if status == target or (action == "PAUSE" and status == "DISABLED"):
                return "ALREADY_IN_TARGET_STATE"
            if action == "RESUME" and status == "DISABLED":
                raise _RowFailure("INVALID_TRANSITION",
                                  "a DISABLED subscription is re-enabled with PATCH status=ACTIVE, not RESUME")
            # The persisted result must satisfy the subscription invariants like every other write path.
            W.check_selectors(owner, rec.get("event_types") or [], rec.get("event_categories") or [])
            now = await store.now_ms()
            new_rec = {**rec, "status": target, "updated_at": W.iso(now)}
            data = W.event_data(rec, previous=status, new=target)
        entry = {"journal": "event", "event_type": _BULK_EVENT[action], "tenant_id": owner, "scope": None,
                 "data": data, "correlation_id": correlation, "request_id": ctx.request_id,
                 "trace_id": ctx.trace_id, "actor": actor}
        token = start_journal([entry])
        try:
            await store.save_doc(W.KIND, owner, sid, new_rec, rec["version"], guard_tenant=_guarded(owner))
        except VersionConflict:
            continue
        except ProtocolError as err:
            if err.code == ErrorCode.NOT_FOUND:
                continue
            raise
        finally:
            reset_journal(token)
        return None
    raise VersionConflict(f"webhook subscription {sid}")


# ---- security config ----

async def get_security_config(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    doc = await state_of(request).store.get_doc(W.CONFIG_KIND, W.SECURITY_DOC_ID)
    return json_response(ctx, W.security_config(doc))


async def put_security_config(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    cfg = decode(await read_body(request), wire.WebhookSecurityConfig)
    record = W.normalize_security_config(cfg)
    audit.resource(ctx, W.SECURITY_DOC_ID)
    st = state_of(request)
    for _ in range(_RETRIES):
        current = await st.store.get_doc(W.CONFIG_KIND, W.SECURITY_DOC_ID)
        rec = {**record, "updated_at": W.iso(await st.store.now_ms())}
        try:
            await st.store.save_doc(W.CONFIG_KIND, SYSTEM_TENANT, W.SECURITY_DOC_ID, rec,
                                    current["version"] if current else None, guard_tenant=False)
        except VersionConflict:
            continue
        except ProtocolError as err:
            if err.code in (ErrorCode.NOT_FOUND, ErrorCode.DUPLICATE_RESOURCE):
                continue  # created or removed by a concurrent writer: read again
            raise
        return json_response(ctx, W.security_config(rec))
    raise VersionConflict("webhook security config")
