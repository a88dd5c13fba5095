"""Wire models of the runtime protocol (cycles-protocol-v0.yaml).

Requests decode strictly: unknown fields, floats for integers, out-of-range numbers and unknown enum
values are rejected. Responses encode with absent fields omitted, never as JSON null, because the
published SDK validates them with pydantic strict mode and extra="forbid".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .actions import ActionPolicyKeys, ObserveMode

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

Int64 = Annotated[int, Meta(ge=0, le=INT64_MAX)]
SignedInt64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
Unit = Literal["USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"]
UNITS: tuple[str, ...] = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")
OveragePolicy = Literal["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
Decision = Literal["ALLOW", "ALLOW_WITH_CAPS", "DENY"]
ReservationStatus = Literal["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=256)]
SubjectValue = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")]
DimensionKey = Annotated[str, Meta(min_length=1, max_length=64)]
DimensionValue = Annotated[str, Meta(max_length=256)]
Metadata = dict[str, Any]
TtlMs = Annotated[int, Meta(ge=1000, le=86_400_000)]
GraceMs = Annotated[int, Meta(ge=0, le=60_000)]


class Wire(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base for every wire object."""


class Amount(Wire):
    unit: Unit
    amount: Int64


class SignedAmount(Wire):
    unit: Unit
    amount: SignedInt64


class Subject(Wire):
    tenant: SubjectValue | None = None
    workspace: SubjectValue | None = None
    app: SubjectValue | None = None
    workflow: SubjectValue | None = None
    agent: SubjectValue | None = None
    toolset: SubjectValue | None = None
    dimensions: Annotated[dict[DimensionKey, DimensionValue], Meta(max_length=16)] | None = None

    def __post_init__(self) -> None:
        # Python's `$` also matches before a trailing newline, so the pattern alone lets "acme\n" through.
        for level in ("tenant", "workspace", "app", "workflow", "agent", "toolset"):
            value = getattr(self, level)
            if value is not None and value.endswith("\n"):
                raise ValueError(f"subject.{level} must match ^[a-zA-Z0-9_.-]+$")


class Action(Wire):
    kind: Annotated[str, Meta(max_length=64)]
    name: Annotated[str, Meta(max_length=256)]
    tags: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=10)] | None = None
    policy_keys: ActionPolicyKeys | None = None  # v0.1.26 ActionExtension


class Caps(Wire):
    max_tokens: Int64 | None = None
    max_steps_remaining: Int64 | None = None
    tool_allowlist: list[Annotated[str, Meta(max_length=256)]] | None = None
    tool_denylist: list[Annotated[str, Meta(max_length=256)]] | None = None
    cooldown_ms: Int64 | None = None

    def is_tool_allowed(self, tool: str) -> bool:
        """Spec precedence: a non-empty allowlist admits only its tools; else the denylist excludes."""
        if self.tool_allowlist:
            return tool in self.tool_allowlist
        return not (self.tool_denylist and tool in self.tool_denylist)


class StandardMetrics(Wire):
    tokens_input: Int64 | None = None
    tokens_output: Int64 | None = None
    latency_ms: Int64 | None = None
    model_version: Annotated[str, Meta(max_length=128)] | None = None
    custom: Metadata | None = None


class Balance(Wire):
    scope: str
    scope_path: str
    remaining: SignedAmount
    reserved: Amount
    spent: Amount
    allocated: Amount
    debt: Amount
    overdraft_limit: Amount
    is_over_limit: bool


# ---- requests ----


