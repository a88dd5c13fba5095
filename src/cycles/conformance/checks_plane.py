"""Checks across scopes, clients and planes: atomic multi-scope reservation, concurrency, auth and tenancy,
events, webhook subscriptions and their invariants, correlation headers, the SHOULD and v0.1.26 surfaces."""

from __future__ import annotations

import re
import secrets
import threading
import time

import httpx

from . import specdocs
from .checks_runtime import check
from .probe import NA, UNIT, UNTESTED, USER_AGENT, Context, Untestable, amount_of, key, reserve_body

TRACE_RE = re.compile(r"^[0-9a-f]{32}$")


@check("atomic")
def atomic_reservation(ctx: Context) -> None:
    """A reservation that fits the outer scope but not the inner one locks nothing anywhere."""
    outer = ctx.budget("atom", 1_000)
    inner = ctx.budget("app", 50, parent=outer, level="app")
    before = ctx.balance(outer)
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(inner, 80))
    ctx.expect("BUDGET_EXCEEDED", ex, 409, "BUDGET_EXCEEDED", "80 fits the outer 1000 but not the inner 50")
    after = ctx.balance(outer)
    if amount_of(after, "reserved") != amount_of(before, "reserved"):
        ctx.fail("Atomic reservation", f"a denied two-scope reservation left {amount_of(after, 'reserved')} reserved "
                 "on the outer scope", ex, "no partial lock")
        return
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(inner, 30))
    if ex.status != 200:
        raise Untestable(f"reserve 30 answered {ex.status}")
    o, i = ctx.balance(outer), ctx.balance(inner)
    if amount_of(o, "reserved") != 30 or amount_of(i, "reserved") != 30:
        ctx.fail("Atomic reservation", f"an allowed two-scope reservation of 30 reserved {amount_of(o, 'reserved')} "
                 f"outer and {amount_of(i, 'reserved')} inner", ex, "30 locked on both scopes")
        return
    ctx.ok("Atomic reservation", "denied: nothing locked anywhere; allowed: locked on every scope")


