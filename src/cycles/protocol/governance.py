"""Wire models of the governance routes beyond provisioning: policies, key management, tenant
listing, budget changes, audit, introspection (cycles-governance-admin-v0.1.25.yaml shapes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from .actions import ActionQuota, ActionQuotas, KindList, RiskClassQuota, RiskClassQuotas
from .admin import Name, Permission, Reason, Tenant, Timestamp, Ttl
from .models import Amount, Caps, OveragePolicy, Wire

PolicyStatus = Literal["ACTIVE", "DISABLED"]
Description = Annotated[str, Meta(max_length=1024)]
Pattern = Annotated[str, Meta(min_length=1, max_length=1024)]
Priority = Annotated[int, Meta(ge=0, le=1_000_000)]
Free = dict[Annotated[str, Meta(max_length=128)], Any]
ScopeFilter = Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)]
Permissions = Annotated[list[Permission], Meta(max_length=64)]


class ReservationTtlOverride(Wire):
    default_ttl_ms: Ttl | None = None
    max_ttl_ms: Ttl | None = None
    max_extensions: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None


class RateLimits(Wire):
    max_reservations_per_minute: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    max_commits_per_minute: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None


class PolicyCreateRequest(Wire):
    name: Name
    scope_pattern: Pattern
    tenant_id: Annotated[str, Meta(max_length=64)] | None = None
    description: Description | None = None
    priority: Priority = 0
    caps: Caps | None = None
    commit_overage_policy: OveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: Timestamp | None = None
    effective_until: Timestamp | None = None
    # v0.1.26 (cycles-governance-extensions PolicyExtension)
    action_quotas: ActionQuotas | None = None
    risk_class_quotas: RiskClassQuotas | None = None
    allowed_action_kinds: KindList | None = None
    denied_action_kinds: KindList | None = None


class PolicyUpdateRequest(Wire):
    name: Name | None = None
    description: Description | None = None
    priority: Priority | None = None
    caps: Caps | None = None
    commit_overage_policy: OveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: Timestamp | None = None
    effective_until: Timestamp | None = None
    status: PolicyStatus | None = None
    # v0.1.26 (cycles-governance-extensions PolicyExtension)
    action_quotas: ActionQuotas | None = None
    risk_class_quotas: RiskClassQuotas | None = None
    allowed_action_kinds: KindList | None = None
    denied_action_kinds: KindList | None = None


class Policy(Wire):
    policy_id: str
    scope_pattern: str
    status: PolicyStatus
    created_at: str
    tenant_id: str | None = None
    name: str | None = None
    description: str | None = None
    priority: int | None = None
    caps: Caps | None = None
    commit_overage_policy: OveragePolicy | None = None
    reservation_ttl_override: ReservationTtlOverride | None = None
    rate_limits: RateLimits | None = None
    effective_from: str | None = None
    effective_until: str | None = None
    updated_at: str | None = None
    # v0.1.26: always returned (empty lists when unset)
    action_quotas: list[ActionQuota] | None = None
    risk_class_quotas: list[RiskClassQuota] | None = None
    allowed_action_kinds: list[str] | None = None
    denied_action_kinds: list[str] | None = None


class PolicyListResponse(Wire):
    policies: list[Policy]
    next_cursor: str | None = None
    has_more: bool | None = None


class ApiKey(Wire):
    key_id: str
    tenant_id: str
    key_prefix: str
    status: Literal["ACTIVE", "REVOKED", "EXPIRED"]
    created_at: str
    expires_at: str
    name: str | None = None
    description: str | None = None
    permissions: list[str] | None = None
    scope_filter: list[str] | None = None
    last_used_at: str | None = None
    revoked_at: str | None = None
    revoked_reason: str | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyListResponse(Wire):
    keys: list[ApiKey]
    next_cursor: str | None = None
    has_more: bool | None = None


class ApiKeyUpdateRequest(Wire):
    name: Name | None = None
    description: Description | None = None
    permissions: Permissions | None = None
    scope_filter: ScopeFilter | None = None
    metadata: Annotated[Free, Meta(max_length=64)] | None = None


class ApiKeyValidationRequest(Wire):
    key_secret: Annotated[str, Meta(max_length=512)]


class ApiKeyValidationResponse(Wire):
    valid: bool
    tenant_id: str
    key_id: str | None = None
    permissions: list[str] | None = None
    scope_filter: list[str] | None = None
    expires_at: str | None = None
    reason: str | None = None


class TenantListResponse(Wire):
    tenants: list[Tenant]
    next_cursor: str | None = None
    has_more: bool | None = None


class BudgetUpdateRequest(Wire):
    overdraft_limit: Amount | None = None
    commit_overage_policy: OveragePolicy | None = None
    metadata: Annotated[Free, Meta(max_length=64)] | None = None


class BudgetStatusTransitionRequest(Wire):
    reason: Reason | None = None
    metadata: Annotated[Free, Meta(max_length=64)] | None = None


class AuditLogEntry(Wire):
    log_id: str
    timestamp: str
    tenant_id: str
    operation: str
    status: int
    key_id: str | None = None
    user_agent: str | None = None
    source_ip: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    error_code: str | None = None
    subject: dict[str, Any] | None = None
    action: dict[str, Any] | None = None
    amount: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class AuditLogListResponse(Wire):
    logs: list[AuditLogEntry]
    has_more: bool
    next_cursor: str | None = None


class AuthIntrospectResponse(Wire):
    authenticated: bool
    auth_type: Literal["admin", "tenant"]
    permissions: list[str]
    capabilities: dict[str, bool]
    tenant_id: str | None = None
    scope_filter: list[str] | None = None




class TenantCounts(Wire):
    total: int
    active: int
    suspended: int
    closed: int
    in_observe_mode: int | None = None  # v0.1.26 governance extension


class QuotaOffender(Wire):
    scope: str
    action_kind: str
    used: int
    limit: int
    window: str | None = None
    utilization_pct: float | None = None


class QuotaHealth(Wire):
    counters_above_80pct: int
    counters_at_limit: int
    top_offenders: list[QuotaOffender]


class AccessControlStats(Wire):
    policies_with_allow_list: int
    policies_with_deny_list: int


class BudgetCounts(Wire):
    total: int
    active: int
    frozen: int
    closed: int
    over_limit: int
    with_debt: int
    by_unit: dict[str, int]


class OverLimitScope(Wire):
    scope: str
    unit: str
    allocated: int
    remaining: int
    debt: int


class DebtScope(Wire):
    scope: str
    unit: str
    debt: int
    overdraft_limit: int


class WebhookCounts(Wire):
    total: int
    active: int
    disabled: int
    with_failures: int


class EventCounts(Wire):
    total_recent: int
    by_category: dict[str, int]


class AdminOverviewResponse(Wire):
    as_of: str
    event_window_seconds: int
    tenant_counts: TenantCounts
    budget_counts: BudgetCounts
    over_limit_scopes: list[OverLimitScope]
    debt_scopes: list[DebtScope]
    webhook_counts: WebhookCounts
    failing_webhooks: list[dict[str, Any]]
    event_counts: EventCounts
    recent_denials: list[dict[str, Any]]
    recent_expiries: list[dict[str, Any]]
    # v0.1.26 governance extension (ADMIN OVERVIEW AND LIST FILTERS)
    recent_denials_by_reason: dict[str, int] | None = None
    quota_health: QuotaHealth | None = None
    access_control_stats: AccessControlStats | None = None


class EventActor(Wire):
    type: Literal["admin", "api_key", "admin_on_behalf_of", "system", "scheduler"]
    key_id: str | None = None
    source_ip: str | None = None


class Event(Wire):
    event_id: str
    event_type: str
    category: str
    timestamp: str
    tenant_id: str
    source: str
    scope: str | None = None
    actor: EventActor | None = None
    data: dict[str, Any] | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    metadata: dict[str, Any] | None = None


class EventListResponse(Wire):
    events: list[Event]
    has_more: bool
    next_cursor: str | None = None
