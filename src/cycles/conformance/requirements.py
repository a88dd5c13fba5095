"""The requirements the kit reports on: CONFORMANCE.md's MUST and SHOULD items (and the normative sections of
cycles-protocol-v0.yaml those items point to), each with the document's section and wording.

The id is "<section> / <item>" in the document's own words; it is stable across kit versions (the JSON
report is keyed by it). `group` is what `--only` selects.
"""

from __future__ import annotations

from dataclasses import dataclass

MUST = "MUST"
SHOULD = "SHOULD"


@dataclass(frozen=True)
class Requirement:
    id: str
    level: str
    section: str
    source: str
    text: str
    group: str


def _r(level: str, section: str, item: str, text: str, group: str, source: str = "CONFORMANCE.md") -> Requirement:
    return Requirement(f"{section} / {item}", level, section, source, text, group)


RUNTIME = "MUST: Runtime operations"
INVARIANTS = "MUST: Core invariants"
ERRORS = "MUST: Error semantics"
AUTH = "MUST: Authentication & tenancy"
CROSS = "MUST: Cross-plane operations"
SCHEMAS = "MUST: Normative schemas"
WEBHOOK_INV = "MUST: Normative invariants (webhook subscriptions)"
TRACING = "cycles-protocol-v0.yaml: CORRELATION AND TRACING (NORMATIVE)"
SHOULD_S = "SHOULD"
UPCOMING = "SHOULD: Upcoming (v0.1.26)"
PROTO = "cycles-protocol-v0.yaml"
ADMIN = "cycles-governance-admin-v0.1.25.yaml"

