"""The route table: one entry per operation, used both to serve and to describe the API (OpenAPI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..protocol import admin as a
from ..protocol import models as m
from . import admin, bulk, governance, operators, policies, runtime
from ..protocol import governance as g


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
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)


_RESERVATION_FILTERS = (
    ("tenant", "string", "Validation only for tenant keys; required filter with the admin key"),
    ("idempotency_key", "string", "Recover a reservation by the key of its create request"),
    ("status", "string", "ACTIVE, COMMITTED, RELEASED or EXPIRED"),
    ("workspace", "string", ""), ("app", "string", ""), ("workflow", "string", ""), ("agent", "string", ""),
    ("toolset", "string", ""),
    ("from", "date-time", "created_at_ms >= from"), ("to", "date-time", "created_at_ms <= to"),
    ("expires_from", "date-time", ""), ("expires_to", "date-time", ""),
    ("finalized_from", "date-time", ""), ("finalized_to", "date-time", ""),
    ("sort_by", "string", "reservation_id, tenant, scope_path, status, reserved, created_at_ms, expires_at_ms"),
    ("sort_dir", "string", "asc or desc (default desc)"),
    ("include", "string", "metadata,committed_metadata"),
    ("limit", "integer", "1..200, default 50"), ("cursor", "string", "Opaque cursor from the previous page"),
)
_SUBJECT_FILTERS = tuple((lvl, "string", "") for lvl in ("tenant", "workspace", "app", "workflow", "agent", "toolset"))

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
       _SUBJECT_FILTERS + (("include_children", "boolean", ""), ("limit", "integer", "1..200"),
                           ("cursor", "string", ""))),
    Op("POST", "/v1/events", "createEvent", "Post-only accounting event", "Events", runtime.create_event,
       m.EventCreateRequest, {201: m.EventCreateResponse}),
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
       (("tenant_id", "string", "Admin key only"), ("scope_prefix", "string", ""), ("unit", "string", ""),
        ("status", "string", ""), ("over_limit", "boolean", ""), ("has_debt", "boolean", ""),
        ("limit", "integer", "1..100"), ("cursor", "string", ""))),
    Op("POST", "/v1/admin/budgets/fund", "fundBudget", "Credit, debit, reset or repay a budget", "Budgets",
       admin.fund_budget, a.BudgetFundingRequest, {200: a.BudgetFundingResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("scope", "string", "Required"), ("unit", "string", "Required"), ("tenant_id", "string", "Admin key only"))),
    Op("GET", "/v1/admin/tenants", "listTenants", "List tenants", "Tenants", governance.list_tenants, None,
       {200: g.TenantListResponse}, ("AdminKeyAuth",),
       (("status", "string", ""), ("parent_tenant_id", "string", ""), ("search", "string", "substring of id or name"),
        ("sort_by", "string", "tenant_id, name, status, created_at"), ("sort_dir", "string", "asc or desc"),
        ("limit", "integer", "1..100"), ("cursor", "string", ""))),
    Op("GET", "/v1/admin/api-keys", "listApiKeys", "List API keys", "API Keys", governance.list_api_keys, None,
       {200: g.ApiKeyListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string", ""), ("status", "string", "ACTIVE, REVOKED or EXPIRED"), ("search", "string", ""),
        ("limit", "integer", "1..100"), ("cursor", "string", ""))),
    Op("PATCH", "/v1/admin/api-keys/{key_id}", "updateApiKey", "Change a key's permissions, scope_filter or labels",
       "API Keys", governance.update_api_key, g.ApiKeyUpdateRequest, {200: g.ApiKey}, ("AdminKeyAuth",)),
    Op("DELETE", "/v1/admin/api-keys/{key_id}", "revokeApiKey", "Revoke an API key (permanent)", "API Keys",
       governance.revoke_api_key, None, {200: g.ApiKey}, ("AdminKeyAuth",), (("reason", "string", ""),)),
    Op("POST", "/v1/auth/validate", "validateApiKey", "Validate an API key secret", "API Keys",
       governance.validate_api_key, g.ApiKeyValidationRequest, {200: g.ApiKeyValidationResponse}, ("AdminKeyAuth",)),
    Op("GET", "/v1/auth/introspect", "introspectAuth", "Effective permissions and capabilities of the caller",
       "Dashboard", governance.introspect, None, {200: g.AuthIntrospectResponse}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/budgets/lookup", "lookupBudget", "Get one budget by (scope, unit)", "Budgets",
       governance.lookup_budget, None, {200: a.BudgetLedger}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("scope", "string", ""), ("unit", "string", ""))),
    Op("PATCH", "/v1/admin/budgets", "updateBudget", "Update overdraft_limit, commit_overage_policy or metadata",
       "Budgets", governance.update_budget, g.BudgetUpdateRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       (("scope", "string", ""), ("unit", "string", ""))),
    Op("POST", "/v1/admin/budgets/freeze", "freezeBudget", "Freeze a budget (ACTIVE → FROZEN)", "Budgets",
       governance.freeze_budget, g.BudgetStatusTransitionRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       (("scope", "string", ""), ("unit", "string", ""))),
    Op("POST", "/v1/admin/budgets/unfreeze", "unfreezeBudget", "Unfreeze a budget (FROZEN → ACTIVE)", "Budgets",
       governance.unfreeze_budget, g.BudgetStatusTransitionRequest, {200: a.BudgetLedger}, ("AdminKeyAuth",),
       (("scope", "string", ""), ("unit", "string", ""))),
    Op("POST", "/v1/admin/policies", "createPolicy", "Create a policy", "Policies", policies.create_policy,
       g.PolicyCreateRequest, {201: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/policies", "listPolicies", "List policies", "Policies", policies.list_policies, None,
       {200: g.PolicyListResponse}, ("ApiKeyAuth", "AdminKeyAuth"),
       (("tenant_id", "string", "Admin key only"), ("scope_pattern", "string", ""), ("status", "string", ""),
        ("limit", "integer", "1..100"), ("cursor", "string", ""))),
    Op("GET", "/v1/admin/policies/{policy_id}", "getPolicy", "Get a policy", "Policies", policies.get_policy, None,
       {200: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("PATCH", "/v1/admin/policies/{policy_id}", "updatePolicy", "Update a policy", "Policies",
       policies.update_policy, g.PolicyUpdateRequest, {200: g.Policy}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("DELETE", "/v1/admin/policies/{policy_id}", "deletePolicy", "Delete a policy", "Policies",
       policies.delete_policy, None, {204: None}, ("ApiKeyAuth", "AdminKeyAuth")),
    Op("GET", "/v1/admin/audit/logs", "listAuditLogs", "Query the audit log", "Audit", governance.list_audit_logs,
       None, {200: g.AuditLogListResponse}, ("AdminKeyAuth",),
       (("tenant_id", "string", "exact; __admin__ and __unauth__ are the sentinels"), ("key_id", "string", ""),
        ("operation", "string", "comma-separated IN-list"), ("resource_type", "string", "comma-separated IN-list"),
        ("resource_id", "string", ""), ("error_code", "string", ""), ("error_code_exclude", "string", ""),
        ("status", "integer", ""), ("status_min", "integer", ""), ("status_max", "integer", ""),
        ("from", "date-time", ""), ("to", "date-time", ""), ("search", "string", ""), ("trace_id", "string", ""),
        ("request_id", "string", ""), ("sort_dir", "string", "asc or desc"), ("limit", "integer", "1..200"),
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
       governance.overview, None, {200: g.AdminOverviewResponse}, ("AdminKeyAuth",)),
)