@check("concurrency")
def no_oversubscription(ctx: Context) -> None:
    """N independent clients reserve at once against a budget that fits fewer than N: never more than fit."""
    per, fits = 100, max(2, ctx.concurrency // 2)
    subject = ctx.budget("race", per * fits)
    n = ctx.concurrency
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        with httpx.Client(base_url=ctx.base_url, timeout=ctx.timeout, headers={"User-Agent": USER_AGENT}) as c:
            c.get("/actuator/health")  # open the connection before the barrier
            barrier.wait()
            results[i] = ctx.call("POST", "/v1/reservations", json_body=reserve_body(subject, per), client=c)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(ctx.timeout + 5)
    allowed = [ex for ex in results if ex is not None and ex.status == 200]
    denied = [ex for ex in results if ex is not None and ex.status == 409 and ex.error == "BUDGET_EXCEEDED"]
    other = [ex for ex in results if ex is None or ex not in allowed and ex not in denied]
    bal = ctx.balance(subject)
    if len(allowed) > fits or amount_of(bal, "remaining") < 0 or amount_of(bal, "reserved") > per * fits:
        ctx.fail("Concurrency-safe enforcement", f"{n} concurrent reserves of {per} against {per * fits}: "
                 f"{len(allowed)} allowed, reserved {amount_of(bal, 'reserved')}, remaining "
                 f"{amount_of(bal, 'remaining')}", allowed[-1] if allowed else None,
                 f"at most {fits} ALLOW and remaining >= 0")
    elif other:
        ex = other[0]
        if ex is None:
            ctx.record("Concurrency-safe enforcement", UNTESTED, "a concurrent request did not complete")
        else:
            ctx.fail("Concurrency-safe enforcement", f"a concurrent reserve answered {ex.status}", ex,
                     "HTTP 200 or 409 BUDGET_EXCEEDED")
    else:
        ctx.ok("Concurrency-safe enforcement", f"{n} concurrent clients: {len(allowed)} allowed of {fits} that fit, "
               f"{len(denied)} denied with 409 BUDGET_EXCEEDED")


@check("auth")
def authentication_and_tenancy(ctx: Context) -> None:
    ex = ctx.call("GET", "/v1/auth/introspect")
    if ctx.expect("introspectAuth", ex, 200, what="introspect the tenant key"):
        perms = (ex.body or {}).get("permissions") or []
        allowed = set(specdocs.schema_enum(specdocs.ADMIN, "Permission"))
        bad = [p for p in perms if p not in allowed]
        if bad:
            ctx.fail("Permission enum", f"introspect reported permissions outside the enum: {bad}", ex,
                     "values of Permission")
        elif perms:
            ctx.ok("Permission enum", f"{len(perms)} permissions, all in the enum")
    for what, k in (("no X-Cycles-API-Key", None), ("an unknown key", "cyc_live_" + secrets.token_hex(16))):
        ex = ctx.call("GET", "/v1/balances", key=k, params={"tenant": ctx.tenant or "x"})
        ctx.expect("Authenticate via X-Cycles-API-Key", ex, 401, what=f"GET /v1/balances with {what}")
    subject = ctx.subject_for("iso", 1_000, 10)
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(dict(subject, tenant="conformance-elsewhere"), 1))
    ctx.expect("Enforce tenant isolation", ex, 403, "FORBIDDEN", "subject.tenant differs from the key's tenant")
    other_tenant, other_key = ctx.second_tenant()
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(subject, 2))
    if ex.status != 200:
        raise Untestable(f"reserve answered {ex.status}")
    rid = ex.body["reservation_id"]
    for method, path, body in (("GET", f"/v1/reservations/{rid}", None),
                               ("POST", f"/v1/reservations/{rid}/commit",
                                {"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 1}}),
                               ("POST", f"/v1/reservations/{rid}/release", {"idempotency_key": key()})):
        ex = ctx.call(method, path, key=other_key, json_body=body)
        if ex.status < 400:
            ctx.fail("Enforce tenant isolation", f"another tenant's key got {ex.status} for {method} {path}", ex,
                     "a 403 or 404 refusal")
        else:
            ctx.ok("Enforce tenant isolation", f"{method} by another tenant refused with {ex.status}")
    ctx.call("POST", f"/v1/reservations/{rid}/release", json_body={"idempotency_key": key()})


@check("events")
def events(ctx: Context) -> None:
    """Events a reservation causes are listed (tenant and admin planes), valid, and carry the trace id."""
    subject = ctx.subject_for("evt", 100, 100) if ctx.provisioned else ctx.shared_subject(1)
    trace = secrets.token_hex(16)
    if ctx.provisioned:  # exhausting the budget emits budget.exhausted (and reservation events where emitted)
        ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(subject, 100),
                      headers={"X-Cycles-Trace-Id": trace})
        if ex.status == 200:
            ctx.call("POST", f"/v1/reservations/{ex.body['reservation_id']}/commit", headers={"X-Cycles-Trace-Id": trace},
                     json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 100}})
    found: list[dict] = []
    deadline = time.monotonic() + 5
    while True:
        ex = ctx.call("GET", "/v1/events", params={"limit": 50})
        if ex.status != 200 or not ctx.provisioned:
            break
        found = [e for e in (ex.body or {}).get("events", []) if e.get("trace_id") == trace]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if not ctx.expect("listTenantEvents", ex, 200, what="GET /v1/events"):
        return
    listed = (ex.body or {}).get("events", [])
    if listed:
        ctx.ok("Event, EventType", f"{len(listed)} events valid against the Event schema") if not ex.schema_errors \
            else ctx.fail("Event, EventType", "an event does not match the schema", ex, "Event")
    if ctx.provisioned:
        if found:
            ctx.ok("Emit events for budget-state changes", f"{[e.get('event_type') for e in found]}")
            ctx.ok("Propagate X-Cycles-Trace-Id and traceparent", "the request's trace id is on its events")
        else:
            ctx.fail("Emit events for budget-state changes", "exhausting a budget emitted no event carrying the "
                     "request's trace id within 5 s", ex, f"an event with trace_id={trace}")
            ctx.record("Propagate X-Cycles-Trace-Id and traceparent", UNTESTED, "no event to inspect")
    if not ctx.admin_key:
        return
    ex = ctx.call("GET", "/v1/admin/events", key="admin", params={"tenant_id": ctx.tenant, "limit": 20})
    if ctx.expect("listEvents", ex, 200, what="GET /v1/admin/events"):
        events_ = (ex.body or {}).get("events", [])
        if events_:
            eid = events_[0].get("event_id")
            one = ctx.call("GET", f"/v1/admin/events/{eid}", key="admin")
            if ctx.expect("getEvent", one, 200, what="GET /v1/admin/events/{event_id}") and one.body != events_[0]:
                ctx.fail("getEvent", "getEvent differs from the listed event", one, "the same event as listed")
            if not (ex.schema_errors or one.schema_errors):
                ctx.ok("Event, EventType", "admin-listed events valid against the Event schema")
        else:
            ctx.record("getEvent", UNTESTED, "no event was listed to fetch")
    ex = ctx.call("GET", f"/v1/admin/events/evt-conformance-missing-{key()}", key="admin")
    ctx.expect("getEvent", ex, 404, what="an unknown event id")