class ReservationCreateRequest(Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    ttl_ms: TtlMs | None = None
    grace_period_ms: GraceMs | None = None
    overage_policy: OveragePolicy | None = None
    dry_run: bool = False
    metadata: Metadata | None = None
    observe_mode: ObserveMode | None = None  # v0.1.26: overrides the tenant's observe_mode


class DecisionRequest(Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    estimate: Amount
    metadata: Metadata | None = None


class CommitRequest(Wire):
    idempotency_key: IdempotencyKey
    actual: Amount
    metrics: StandardMetrics | None = None
    metadata: Metadata | None = None


class ReleaseRequest(Wire):
    idempotency_key: IdempotencyKey
    reason: Annotated[str, Meta(max_length=256)] | None = None


class ReservationExtendRequest(Wire):
    idempotency_key: IdempotencyKey
    extend_by_ms: Annotated[int, Meta(ge=1, le=86_400_000)]
    metadata: Metadata | None = None


class EventCreateRequest(Wire):
    idempotency_key: IdempotencyKey
    subject: Subject
    action: Action
    actual: Amount
    overage_policy: OveragePolicy | None = None
    metrics: StandardMetrics | None = None
    client_time_ms: Int64 | None = None
    metadata: Metadata | None = None


# ---- responses ----


class CyclesEvidenceRef(Wire):
    """Transport metadata (not attested): where the envelope emitted for an operation is (cycles.server.evidence)."""

    evidence_id: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    cycles_evidence_url: str


class ReservationEvidence(Wire):
    reserve: CyclesEvidenceRef | None = None
    commit: CyclesEvidenceRef | None = None
    release: CyclesEvidenceRef | None = None


class ReservationCreateResponse(Wire):
    decision: Decision
    affected_scopes: list[str]
    reservation_id: str | None = None
    reserved: Amount | None = None
    expires_at_ms: Int64 | None = None
    remaining_ttl_ms: Int64 | None = None
    scope_path: str | None = None
    caps: Caps | None = None
    balances: list[Balance] | None = None
    reason_code: Annotated[str, Meta(max_length=128)] | None = None
    retry_after_ms: Int64 | None = None
    cycles_evidence: CyclesEvidenceRef | None = None
    # v0.1.26 DenyDetail: only sent to requests that use action governance (strict v0 clients forbid it)
    deny_detail: dict[str, Any] | None = None


class DecisionResponse(Wire):
    decision: Decision
    caps: Caps | None = None
    reason_code: Annotated[str, Meta(max_length=128)] | None = None
    retry_after_ms: Int64 | None = None
    affected_scopes: list[str] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None
    deny_detail: dict[str, Any] | None = None  # as on ReservationCreateResponse


class CommitResponse(Wire):
    status: Literal["COMMITTED"]
    charged: Amount
    released: Amount | None = None
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None


class ReleaseResponse(Wire):
    status: Literal["RELEASED"]
    released: Amount
    balances: list[Balance] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None


class ReservationExtendResponse(Wire):
    status: Literal["ACTIVE"]
    expires_at_ms: Int64
    remaining_ttl_ms: Int64 | None = None
    balances: list[Balance] | None = None


class EventCreateResponse(Wire):
    status: Literal["APPLIED"]
    event_id: str
    charged: Amount | None = None
    balances: list[Balance] | None = None


class ReservationSummary(Wire):
    reservation_id: str
    status: ReservationStatus
    subject: Subject
    action: Action
    reserved: Amount
    created_at_ms: Int64
    expires_at_ms: Int64
    scope_path: str
    affected_scopes: list[str]
    idempotency_key: str | None = None
    finalized_at_ms: Int64 | None = None
    committed: Amount | None = None
    metadata: Metadata | None = None
    committed_metadata: Metadata | None = None
    evidence: ReservationEvidence | None = None


class ReservationDetail(ReservationSummary):
    pass


class ReservationListResponse(Wire):
    reservations: list[ReservationSummary]
    next_cursor: str | None = None
    has_more: bool | None = None


class BalanceResponse(Wire):
    balances: list[Balance]
    next_cursor: str | None = None
    has_more: bool | None = None


class ErrorResponse(Wire):
    error: str
    message: str
    request_id: str
    trace_id: str | None = None
    details: dict[str, Any] | None = None
    cycles_evidence: CyclesEvidenceRef | None = None


class HealthResponse(Wire):
    status: Literal["UP", "DOWN"]
    details: dict[str, Any] | None = None  # operator warnings (e.g. a weak admin key); omitted when none


_encoder = msgspec.json.Encoder()
_canonical = msgspec.json.Encoder(order="sorted")  # msgspec.json.encode(obj, order=...) sets one up per call


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def canonical(obj: Any) -> bytes:
    """A stable serialization used to compare idempotent payloads (sorted keys, defaults omitted)."""
    return _canonical.encode(obj)
