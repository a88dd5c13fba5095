"""Wire models of the admin plane routes we serve (cycles-governance-admin-v0.1.25.yaml shapes)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from .models import Amount, IdempotencyKey, Int64, Metadata, OveragePolicy, SignedAmount, Unit, Wire

TenantId = Annotated[str, Meta(min_length=3, max_length=64, pattern=r"^[a-z0-9-]+$")]
TenantStatus = Literal["ACTIVE", "SUSPENDED", "CLOSED"]
BudgetStatus = Literal["ACTIVE", "FROZEN", "CLOSED"]
RolloverPolicy = Literal["NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED"]
ExpiryPolicy = Literal["AUTO_RELEASE", "MANUAL_CLEANUP", "GRACE_ONLY"]
FundingOperation = Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
Permission = Literal[
    "reservations:create",
    "reservations:commit",
    "reservations:release",
    "reservations:extend",
    "reservations:list",
    "balances:read",
    "budgets:read",
    "budgets:write",
    "policies:read",
    "policies:write",
    "webhooks:read",
    "webhooks:write",
    "events:read",
    "admin:read",
    "admin:write",
    "admin:tenants:read",
    "admin:tenants:write",
    "admin:budgets:read",
    "admin:budgets:write",
    "admin:policies:read",
    "admin:policies:write",
    "admin:apikeys:read",
    "admin:apikeys:write",
    "admin:webhooks:read",
    "admin:webhooks:write",
    "admin:events:read",
    "admin:audit:read",
    "action_quotas:read",  # v0.1.26 (balances:read is accepted in its place on the counters, deprecated)
]
DEFAULT_PERMISSIONS: tuple[str, ...] = (
    "reservations:create",
    "reservations:commit",
    "reservations:release",
    "reservations:extend",
    "reservations:list",
    "balances:read",
    "budgets:read",
    "budgets:write",
    "policies:read",
    "policies:write",
)
Ttl = Annotated[int, Meta(ge=1000, le=86_400_000)]
Name = Annotated[str, Meta(max_length=256)]
Timestamp = Annotated[str, Meta(max_length=64)]
Reason = Annotated[str, Meta(max_length=512)]
Scope = Annotated[str, Meta(min_length=1, max_length=1024)]


class TenantCreateRequest(Wire):
    tenant_id: TenantId
    name: Name
    parent_tenant_id: Annotated[str, Meta(max_length=64)] | None = None
    metadata: Annotated[dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=1024)]], Meta(max_length=32)] | None = None
    default_commit_overage_policy: OveragePolicy | None = None
    default_reservation_ttl_ms: Ttl | None = None
    max_reservation_ttl_ms: Ttl | None = None
    max_reservation_extensions: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    reservation_expiry_policy: ExpiryPolicy | None = None
    observe_mode: Literal["DISABLED", "OBSERVE", "ENFORCE"] | None = None  # v0.1.26 TenantExtension

    def __post_init__(self) -> None:
        # Python's `$` also matches before a trailing newline; the pattern alone lets "acme\n" through.
        if self.tenant_id.endswith("\n"):
            raise ValueError("tenant_id must match ^[a-z0-9-]+$")


class TenantUpdateRequest(Wire):
    name: Name | None = None
    status: TenantStatus | None = None
    metadata: Annotated[dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=1024)]], Meta(max_length=32)] | None = None
    default_commit_overage_policy: OveragePolicy | None = None
    default_reservation_ttl_ms: Ttl | None = None
    max_reservation_ttl_ms: Ttl | None = None
    max_reservation_extensions: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    observe_mode: Literal["DISABLED", "OBSERVE", "ENFORCE"] | None = None  # v0.1.26 TenantPatchExtension


class Tenant(Wire):
    tenant_id: str
    name: str
    status: TenantStatus
    created_at: str
    parent_tenant_id: str | None = None
    default_commit_overage_policy: OveragePolicy | None = None
    default_reservation_ttl_ms: int | None = None
    max_reservation_ttl_ms: int | None = None
    max_reservation_extensions: int | None = None
    reservation_expiry_policy: ExpiryPolicy | None = None
    metadata: dict[str, str] | None = None
    updated_at: str | None = None
    suspended_at: str | None = None
    closed_at: str | None = None
    observe_mode: str | None = None  # v0.1.26: always returned (ENFORCE when never set)


class ApiKeyCreateRequest(Wire):
    tenant_id: TenantId
    name: Name
    description: Annotated[str, Meta(max_length=1024)] | None = None
    permissions: Annotated[list[Permission], Meta(max_length=64)] | None = None
    scope_filter: Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)] | None = None
    expires_at: Timestamp | None = None
    metadata: Metadata | None = None


class ApiKeyCreateResponse(Wire):
    key_id: str
    key_secret: str
    key_prefix: str
    tenant_id: str
    created_at: str
    expires_at: str
    permissions: list[str] | None = None


class BudgetCreateRequest(Wire):
    scope: Scope
    unit: Unit
    allocated: Amount
    tenant_id: TenantId | None = None
    overdraft_limit: Amount | None = None
    commit_overage_policy: OveragePolicy | None = None
    rollover_policy: RolloverPolicy | None = None
    period_start: Timestamp | None = None
    period_end: Timestamp | None = None
    metadata: Metadata | None = None
    # Extensions: calendar periods. Without an interval, every period lasts as long as the first.
    period_interval: Literal["DAILY", "WEEKLY", "MONTHLY", "QUARTERLY", "YEARLY"] | None = None
    period_timezone: Annotated[str, Meta(max_length=64)] | None = None


class BudgetLedger(Wire):
    ledger_id: str
    scope: str
    unit: Unit
    allocated: Amount
    remaining: SignedAmount
    status: BudgetStatus
    created_at: str
    tenant_id: str | None = None
    scope_path: str | None = None
    reserved: Amount | None = None
    spent: Amount | None = None
    debt: Amount | None = None
    overdraft_limit: Amount | None = None
    is_over_limit: bool | None = None
    commit_overage_policy: OveragePolicy | None = None
    rollover_policy: RolloverPolicy | None = None
    period_start: str | None = None
    period_end: str | None = None
    updated_at: str | None = None
    metadata: Metadata | None = None


class BudgetListResponse(Wire):
    ledgers: list[BudgetLedger]
    next_cursor: str | None = None
    has_more: bool | None = None


class BudgetFundingRequest(Wire):
    operation: FundingOperation
    amount: Amount
    spent: Amount | None = None
    reason: Reason | None = None
    idempotency_key: IdempotencyKey | None = None
    metadata: Metadata | None = None


class BudgetFundingResponse(Wire):
    operation: str
    previous_allocated: Amount
    new_allocated: Amount
    previous_remaining: SignedAmount
    new_remaining: SignedAmount
    previous_debt: Amount | None = None
    new_debt: Amount | None = None
    previous_spent: Amount | None = None
    new_spent: Amount | None = None
    timestamp: str | None = None


__all__ = [
    "ApiKeyCreateRequest",
    "ApiKeyCreateResponse",
    "BudgetCreateRequest",
    "BudgetFundingRequest",
    "BudgetFundingResponse",
    "BudgetLedger",
    "BudgetListResponse",
    "DEFAULT_PERMISSIONS",
    "IdempotencyKey",
    "Int64",
    "Tenant",
    "TenantCreateRequest",
]
