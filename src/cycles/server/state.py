"""What every route reaches through `request.app.state`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ..store.base import Store
from .auth import Authenticator
from .metrics import Metrics
from .throttle import FailureRecords


@dataclass
class AppState:
    store: Store
    auth: Authenticator
    metrics: Metrics
    error_trace_id: bool = True  # False only under --no-error-trace-id
    error_trace_mode: bool | None = None  # errors_compat.trace_in_error_body's `configured`: None = by client
    audit_retention_ms: int = 90 * 86_400_000
    secret_box: Any = None  # cycles.webhooks.crypto.SecretBox, None when no key was configured
    failure_records: FailureRecords = field(default_factory=FailureRecords)
    health_details: dict[str, Any] | None = None  # computed once at start: health checks are polled constantly
    evidence: Any = None  # cycles.server.evidence.Evidence: keys, server_id, whether the runtime routes emit


def state_of(request: Request) -> AppState:
    return request.app.state.cycles
