"""The webhook subscription wire structs (admin and tenant planes) and their field limits. The stored
record and the rules that turn a request into one live in cycles.webhooks.subscriptions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ..core.events import CATEGORIES, EVENT_TYPES
from ..protocol.models import Wire
from . import urlpolicy

MAX_HEADERS = 20
MAX_GRACE_SECONDS = 7 * 86_400

Name = Annotated[str, Meta(max_length=256)]
Description = Annotated[str, Meta(max_length=1024)]
Url = Annotated[str, Meta(min_length=1, max_length=2048)]
EventTypeName = Annotated[str, Meta(min_length=1, max_length=128)]
CategoryName = Annotated[str, Meta(min_length=1, max_length=64)]
EventTypes = Annotated[list[EventTypeName], Meta(max_length=len(EVENT_TYPES) + 64)]
CreateEventTypes = Annotated[list[EventTypeName], Meta(min_length=1, max_length=len(EVENT_TYPES) + 64)]
Categories = Annotated[list[CategoryName], Meta(max_length=len(CATEGORIES))]
ScopeFilter = Annotated[str, Meta(max_length=1024)]
SigningSecret = Annotated[str, Meta(min_length=16, max_length=256)]
Headers = Annotated[dict[Annotated[str, Meta(min_length=1, max_length=128)], Annotated[str, Meta(max_length=4096)]],
                    Meta(max_length=MAX_HEADERS)]
TenantId = Annotated[str, Meta(min_length=1, max_length=64)]
Fraction01 = Annotated[float, Meta(ge=0.0, le=1.0)]
Window = Annotated[int, Meta(ge=60, le=86_400)]
DisableAfter = Annotated[int, Meta(ge=1, le=10_000)]
GraceSeconds = Annotated[int, Meta(ge=0, le=MAX_GRACE_SECONDS)]
MaxRetries = Annotated[int, Meta(ge=0, le=10)]
InitialDelay = Annotated[int, Meta(ge=100, le=60_000)]
Backoff = Annotated[float, Meta(ge=1.0, le=10.0)]
MaxDelay = Annotated[int, Meta(ge=1000, le=3_600_000)]


class WebhookThresholdConfig(Wire):
    budget_utilization: Annotated[list[Fraction01], Meta(max_length=20)] | None = None
    burn_rate_multiplier: Annotated[float, Meta(ge=1.5)] | None = None
    burn_rate_window_seconds: Window | None = None
    denial_rate_threshold: Fraction01 | None = None
    expiry_rate_threshold: Fraction01 | None = None
    auth_failure_rate_threshold: Fraction01 | None = None
    rate_window_seconds: Window | None = None


class WebhookRetryPolicy(Wire, omit_defaults=False):
    """Create requests: fields left out take the spec's defaults. Responses: always every field."""

    max_retries: MaxRetries = 5
    initial_delay_ms: InitialDelay = 1000
    backoff_multiplier: Backoff = 2.0
    max_delay_ms: MaxDelay = 60_000


class WebhookRetryPolicyUpdate(Wire):
    """A PATCH's retry_policy: the fields given replace the stored ones, the others stay."""

    max_retries: MaxRetries | UnsetType = UNSET
    initial_delay_ms: InitialDelay | UnsetType = UNSET
    backoff_multiplier: Backoff | UnsetType = UNSET
    max_delay_ms: MaxDelay | UnsetType = UNSET


class WebhookCreateRequest(Wire):
    url: Url
    event_types: CreateEventTypes
    name: Name | None = None
    description: Description | None = None
    event_categories: Categories | None = None
    scope_filter: ScopeFilter | None = None
    thresholds: WebhookThresholdConfig | None = None
    signing_secret: SigningSecret | None = None
    headers: Headers | None = None
    retry_policy: WebhookRetryPolicy | None = None
    disable_after_failures: DisableAfter | None = None
    metadata: dict[str, Any] | None = None
    # Extension: the owning tenant on admin-key creates (the spec's admin route takes it as the
    # `tenant_id` query parameter, also accepted). Refused with a tenant key.
    tenant_id: TenantId | None = None


class WebhookUpdateRequest(Wire):
    """Partial update: absent fields stay; null clears name, description, scope_filter, thresholds, metadata."""

    name: Name | None | UnsetType = UNSET
    description: Description | None | UnsetType = UNSET
    url: Url | UnsetType = UNSET
    event_types: EventTypes | UnsetType = UNSET
    event_categories: Categories | UnsetType = UNSET
    scope_filter: ScopeFilter | None | UnsetType = UNSET
    thresholds: WebhookThresholdConfig | None | UnsetType = UNSET
    signing_secret: SigningSecret | UnsetType = UNSET
    headers: Headers | UnsetType = UNSET
    retry_policy: WebhookRetryPolicyUpdate | UnsetType = UNSET
    disable_after_failures: DisableAfter | UnsetType = UNSET
    status: Literal["ACTIVE", "PAUSED"] | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET
    # Extensions: have the server generate the new secret (returned once, in this response), and how
    # long the previous secret keeps signing after a rotation.
    rotate_signing_secret: bool | UnsetType = UNSET
    secret_grace_seconds: GraceSeconds | UnsetType = UNSET


class WebhookSubscription(Wire):
    subscription_id: str
    tenant_id: str
    url: str
    event_types: list[str]
    event_categories: list[str]
    status: str
    retry_policy: WebhookRetryPolicy
    disable_after_failures: int
    consecutive_failures: int
    created_at: str
    updated_at: str
    name: str | None = None
    description: str | None = None
    scope_filter: str | None = None
    thresholds: WebhookThresholdConfig | None = None
    headers: dict[str, str] | None = None
    last_triggered_at: str | None = None
    last_success_at: str | None = None
    last_failure_at: str | None = None
    metadata: dict[str, Any] | None = None


class WebhookUpdateResponse(WebhookSubscription):
    """A WebhookSubscription; carries signing_secret only when the PATCH asked the server to generate one."""

    signing_secret: str | None = None


class WebhookCreateResponse(Wire):
    subscription: WebhookSubscription
    signing_secret: str | None = None


class WebhookListResponse(Wire):
    subscriptions: list[WebhookSubscription]
    has_more: bool
    next_cursor: str | None = None


class WebhookSecurityConfig(Wire, omit_defaults=False):
    blocked_cidr_ranges: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=512)] = \
        msgspec.field(default_factory=lambda: list(urlpolicy.DEFAULT_BLOCKED))
    allowed_url_patterns: Annotated[list[Annotated[str, Meta(min_length=1, max_length=2048)]],
                                    Meta(max_length=256)] = msgspec.field(default_factory=list)
    allow_http: bool = False


class WebhookBulkFilter(Wire):
    tenant_id: TenantId | None = None
    status: Literal["ACTIVE", "PAUSED", "DISABLED"] | None = None
    event_type: EventTypeName | None = None
    search: Annotated[str, Meta(max_length=128)] | None = None


class WebhookBulkActionRequest(Wire):
    filter: WebhookBulkFilter
    action: Literal["PAUSE", "RESUME", "DELETE"]
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=128)]
    expected_count: Annotated[int, Meta(ge=0)] | None = None
