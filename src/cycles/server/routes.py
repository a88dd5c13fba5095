"""The route table: one entry per operation, used both to serve and to describe the API (OpenAPI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..protocol import admin as a
from ..protocol import evidence as EV
from ..protocol import models as m
from . import (
    actions, admin, bulk, events, evidence, governance, operators, overview, policies, runtime, usage,
    webhook_delivery, webhooks,
)
from ..protocol import actions as ak
from ..protocol import governance as g
from ..core import events as E
from ..core.scopes import LEVELS
from ..webhooks import wire as webhook_wire
W = webhooks.W


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    handler: Callable[..., Any]
    request: type | None = None
    responses: dict[int, type | None] = field(default_factory=dict)
    security: tuple[str, ...] = ("ApiKeyAuth",)
    query: tuple[tuple[Any, ...], ...] = ()  # (name, type, description[, need]): see openapi.query_parameter
    throttled: bool = False  # a public operation that answers 429 + Retry-After (authenticated ones all may)


REQUIRED, ADMIN = "required", "admin"  # the optional 4th element of a query parameter (see openapi.query_parameter)
SORT_DIR = ("asc", "desc")
LIMIT_100 = ("limit", "int:1..100", "default 50")
TRACE_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
AUDIT_SORTS = ("timestamp", "operation", "resource_type", "tenant_id", "key_id", "status")
EVENT_SORTS = ("event_type", "category", "scope", "tenant_id", "timestamp")
WEBHOOK_EVENT_TYPE = {"anyOf": [{"type": "string", "enum": list(E.EVENT_TYPES)},
                                {"type": "string", "pattern": "^custom\\.", "maxLength": 128}]}
_BUDGET_TARGET = (("scope", "tenant-scope", "", REQUIRED), ("unit", m.UNITS, "", REQUIRED))

_RESERVATION_FILTERS = (
    ("tenant", "string:128", "A tenant key may name only its own tenant", ADMIN),
    ("idempotency_key", "string", "Recover a reservation by the key of its create request"),
    ("status", runtime.RESERVATION_STATUSES, ""),
    ("workspace", "string:128", ""), ("app", "string:128", ""), ("workflow", "string:128", ""),
    ("agent", "string:128", ""), ("toolset", "string:128", ""),
    ("from", "date-time", "created_at_ms >= from"), ("to", "date-time", "created_at_ms <= to"),
    ("expires_from", "date-time", ""), ("expires_to", "date-time", ""),
    ("finalized_from", "date-time", ""), ("finalized_to", "date-time", ""),
    ("sort_by", runtime.SORT_KEYS, "default created_at_ms"),
    ("sort_dir", SORT_DIR, "default desc"),
    ("include", "text", "comma-separated: metadata, committed_metadata, evidence"),
    ("limit", "int:1..200", "default 50"), ("cursor", "string", "Opaque cursor from the previous page"),
)
_WINDOW = (
    ("from", "date-time", "Window start (default: 24 hours before to)"), ("to", "date-time", "Window end (default: now)"),
    ("bucket_seconds", "int:1..2678400", "Bucket width; default fits about 96 buckets; at most 1000 buckets"),
)
_USAGE_FILTERS = _WINDOW + (
    ("scope_prefix", "string:1024", "Only spend at this scope or below it (tenant:<id>/...)"), ("unit", m.UNITS, ""),
    ("group_by", usage.GROUPS, ""),
)
_DENIALS = _WINDOW + (
    ("observed", "boolean", "true: observe mode's would-be denials (reservation.observed_denied) instead"),
)
_SUBJECT_FILTERS = tuple((lvl, "string:128", "At least one level is required" if lvl == "tenant" else "")
                         for lvl in LEVELS)

OPS: tuple[Op, ...] = (
    Op("POST", "/v1/reservations", "createReservation", "Reserve budget for a planned action", "Reservations",
       runtime.create_reservation, m.ReservationCreateRequest, {200: m.ReservationCreateResponse}),
    Op("GET", "/v1/reservations", "listReservations", "List reservations", "Reservations",
       runtime.list_reservations, None, {200: m.ReservationListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       _RESERVATION_FILTERS),
    Op("GET", "/v1/reservations/{reservation_id}", "getReservation", "Get one reservation", "Reservations",
       runtime.get_reservation, None, {200: m.ReservationDetail}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("POST", "/v1/reservations/{reservation_id}/commit", "commitReservation", "Commit actual spend",
       "Reservations", runtime.commit, m.CommitRequest, {200: m.CommitResponse}),
    Op("POST", "/v1/reservations/{reservation_id}/release", "releaseReservation", "Release a reservation",
       "Reservations", runtime.release, m.ReleaseRequest, {200: m.ReleaseResponse}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("POST", "/v1/reservations/{reservation_id}/extend", "extendReservation", "Extend a reservation's TTL",
       "Reservations", runtime.extend, m.ReservationExtendRequest, {200: m.ReservationExtendResponse}),
    Op("POST", "/v1/decide", "decide", "Preflight decision (no reservation)", "Decisions", runtime.decide,
       m.DecisionRequest, {200: m.DecisionResponse}),
    Op("GET", "/v1/balances", "getBalances", "Balances of the scopes matching a subject filter", "Balances",
       runtime.balances, None, {200: m.BalanceResponse}, ("ApiKeyAuth",),
       _SUBJECT_FILTERS + (("include_children", "boolean", ""), ("limit", "int:1..200", ""),
                           ("cursor", "string", ""))),
    Op("POST", "/v1/events", "createEvent", "Post-only accounting event", "Events", runtime.create_event,
       m.EventCreateRequest, {201: m.EventCreateResponse}),
    Op("GET", "/v1/action-kinds", "listActionKinds", "List the canonical action kind registry (public, rate-limited)",
       "ActionKinds", actions.list_action_kinds, None, {200: ak.ActionKindRegistry}, (),
       (("risk_class", "string", "read_only, local_mutation, side_effect, external_side_effect or high_risk"),
        ("deprecated", "boolean", "include deprecated kinds (default false)"), ("limit", "integer", "1..100"),
        ("cursor", "string", "")), throttled=True),
    Op("GET", "/v1/action-kinds/{kind}", "getActionKind", "Get one action kind (exact match)", "ActionKinds",
       actions.get_action_kind, None, {200: ak.ActionKind}, (), throttled=True),
    Op("GET", "/v1/admin/action-quota-counters", "listActionQuotaCounters",
       "Live action quota counters (action_quotas:read; balances:read accepted, deprecated)", "ActionQuotas",
       actions.list_counters, None, {200: ak.ActionQuotaCounterListResponse}, ("AdminKeyAuth", "ApiKeyAuth"),
       (("tenant_id", "string", "Admin key: required"), ("scope", "string", "scope prefix"),
        ("action_kind", "string", ""), ("window", "string", ""), ("run_id", "string", "per_run counters of a run"),
        ("include_zero", "boolean", ""), ("limit", "integer", "1..200"), ("cursor", "string", ""))),
    Op("POST", "/v1/admin/action-quota-counters/reset", "resetActionQuotaCounter",
       "Reset one action quota counter to 0 (incident response; audited)", "ActionQuotas", actions.reset_counter,
       ak.ActionQuotaCounterResetRequest, {200: ak.ActionQuotaCounterResetResponse}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/tenants", "createTenant", "Create a tenant (idempotent on tenant_id)", "Tenants",
       admin.create_tenant, a.TenantCreateRequest, {201: a.Tenant, 200: a.Tenant}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/tenants/{tenant_id}", "getTenant", "Get a tenant", "Tenants", admin.get_tenant, None,
       {200: a.Tenant}, ("AdminKeyAuth",)),
    Op("PATCH", "/v1/admin/tenants/{tenant_id}", "updateTenant", "Update a tenant's settings or status", "Tenants",
       admin.update_tenant, a.TenantUpdateRequest, {200: a.Tenant}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/api-keys", "createApiKey", "Create a tenant API key (secret shown once)", "API Keys",
       admin.create_api_key, a.ApiKeyCreateRequest, {201: a.ApiKeyCreateResponse}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/budgets", "createBudget", "Create a budget ledger for (scope, unit)", "Budgets",
       admin.create_budget, a.BudgetCreateRequest, {201: a.BudgetLedger}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/budgets", "listBudgets", "List budget ledgers", "Budgets", admin.list_budgets, None,
       {200: a.BudgetListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("tenant_id", "text", "At most 64 characters; ignored with a tenant key"), ("scope_prefix", "string:1024", ""),
        ("unit", m.UNITS, ""), ("status", ("ACTIVE", "FROZEN", "CLOSED"), ""), ("over_limit", "boolean", ""),
        ("has_debt", "boolean", ""), ("sort_by", admin.BUDGET_SORTS, ""), ("sort_dir", SORT_DIR, ""), LIMIT_100,
        ("cursor", "string", ""))),
    Op("POST", "/v1/admin/budgets/fund", "fundBudget", "Credit, debit, reset or repay a budget", "Budgets",
       admin.fund_budget, a.BudgetFundingRequest, {200: a.BudgetFundingResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       _BUDGET_TARGET + (("tenant_id", "text", "At most 64 characters; ignored with a tenant key", ADMIN),)),
    Op("GET", "/v1/admin/tenants", "listTenants", "List tenants", "Tenants", governance.list_tenants, None,
       {200: g.TenantListResponse}, ("AdminKeyAuth",),
       (("status", ("ACTIVE", "SUSPENDED", "CLOSED"), ""), ("parent_tenant_id", "string:64", ""),
        ("search", "string:128", "substring of id or name"), ("sort_by", governance.TENANT_SORTS, ""),
        ("sort_dir", SORT_DIR, "default asc"), LIMIT_100, ("cursor", "string", ""))),
    Op("GET", "/v1/admin/api-keys", "listApiKeys", "List API keys", "API Keys", governance.list_api_keys, None,
       {200: g.ApiKeyListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", ""), ("status", ("ACTIVE", "REVOKED", "EXPIRED"), ""), ("search", "string:128", ""),
        LIMIT_100, ("cursor", "string", ""))),
    Op("PATCH", "/v1/admin/api-keys/{key_id}", "updateApiKey", "Change a key's permissions, scope_filter or labels",
       "API Keys", governance.update_api_key, g.ApiKeyUpdateRequest, {200: g.ApiKey}, ("AdminKeyAuth",)),
    Op("DELETE", "/v1/admin/api-keys/{key_id}", "revokeApiKey", "Revoke an API key (permanent)", "API Keys",
       governance.revoke_api_key, None, {200: g.ApiKey}, ("AdminKeyAuth",), (("reason", "string:512", ""),)),
    Op("POST", "/v1/auth/validate", "validateApiKey", "Validate an API key secret", "API Keys",
       governance.validate_api_key, g.ApiKeyValidationRequest, {200: g.ApiKeyValidationResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/auth/introspect", "introspectAuth", "Effective permissions and capabilities of the caller",
       "Dashboard", governance.introspect, None, {200: g.AuthIntrospectResponse}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/budgets/lookup", "lookupBudget", "Get one budget by (scope, unit)", "Budgets",
       governance.lookup_budget, None, {200: a.BudgetLedger}, ("ApiKeyAuth", "AdminKeyAuth"),
       _BUDGET_TARGET),
    Op("PATCH", "/v1/admin/budgets", "updateBudget", "Update overdraft_limit, commit_overage_policy or metadata",
       "Budgets", governance.update_budget, g.BudgetUpdateRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       _BUDGET_TARGET),
    Op("POST", "/v1/admin/budgets/freeze", "freezeBudget", "Freeze a budget (ACTIVE → FROZEN)", "Budgets",
       governance.freeze_budget, g.BudgetStatusTransitionRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       _BUDGET_TARGET),
    Op("POST", "/v1/admin/budgets/close", "closeBudget", "Close a budget for good (extension)", "Budgets",
       governance.close_budget, g.BudgetStatusTransitionRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       _BUDGET_TARGET),
    Op("POST", "/v1/admin/budgets/unfreeze", "unfreezeBudget", "Unfreeze a budget (FROZEN → ACTIVE)", "Budgets",
       governance.unfreeze_budget, g.BudgetStatusTransitionRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       _BUDGET_TARGET),
    Op("POST", "/v1/admin/policies", "createPolicy", "Create a policy", "Policies", policies.create_policy,
       g.PolicyCreateRequest, {201: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/policies", "listPolicies", "List policies", "Policies", policies.list_policies, None,
       {200: g.PolicyListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("tenant_id", "text", "At most 64 characters; ignored with a tenant key", ADMIN),
        ("scope_pattern", "string:1024", ""), ("status", ("ACTIVE", "DISABLED"), ""), LIMIT_100,
        ("cursor", "string", ""))),
    Op("GET", "/v1/admin/policies/{policy_id}", "getPolicy", "Get a policy", "Policies", policies.get_policy, None,
       {200: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("PATCH", "/v1/admin/policies/{policy_id}", "updatePolicy", "Update a policy", "Policies",
       policies.update_policy, g.PolicyUpdateRequest, {200: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("DELETE", "/v1/admin/policies/{policy_id}", "deletePolicy", "Delete a policy", "Policies",
       policies.delete_policy, None, {204: None}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/audit/logs", "listAuditLogs", "Query the audit log", "Audit", governance.list_audit_logs,
       None, {200: g.AuditLogListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", "exact; __admin__ and __unauth__ are the sentinels"), ("key_id", "string", ""),
        ("operation", "text", "comma-separated IN-list"), ("resource_type", "text", "comma-separated IN-list"),
        ("resource_id", "string", ""), ("error_code", "text", "IN-list"), ("error_code_exclude", "text", "IN-list"),
        ("status", "int:100..599", ""), ("status_min", "int:100..599", ""), ("status_max", "int:100..599", ""),
        ("from", "date-time", ""), ("to", "date-time", ""), ("search", "string:128", ""), ("trace_id", TRACE_ID, ""),
        ("request_id", "string", ""), ("sort_by", AUDIT_SORTS, "answered in time order"), ("sort_dir", SORT_DIR, ""),
        ("limit", "int:1..200", ""),
        ("cursor", "string", ""))),
    Op("POST", "/v1/admin/operator-keys", "createOperatorKey", "Create a named admin key (secret shown once)",
       "Operators", operators.create_operator_key, operators.OperatorKeyCreateRequest,
       {201: operators.OperatorKeyCreateResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/operator-keys", "listOperatorKeys", "List named admin keys", "Operators",
       operators.list_operator_keys, None, {200: operators.OperatorKeyListResponse}, ("AdminKeyAuth",)),
    Op("DELETE", "/v1/admin/operator-keys/{key_id}", "revokeOperatorKey", "Revoke a named admin key", "Operators",
       operators.revoke_operator_key, None, {200: operators.OperatorKey}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/operator-keys/bootstrap/disable", "disableBootstrapKey",
       "Turn off the bootstrap admin key (named keys keep working)", "Operators", operators.disable_bootstrap, None,
       {200: None}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/tenants/bulk-action", "bulkActionTenants",
       "Apply a lifecycle action to every tenant matching a filter", "Tenants", bulk.bulk_action_tenants,
       bulk.TenantBulkActionRequest, {200: bulk.TenantBulkActionResponse}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/budgets/bulk-action", "bulkActionBudgets",
       "Apply a balance-mutation to every budget matching a filter", "Budgets", bulk.bulk_action_budgets,
       bulk.BudgetBulkActionRequest, {200: bulk.BudgetBulkActionResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/overview", "getAdminOverview", "Operational overview from maintained counters", "Dashboard",
       overview.overview, None, {200: g.AdminOverviewResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/events", "listEvents", "Query governance events", "Events", events.list_events, None,
       {200: g.EventListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", ""), ("event_type", E.EVENT_TYPES, ""), ("category", E.CATEGORIES, ""),
        ("scope", "string:1024", "prefix"), ("correlation_id", "string", ""), ("trace_id", "string:64", ""),
        ("request_id", "string", ""), ("from", "date-time", ""), ("to", "date-time", ""), ("search", "string:128", ""),
        ("sort_by", EVENT_SORTS, "answered in time order"), ("sort_dir", SORT_DIR, ""), LIMIT_100,
        ("cursor", "string", ""))),
    Op("GET", "/v1/admin/events/{event_id}", "getEvent", "Get one event", "Events", events.get_event, None,
       {200: g.Event}, ("AdminKeyAuth",)),
    Op("GET", "/v1/events", "listTenantEvents", "The authenticated tenant's events", "Events",
       events.list_tenant_events, None, {200: g.EventListResponse}, ("ApiKeyAuth",),
       (("event_type", E.EVENT_TYPES, ""),
        ("category", E.CATEGORIES, "only budget, reservation and tenant events are seen"),
        ("scope", "string:1024", "prefix"), ("correlation_id", "string", ""), ("from", "date-time", ""),
        ("to", "date-time", ""), ("sort_by", EVENT_SORTS, "answered in time order"), ("sort_dir", SORT_DIR, ""),
        LIMIT_100, ("cursor", "string", ""))),
    Op("POST", "/v1/admin/webhooks/bulk-action", "bulkActionWebhooks",
       "Apply PAUSE, RESUME or DELETE to every webhook subscription matching a filter", "Webhooks",
       webhooks.bulk_action_webhooks, webhook_wire.WebhookBulkActionRequest, {200: webhooks.WebhookBulkActionResponse},
       ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/webhooks", "createWebhookSubscription", "Create a webhook subscription (secret shown once)",
       "Webhooks", webhooks.create_webhook, webhook_wire.WebhookCreateRequest, {201: webhook_wire.WebhookCreateResponse},
       ("AdminKeyAuth",), (("tenant_id", "string", "Owning tenant; omit for a system-wide (__system__) subscription"),)),
    Op("GET", "/v1/admin/webhooks", "listWebhookSubscriptions", "List webhook subscriptions", "Webhooks",
       webhooks.list_webhooks, None, {200: webhook_wire.WebhookListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", ""), ("status", W.STATUSES, ""),
        ("event_type", WEBHOOK_EVENT_TYPE, "subscriptions selecting this event type"),
        ("search", "string:128", "substring of subscription_id or url"),
        ("sort_by", W.SORT_KEYS, "default consecutive_failures"),
        ("sort_dir", SORT_DIR, "default desc"), LIMIT_100, ("cursor", "string", ""))),
    Op("GET", "/v1/admin/webhooks/{subscription_id}", "getWebhookSubscription", "Get a webhook subscription",
       "Webhooks", webhooks.get_webhook, None, {200: webhook_wire.WebhookSubscription}, ("AdminKeyAuth",)),
    Op("PATCH", "/v1/admin/webhooks/{subscription_id}", "updateWebhookSubscription",
       "Update, pause, resume or re-key a webhook subscription", "Webhooks", webhooks.update_webhook,
       webhook_wire.WebhookUpdateRequest, {200: webhook_wire.WebhookUpdateResponse}, ("AdminKeyAuth",)),
    Op("DELETE", "/v1/admin/webhooks/{subscription_id}", "deleteWebhookSubscription",
       "Delete a webhook subscription", "Webhooks", webhooks.delete_webhook, None, {204: None}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/config/webhook-security", "getWebhookSecurityConfig",
       "Get the webhook URL security configuration", "Webhooks", webhooks.get_security_config, None,
       {200: webhook_wire.WebhookSecurityConfig}, ("AdminKeyAuth",)),
    Op("PUT", "/v1/admin/config/webhook-security", "updateWebhookSecurityConfig",
       "Replace the webhook URL security configuration", "Webhooks", webhooks.put_security_config,
       webhook_wire.WebhookSecurityConfig, {200: webhook_wire.WebhookSecurityConfig}, ("AdminKeyAuth",)),
    Op("POST", "/v1/webhooks", "createTenantWebhook", "Create a webhook for the authenticated tenant", "Webhooks",
       webhooks.create_tenant_webhook, webhook_wire.WebhookCreateRequest, {201: webhook_wire.WebhookCreateResponse},
       ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/webhooks", "listTenantWebhooks", "List the tenant's webhook subscriptions", "Webhooks",
       webhooks.list_tenant_webhooks, None, {200: webhook_wire.WebhookListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("tenant", "string:64", "A tenant key may name only its own tenant", ADMIN), ("status", W.STATUSES, ""),
        ("event_type", WEBHOOK_EVENT_TYPE, ""), ("search", "string:128", ""), ("sort_by", W.SORT_KEYS, ""),
        ("sort_dir", SORT_DIR, ""), LIMIT_100, ("cursor", "string", ""))),
    Op("GET", "/v1/webhooks/{subscription_id}", "getTenantWebhook", "Get one of the tenant's webhooks", "Webhooks",
       webhooks.get_tenant_webhook, None, {200: webhook_wire.WebhookSubscription}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("PATCH", "/v1/webhooks/{subscription_id}", "updateTenantWebhook", "Update one of the tenant's webhooks",
       "Webhooks", webhooks.update_tenant_webhook, webhook_wire.WebhookUpdateRequest,
       {200: webhook_wire.WebhookUpdateResponse}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("DELETE", "/v1/webhooks/{subscription_id}", "deleteTenantWebhook", "Delete one of the tenant's webhooks",
       "Webhooks", webhooks.delete_tenant_webhook, None, {204: None}, ("ApiKeyAuth", "AdminKeyAuth")),
    # -- webhook subscription routes --
    Op("POST", "/v1/admin/webhooks/{subscription_id}/test", "testWebhookSubscription",
       "Send a signed system.webhook_test event to the subscription's URL", "Webhooks",
       webhook_delivery.test_webhook, None, {200: webhook_delivery.WebhookTestResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/admin/webhooks/{subscription_id}/deliveries", "listWebhookDeliveries",
       "List the deliveries of a subscription (newest first)", "Webhooks", webhook_delivery.list_deliveries, None,
       {200: webhook_delivery.WebhookDeliveryListResponse}, ("AdminKeyAuth",), webhook_delivery.DELIVERY_FILTERS),
    Op("POST", "/v1/admin/webhooks/{subscription_id}/replay", "replayEvents",
       "Re-deliver the events of a time window to a subscription", "Webhooks", webhook_delivery.replay_events,
       webhook_delivery.WebhookReplayRequest, {202: webhook_delivery.WebhookReplayResponse}, ("AdminKeyAuth",)),
    Op("POST", "/v1/admin/webhooks/{subscription_id}/deliveries/{delivery_id}/resend", "resendWebhookDelivery",
       "Deliver the event of one delivery again, as a new delivery (extension)", "Webhooks",
       webhook_delivery.resend_delivery, None, {202: webhook_delivery.WebhookResendResponse}, ("AdminKeyAuth",)),
    Op("POST", "/v1/webhooks/{subscription_id}/test", "testTenantWebhook",
       "Send a signed system.webhook_test event to one of the tenant's webhooks", "Webhooks",
       webhook_delivery.test_tenant_webhook, None, {200: webhook_delivery.WebhookTestResponse},
       ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/webhooks/{subscription_id}/deliveries", "listTenantWebhookDeliveries",
       "List the deliveries of one of the tenant's webhooks", "Webhooks", webhook_delivery.list_tenant_deliveries,
       None, {200: webhook_delivery.WebhookDeliveryListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       webhook_delivery.DELIVERY_FILTERS),
    # -- webhook delivery routes --
    Op("GET", "/v1/evidence/{evidence_id}", "getEvidence", "Fetch a signed CyclesEvidence envelope by content id "
       "(public, rate-limited, Cache-Control: public, immutable)", "Evidence", evidence.get_evidence, None,
       {200: EV.CyclesEvidenceEnvelope}, (), throttled=True),
    Op("GET", "/v1/.well-known/cycles-jwks.json", "getEvidenceJwks", "The signer's CyclesEvidence JWK Set, retired "
       "keys included (public, rate-limited)", "Evidence", evidence.get_jwks, None, {200: EV.CyclesEvidenceJwks}, (),
       throttled=True),
    # -- usage, denials and the live event stream (dashboard) --
    Op("GET", "/v1/admin/usage", "getAdminUsage", "Committed spend of a tenant over time, with a breakdown",
       "Dashboard", usage.admin_usage, None, {200: usage.UsageResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", "", REQUIRED),) + _USAGE_FILTERS),
    Op("GET", "/v1/usage", "getTenantUsage", "The authenticated tenant's committed spend over time", "Dashboard",
       usage.tenant_usage, None, {200: usage.UsageResponse}, ("ApiKeyAuth",), _USAGE_FILTERS),
    Op("GET", "/v1/admin/denials", "getAdminDenials", "Denied reservations over time, by reason, scope, agent, tool",
       "Dashboard", usage.admin_denials, None, {200: usage.DenialResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", "Optional; all tenants without it"),) + _DENIALS),
    Op("GET", "/v1/denials", "getTenantDenials", "The authenticated tenant's denials over time", "Dashboard",
       usage.tenant_denials, None, {200: usage.DenialResponse}, ("ApiKeyAuth",), _DENIALS),
    Op("GET", "/v1/admin/event-stream", "streamEvents",
       "Live governance events as server-sent events (text/event-stream; resumes from Last-Event-ID)", "Events",
       usage.admin_event_stream, None, {200: None}, ("AdminKeyAuth",),
       (("tenant_id", "string:64", ""), ("event_type", E.EVENT_TYPES, ""), ("category", E.CATEGORIES, ""),
        ("scope", "string:1024", "prefix"))),
    Op("GET", "/v1/event-stream", "streamTenantEvents", "The authenticated tenant's live events (server-sent events)",
       "Events", usage.tenant_event_stream, None, {200: None}, ("ApiKeyAuth",),
       (("event_type", E.EVENT_TYPES, ""), ("category", E.CATEGORIES, ""), ("scope", "string:1024", "prefix"))),
)