def _hook(ctx: Context, owner: str, **selectors) -> dict:
    return {"url": ctx.webhook_url, "name": f"conformance {owner}",
            **selectors}


@check("webhooks")
def webhooks(ctx: Context) -> None:
    """Subscription invariants on every write path the server exposes; deliveries list and replay."""
    tenant_hooks = []
    ex = ctx.call("POST", "/v1/webhooks", json_body=_hook(ctx, "tenant", event_types=["budget.exhausted"]))
    body = ex.body if isinstance(ex.body, dict) else {}
    refused = f"POST /v1/webhooks answered {ex.status} {body.get('error', '')}: {body.get('message', '')}"
    if ex.status == 201:
        tenant_hooks.append(ex.body["subscription"]["subscription_id"] if "subscription" in (ex.body or {})
                            else ex.body.get("subscription_id"))
    elif ex.status in (404, 405):
        ctx.record("Selector presence", NA, "no tenant self-service webhook path (POST /v1/webhooks)")
    for path, kw in (("/v1/webhooks", {"key": "tenant"}),
                     ("/v1/admin/webhooks", {"key": "admin", "params": {"tenant_id": ctx.tenant}})):
        if kw["key"] == "admin" and not ctx.admin_key:
            continue
        ex = ctx.call("POST", path, json_body=_hook(ctx, "empty", event_types=[], event_categories=[]), **kw)
        if ex.status not in (404, 405):
            ctx.expect("Selector presence", ex, 400, "INVALID_REQUEST", f"POST {path} with no selector")
        for sel in ({"event_categories": ["api_key"]}, {"event_types": ["webhook.created"]},
                    {"event_categories": ["system"]}):
            ex = ctx.call("POST", path, json_body=_hook(ctx, "admin-only", **sel), **kw)
            if ex.status not in (404, 405):
                ctx.expect("Tenant-owned selectors", ex, 400, "INVALID_REQUEST",
                           f"POST {path} owned by tenant {ctx.tenant} with {sel}")
    sid = next((s for s in tenant_hooks if s), None)
    if sid is None:
        raise Untestable(f"no subscription could be created to check updates, deliveries and replay ({refused}; "
                         "--webhook-url takes a URL the server accepts)")
    ex = ctx.call("PATCH", f"/v1/webhooks/{sid}", json_body={"event_types": [], "event_categories": []})
    if ex.status not in (404, 405):
        ctx.expect("Selector presence", ex, 400, "INVALID_REQUEST", "PATCH leaving no selector")
    ex = ctx.call("PATCH", f"/v1/webhooks/{sid}", json_body={"event_categories": ["policy"]})
    if ex.status not in (404, 405):
        ctx.expect("Tenant-owned selectors", ex, 400, "INVALID_REQUEST", "PATCH adding an admin-only category")
    if ctx.admin_key:  # replay first: it gives the deliveries lists something to show
        ex = ctx.call("POST", f"/v1/admin/webhooks/{sid}/replay", key="admin", json_body={})
        if ex.status not in (200, 202):
            ctx.fail("replayEvents", f"replay answered {ex.status}", ex, "HTTP 202 (or 200)")
        else:
            ctx.ok("replayEvents", f"HTTP {ex.status}")
        ex = ctx.call("POST", "/v1/admin/webhooks/whsub-conformance-missing/replay", key="admin", json_body={})
        ctx.expect("replayEvents", ex, 404, what="replay for an unknown subscription")
    deadline = time.monotonic() + 3
    while True:
        ex = ctx.call("GET", f"/v1/webhooks/{sid}/deliveries")
        if ex.status != 200 or (ex.body or {}).get("deliveries") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ctx.expect("listTenantWebhookDeliveries", ex, 200, what="GET /v1/webhooks/{id}/deliveries")
    _deliveries_schema(ctx, ex)
    if ctx.admin_key:
        ex = ctx.call("GET", f"/v1/admin/webhooks/{sid}/deliveries", key="admin")
        ctx.expect("listWebhookDeliveries", ex, 200, what="GET /v1/admin/webhooks/{id}/deliveries")
        _deliveries_schema(ctx, ex)
    else:
        for frag in ("listWebhookDeliveries", "replayEvents"):
            ctx.record(frag, UNTESTED, "needs --admin-key")
    for s in tenant_hooks:
        ctx.cleanup.append(lambda s=s: ctx.call("DELETE", f"/v1/webhooks/{s}", validate=False).status < 300)