CATALOG: list[Requirement] = [
    _r(MUST, RUNTIME, "POST /v1/reservations — createReservation",
       "Implement and honor the semantics of the 4 core runtime operations: createReservation.", "operations"),
    _r(MUST, RUNTIME, "POST /v1/reservations/{reservation_id}/commit — commitReservation",
       "Implement and honor the semantics of the 4 core runtime operations: commitReservation.", "operations"),
    _r(MUST, RUNTIME, "POST /v1/reservations/{reservation_id}/release — releaseReservation",
       "Implement and honor the semantics of the 4 core runtime operations: releaseReservation.", "operations"),
    _r(MUST, RUNTIME, "POST /v1/reservations/{reservation_id}/extend — extendReservation",
       "extendReservation (TTL heartbeat for long-running operations).", "ttl"),
    _r(MUST, RUNTIME, "commits are accepted through (expires_at_ms + grace_period_ms)",
       "Reservations expire at expires_at_ms; commits are accepted through (expires_at_ms + grace_period_ms).",
       "ttl", PROTO),
    _r(MUST, RUNTIME, "an expired reservation returns its budget",
       "Reservation TTL expired without commit or release (via background sweeper): the held amount is no longer "
       "reserved.", "ttl", PROTO),
    _r(MUST, INVARIANTS, "Atomic reservation",
       "Budget is locked across all affected scopes in one step; no partial locks.", "atomic"),
    _r(MUST, INVARIANTS, "Concurrency-safe enforcement",
       "Shared budgets MUST NOT be oversubscribed under concurrent reserve calls.", "concurrency"),
    _r(MUST, INVARIANTS, "Idempotent commit and release",
       "Retries MUST be safe; the same action MUST NOT settle twice. On replay the server MUST return the original "
       "successful response outcome and payload.", "idempotency"),
    _r(MUST, INVARIANTS, "Unit consistency",
       "Every reserve / commit / release / event operation MUST validate and preserve unit denomination.", "units"),
    _r(MUST, ERRORS, "BUDGET_EXCEEDED (409)", "Budget denials MUST return HTTP 409 with error=BUDGET_EXCEEDED.",
       "errors"),
    _r(MUST, ERRORS, "OVERDRAFT_LIMIT_EXCEEDED (409)",
       "Overdraft limit exceeded MUST return HTTP 409 with error=OVERDRAFT_LIMIT_EXCEEDED.", "overdraft"),
    _r(MUST, ERRORS, "IDEMPOTENCY_MISMATCH (409)",
       "If the same key is reused with a different request payload, server MUST return 409 IDEMPOTENCY_MISMATCH.",
       "idempotency"),
    _r(MUST, ERRORS, "RESERVATION_FINALIZED (409)",
       "Finalized reservations MUST return HTTP 409 with error=RESERVATION_FINALIZED.", "errors"),
    _r(MUST, ERRORS, "RESERVATION_EXPIRED (410)",
       "Expired reservations MUST return HTTP 410 with error=RESERVATION_EXPIRED (commit/release: beyond "
       "expires_at_ms + grace_period_ms; extend: beyond expires_at_ms).", "ttl"),
    _r(MUST, ERRORS, "UNIT_MISMATCH (400)", "Unit mismatch MUST return HTTP 400 with error=UNIT_MISMATCH.", "units"),
    _r(MUST, ERRORS, "NOT_FOUND (404)", "Reservations that never existed MUST return HTTP 404 with error=NOT_FOUND.",
       "errors"),
    _r(MUST, ERRORS, "DEBT_OUTSTANDING (409)",
       "Outstanding debt blocking reservation MUST return HTTP 409 with error=DEBT_OUTSTANDING.", "overdraft"),
    _r(MUST, ERRORS, "TENANT_CLOSED (409)",
       "The persisting mutation surface MUST return TENANT_CLOSED (409) on a fresh request when the owning "
       "tenant's status is CLOSED.", "closed"),
    _r(MUST, AUTH, "Authenticate via X-Cycles-API-Key",
       "Authenticate via X-Cycles-API-Key header (a request without a valid key is refused with 401).", "auth"),
    _r(MUST, AUTH, "Enforce tenant isolation",
       "Enforce tenant isolation: subject.tenant MUST match the effective tenant (403 FORBIDDEN); one tenant "
       "never reads or settles another's reservations.", "auth"),
    _r(MUST, CROSS, "GET /v1/admin/events — listEvents", "Normative operation listEvents.", "events", ADMIN),
    _r(MUST, CROSS, "GET /v1/admin/events/{event_id} — getEvent", "Normative operation getEvent.", "events", ADMIN),
    _r(MUST, CROSS, "POST /v1/admin/webhooks/{subscription_id}/replay — replayEvents",
       "Normative operation replayEvents.", "webhooks", ADMIN),
    _r(MUST, CROSS, "GET /v1/events — listTenantEvents", "Normative operation listTenantEvents (tenant-scoped).",
       "events", ADMIN),
    _r(MUST, CROSS, "GET /v1/admin/webhooks/{subscription_id}/deliveries — listWebhookDeliveries",
       "Normative operation listWebhookDeliveries.", "webhooks", ADMIN),
    _r(MUST, CROSS, "GET /v1/webhooks/{subscription_id}/deliveries — listTenantWebhookDeliveries",
       "Normative operation listTenantWebhookDeliveries (tenant-scoped).", "webhooks", ADMIN),
    _r(MUST, CROSS, "GET /v1/balances — getBalances", "Normative operation getBalances.", "operations", ADMIN),
    _r(MUST, CROSS, "GET /v1/auth/introspect — introspectAuth", "Normative operation introspectAuth.", "auth",
       ADMIN),
    _r(MUST, SCHEMAS, "Event, EventType, and all EventData* payload variants",
       "Any events emitted MUST conform to the EventType enum and EventData* payload schemas.", "events", ADMIN),
    _r(MUST, SCHEMAS, "WebhookDelivery envelope",
       "Any webhooks delivered MUST match the WebhookDelivery envelope shape.", "webhooks", ADMIN),
    _r(MUST, SCHEMAS, "Permission enum", "Permissions reported by the server are values of the Permission enum.",
       "auth", ADMIN),
    _r(MUST, SCHEMAS, "shared Amount, Subject, Balance",
       "Responses carrying Amount, Subject and Balance match the shared schemas (validated on every response the "
       "kit reads against the schema the spec declares for it).", "operations"),
    _r(MUST, WEBHOOK_INV, "Selector presence",
       "Every persisted subscription MUST match at least one selector; a create/update that would leave both "
       "event_types and event_categories empty MUST be rejected 400 INVALID_REQUEST.", "webhooks", ADMIN),
    _r(MUST, WEBHOOK_INV, "Tenant-owned selectors are tenant-accessible",
       "A subscription owned by a concrete tenant MUST NOT carry admin-only event types or categories (api_key / "
       "policy / webhook / system), under admin-key, admin-on-behalf-of, and tenant auth.", "webhooks", ADMIN),
    _r(MUST, TRACING, "X-Request-Id on every response and ErrorResponse",
       "request_id — set by the server; echoed on X-Request-Id response header and on ErrorResponse.", "correlation",
       PROTO),
    _r(MUST, TRACING, "X-Cycles-Trace-Id on every response",
       "Servers MUST echo X-Cycles-Trace-Id on every response (2xx, 4xx, 5xx); ErrorResponse bodies MUST carry "
       "trace_id.", "correlation", PROTO),
    _r(MUST, TRACING, "Inbound header precedence",
       "traceparent (valid) wins, else a valid X-Cycles-Trace-Id, else a generated id; a malformed correlation "
       "header MUST be treated as absent and MUST NOT cause a rejection.", "correlation", PROTO),
    _r(SHOULD, SHOULD_S, "Emit events for budget-state changes",
       "Emit events for budget-state changes (reservation.*, budget.*, quota.*) matching the EventType enum.",
       "events"),
    _r(SHOULD, SHOULD_S, "Propagate X-Cycles-Trace-Id and traceparent",
       "Propagate X-Cycles-Trace-Id and W3C traceparent headers (to the events a request causes).", "events"),
    _r(SHOULD, SHOULD_S, "Implement POST /v1/decide", "Implement POST /v1/decide.", "should"),
    _r(SHOULD, SHOULD_S, "Implement GET /v1/reservations (listReservations)",
       "Implement listReservations (re-discover a lost reservation_id via idempotency_key).", "should"),
    _r(SHOULD, SHOULD_S, "Implement GET /v1/reservations/{reservation_id} (getReservation)",
       "Implement getReservation.", "should"),
    _r(SHOULD, SHOULD_S, "Implement POST /v1/events (createEvent)", "Implement createEvent.", "should"),
    _r(SHOULD, SHOULD_S, "Publish metrics / logs when scopes enter is_over_limit",
       "Publish metrics / logs when scopes enter is_over_limit: true state.", "should"),
    _r(SHOULD, UPCOMING, "GET /v1/action-kinds — listActionKinds", "Action-kind registry.", "upcoming"),
    _r(SHOULD, UPCOMING, "GET /v1/action-kinds/{kind} — getActionKind", "Action-kind registry.", "upcoming"),
    _r(SHOULD, UPCOMING, "GET /v1/admin/action-quota-counters — listActionQuotaCounters", "Action-kind registry.",
       "upcoming"),
    _r(SHOULD, UPCOMING, "POST /v1/admin/action-quota-counters/reset — resetActionQuotaCounter",
       "Action-kind registry.", "upcoming"),
    _r(SHOULD, UPCOMING, "updateTenantObserveMode / updatePolicyActionQuotas",
       "Governance extensions: 2 PATCH operations (or an equivalent mechanism).", "upcoming"),
]

BY_ID = {r.id: r for r in CATALOG}
GROUPS = sorted({r.group for r in CATALOG})


def req(fragment: str) -> Requirement:
    """The one requirement whose id contains `fragment` (checks name requirements by a unique fragment)."""
    found = [r for r in CATALOG if fragment in r.id]
    if len(found) != 1:
        raise KeyError(f"{fragment!r} names {len(found)} requirements")
    return found[0]
