"""Wire models of v0.1.26 action governance (cycles-action-kinds-v0.1.26.yaml, the governance and protocol
extensions): policy keys on an Action, quota rules on a Policy, the registry and the counter views."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

RiskClass = Literal["read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk"]
QuotaWindow = Literal["per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day"]
ObserveMode = Literal["DISABLED", "OBSERVE", "ENFORCE"]
Kind = Annotated[str, Meta(min_length=1, max_length=64)]
Host = Annotated[str, Meta(max_length=253)]
Threshold = Annotated[float, Meta(ge=0.01, le=0.99)]
MaxCalls = Annotated[int, Meta(ge=1, le=100_000)]
RunTtl = Annotated[int, Meta(ge=60_000, le=604_800_000)]


class _Wire(Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class ActionPolicyKeys(_Wire):
    host: Host | None = None
    recipient_domain: Host | None = None
    resource_type: Annotated[str, Meta(max_length=128)] | None = None
    path_prefix: Annotated[str, Meta(max_length=512)] | None = None
    custom: Annotated[dict[str, Annotated[str, Meta(max_length=256)]], Meta(max_length=8)] | None = None


class ActionQuota(_Wire):
    action_kind: Kind
    max_calls: MaxCalls
    window: QuotaWindow
    host_allowlist: Annotated[list[Host], Meta(max_length=200)] | None = None
    recipient_domain_allowlist: Annotated[list[Host], Meta(max_length=200)] | None = None
    resource_type_allowlist: Annotated[list[Annotated[str, Meta(max_length=128)]], Meta(max_length=200)] | None = None
    per_run_counter_ttl_ms: RunTtl | None = None
    threshold_pct: Threshold | None = None


class RiskClassQuota(_Wire):
    risk_class: RiskClass
    max_calls: MaxCalls
    window: QuotaWindow
    per_run_counter_ttl_ms: RunTtl | None = None
    threshold_pct: Threshold | None = None


ActionQuotas = Annotated[list[ActionQuota], Meta(max_length=50)]
RiskClassQuotas = Annotated[list[RiskClassQuota], Meta(max_length=20)]
KindList = Annotated[list[Kind], Meta(max_length=200)]


class ActionKind(_Wire):
    kind: str
    risk_class: RiskClass
    policy_key_spec: dict[str, Any] | None = None
    description: str | None = None
    mcp_tool_prefixes: list[str] | None = None
    deprecated: bool | None = None
    replacement_kind: str | None = None


class ActionKindRegistry(_Wire):
    version: str
    kinds: list[ActionKind]
    next_cursor: str | None = None
    has_more: bool | None = None


class ActionQuotaState(_Wire):
    action_kind: str
    scope: str
    window: QuotaWindow
    used: int
    limit: int
    scope_path: str | None = None
    risk_class: RiskClass | None = None
    window_key: str | None = None
    remaining: int | None = None
    policy_id: str | None = None
    expires_at: str | None = None
    last_incremented_at: str | None = None


class ActionQuotaCounterListResponse(_Wire):
    counters: list[ActionQuotaState]
    has_more: bool
    next_cursor: str | None = None


class ActionQuotaCounterResetRequest(_Wire):
    scope: Annotated[str, Meta(min_length=1, max_length=1024)]
    action_kind: Kind
    window: QuotaWindow
    window_key: Annotated[str, Meta(min_length=1, max_length=256)]
    tenant_id: Annotated[str, Meta(max_length=64)] | None = None
    risk_class: RiskClass | None = None
    reason: Annotated[str, Meta(max_length=512)] | None = None


class ActionQuotaCounterResetResponse(_Wire):
    counter: ActionQuotaState
    previous_used: int