def _deliveries_schema(ctx: Context, ex) -> None:
    if ex.status != 200:
        return
    if ex.schema_errors:
        ctx.fail("WebhookDelivery envelope", "a deliveries list does not match the schema", ex, "WebhookDelivery")
    elif (ex.body or {}).get("deliveries"):
        ctx.ok("WebhookDelivery envelope", "deliveries valid against WebhookDelivery")


@check("correlation")
def correlation(ctx: Context) -> None:
    """X-Request-Id and X-Cycles-Trace-Id on 2xx and 4xx answers; inbound precedence; malformed headers ignored."""
    trace, other = secrets.token_hex(16), secrets.token_hex(16)
    ok_path, ok_params = ("/v1/balances", {"tenant": ctx.tenant}) if ctx.tenant else ("/v1/auth/introspect", None)
    parent = f"00-{trace}-{secrets.token_hex(8)}-01"
    samples = [
        ("2xx", ctx.call("GET", ok_path, params=ok_params, headers={"X-Cycles-Trace-Id": trace})),
        ("404", ctx.call("POST", f"/v1/reservations/conformance-missing-{key()}/release",
                         json_body={"idempotency_key": key()}, headers={"X-Cycles-Trace-Id": trace})),
        ("401", ctx.call("GET", "/v1/balances", key=None, headers={"X-Cycles-Trace-Id": trace})),
    ]
    for what, ex in samples:
        rid = ex.headers.get("x-request-id")
        if not rid:
            ctx.fail("X-Request-Id", f"the {what} answer has no X-Request-Id header", ex, "an X-Request-Id header")
        elif ex.status >= 400 and (ex.body or {}).get("request_id") != rid:
            ctx.fail("X-Request-Id", f"the {what} ErrorResponse.request_id differs from X-Request-Id", ex,
                     f"request_id == {rid}")
        else:
            ctx.ok("X-Request-Id", f"{what}: X-Request-Id present")
        got = ex.headers.get("x-cycles-trace-id")
        if got != trace:
            ctx.fail("X-Cycles-Trace-Id on every response", f"the {what} answer echoed X-Cycles-Trace-Id {got!r}",
                     ex, f"X-Cycles-Trace-Id: {trace}")
        elif ex.status >= 400 and (ex.body or {}).get("trace_id") != trace:
            ctx.fail("X-Cycles-Trace-Id on every response", f"the {what} ErrorResponse has no matching trace_id", ex,
                     f"trace_id == {trace}")
        else:
            ctx.ok("X-Cycles-Trace-Id on every response", f"{what}: echoed")
    ex = ctx.call("GET", ok_path, params=ok_params, headers={"traceparent": parent, "X-Cycles-Trace-Id": other})
    if ex.headers.get("x-cycles-trace-id") != trace:
        ctx.fail("Inbound header precedence", "with both headers valid and disagreeing, traceparent did not win", ex,
                 f"X-Cycles-Trace-Id: {trace}")
    else:
        ctx.ok("Inbound header precedence", "traceparent wins over X-Cycles-Trace-Id")
    ex = ctx.call("GET", ok_path, params=ok_params,
                  headers={"traceparent": "00-zzzz-bad-01", "X-Cycles-Trace-Id": "0" * 32})
    generated = ex.headers.get("x-cycles-trace-id") or ""
    if ex.status != 200 or not TRACE_RE.match(generated) or generated == "0" * 32:
        ctx.fail("Inbound header precedence", "malformed correlation headers were not treated as absent", ex,
                 "HTTP 200 with a freshly generated 32-hex X-Cycles-Trace-Id")
    else:
        ctx.ok("Inbound header precedence", "malformed headers ignored, a trace id generated")


@check("should")
def optional_operations(ctx: Context) -> None:
    subject = ctx.subject_for("opt", 1_000, 10)
    ex = ctx.call("POST", "/v1/decide", json_body=reserve_body(subject, 1))
    ctx.expect("Implement POST /v1/decide", ex, 200, what="decide")
    body, ex = reserve_body(subject, 1), None
    ex = ctx.call("POST", "/v1/reservations", json_body=body)
    if ex.status == 200:
        rid = ex.body["reservation_id"]
        one = ctx.call("GET", f"/v1/reservations/{rid}")
        ctx.expect("getReservation", one, 200, what="GET /v1/reservations/{id}")
        listed = ctx.call("GET", "/v1/reservations", params={"idempotency_key": body["idempotency_key"]})
        if ctx.expect("listReservations", listed, 200, what="GET /v1/reservations?idempotency_key="):
            ids = [r.get("reservation_id") for r in (listed.body or {}).get("reservations", [])]
            if rid not in ids:
                ctx.fail("listReservations", "filtering by idempotency_key did not find the reservation", listed,
                         f"reservation {rid}")
        ctx.call("POST", f"/v1/reservations/{rid}/release", json_body={"idempotency_key": key()})
    ex = ctx.call("POST", "/v1/events", json_body={"idempotency_key": key(), "subject": subject,
                                                   "action": {"kind": "llm.completion", "name": "conformance"},
                                                   "actual": {"unit": UNIT, "amount": 1}})
    ctx.expect("Implement POST /v1/events", ex, 201, what="createEvent")
    ctx.record("Publish metrics / logs", UNTESTED, "operator-side metrics and logs are not observable over the API")


@check("upcoming")
def upcoming(ctx: Context) -> None:
    """v0.1.26 surfaces: reported, never failing the run while the spec keeps them upcoming."""
    probes = [("listActionKinds", "GET", "/v1/action-kinds", "tenant"),
              ("getActionKind", "GET", "/v1/action-kinds/llm.completion", "tenant"),
              ("listActionQuotaCounters", "GET", "/v1/admin/action-quota-counters", "admin"),
              ("resetActionQuotaCounter", "POST", "/v1/admin/action-quota-counters/reset", "admin"),
              ("updateTenantObserveMode", "PATCH", f"/v1/admin/tenants/{ctx.tenant}/observe-mode", "admin")]
    for frag, method, path, who in probes:
        if who == "admin" and not ctx.admin_key:
            ctx.record(frag, UNTESTED, "needs --admin-key")
            continue
        ex = ctx.call(method, path, key=who, json_body={} if method != "GET" else None, validate=False)
        if ex.status in (404, 405, 501) and ex.error in (None, "NOT_FOUND", "NOT_IMPLEMENTED"):
            ctx.fail(frag, f"{method} {path}: HTTP {ex.status} (not implemented)", ex, "the v0.1.26 operation")
        else:
            ctx.ok(frag, f"{method} {path}: HTTP {ex.status}")


@check("closed")
def closed_tenant(ctx: Context) -> None:
    """Runs last: closes the run's tenant (also its cleanup) and tries a fresh mutation of it."""
    if not ctx.provisioned or ctx.tenant is None or not ctx.tenant.startswith("conformance-"):
        ctx.record("TENANT_CLOSED", UNTESTED, "needs --admin-key and a tenant the kit created (it closes it)")
        return
    subject = ctx.budget("closing", 1_000)
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(subject, 5))
    rid = ex.body.get("reservation_id") if ex.status == 200 else None
    ex = ctx.call("PATCH", f"/v1/admin/tenants/{ctx.tenant}", key="admin", json_body={"status": "CLOSED"},
                  validate=False)
    if ex.status != 200:
        ctx.record("TENANT_CLOSED", NA, f"the server does not close tenants through PATCH /v1/admin/tenants "
                   f"({ex.status}); a deployment's own mechanism is not reachable from here")
        return
    ctx.provisioned = False
    ex = ctx.call("POST", "/v1/reservations", json_body=reserve_body(subject, 5))
    if ex.status < 300:
        ctx.fail("TENANT_CLOSED", "a reservation for a CLOSED tenant succeeded", ex, "HTTP 409 TENANT_CLOSED")
    elif ex.status == 409 and ex.error == "TENANT_CLOSED":
        ctx.ok("TENANT_CLOSED", "fresh reserve after close: 409 TENANT_CLOSED")
    elif ex.status == 401:
        ctx.record("TENANT_CLOSED", UNTESTED, "closing revoked the tenant's keys (401), so the 409 window "
                   "between the CLOSED flip and key revocation cannot be observed from outside")
    else:
        ctx.fail("TENANT_CLOSED", f"reserve after close answered {ex.status} {ex.error}", ex, "409 TENANT_CLOSED")
    if rid:
        ex = ctx.call("POST", f"/v1/reservations/{rid}/commit",
                      json_body={"idempotency_key": key(), "actual": {"unit": UNIT, "amount": 1}})
        if ex.status < 300:
            ctx.fail("TENANT_CLOSED", "a commit for a CLOSED tenant succeeded", ex, "HTTP 409 TENANT_CLOSED")
