"""Error codes and the one exception type that carries a protocol error to the HTTP layer."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    BUDGET_FROZEN = "BUDGET_FROZEN"
    BUDGET_CLOSED = "BUDGET_CLOSED"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    RESERVATION_FINALIZED = "RESERVATION_FINALIZED"
    IDEMPOTENCY_MISMATCH = "IDEMPOTENCY_MISMATCH"
    UNIT_MISMATCH = "UNIT_MISMATCH"
    OVERDRAFT_LIMIT_EXCEEDED = "OVERDRAFT_LIMIT_EXCEEDED"
    DEBT_OUTSTANDING = "DEBT_OUTSTANDING"
    MAX_EXTENSIONS_EXCEEDED = "MAX_EXTENSIONS_EXCEEDED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    TENANT_CLOSED = "TENANT_CLOSED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # v0.1.26 action governance (cycles-protocol-extensions ErrorCodeExtension)
    ACTION_QUOTA_EXCEEDED = "ACTION_QUOTA_EXCEEDED"
    ACTION_KIND_NOT_ALLOWED = "ACTION_KIND_NOT_ALLOWED"
    ACTION_KIND_DENIED = "ACTION_KIND_DENIED"
    # Governance-plane codes (cycles-governance-admin ErrorCode); used on /v1/admin routes only.
    DUPLICATE_RESOURCE = "DUPLICATE_RESOURCE"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    BUDGET_NOT_FOUND = "BUDGET_NOT_FOUND"
    TENANT_SUSPENDED = "TENANT_SUSPENDED"
    POLICY_VIOLATION = "POLICY_VIOLATION"
    INSUFFICIENT_PERMISSIONS = "INSUFFICIENT_PERMISSIONS"
    KEY_REVOKED = "KEY_REVOKED"
    KEY_EXPIRED = "KEY_EXPIRED"
    WEBHOOK_NOT_FOUND = "WEBHOOK_NOT_FOUND"
    WEBHOOK_URL_INVALID = "WEBHOOK_URL_INVALID"
    EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
    REPLAY_IN_PROGRESS = "REPLAY_IN_PROGRESS"
    COUNT_MISMATCH = "COUNT_MISMATCH"


# The status each code travels with (cycles-protocol-v0 §ERROR SEMANTICS).
STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNIT_MISMATCH: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TENANT_NOT_FOUND: 404,
    ErrorCode.BUDGET_NOT_FOUND: 404,
    ErrorCode.BUDGET_EXCEEDED: 409,
    ErrorCode.BUDGET_FROZEN: 409,
    ErrorCode.BUDGET_CLOSED: 409,
    ErrorCode.RESERVATION_FINALIZED: 409,
    ErrorCode.IDEMPOTENCY_MISMATCH: 409,
    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED: 409,
    ErrorCode.DEBT_OUTSTANDING: 409,
    ErrorCode.MAX_EXTENSIONS_EXCEEDED: 409,
    ErrorCode.TENANT_CLOSED: 409,
    ErrorCode.ACTION_QUOTA_EXCEEDED: 409,
    ErrorCode.ACTION_KIND_NOT_ALLOWED: 409,
    ErrorCode.ACTION_KIND_DENIED: 409,
    ErrorCode.DUPLICATE_RESOURCE: 409,
    ErrorCode.TENANT_SUSPENDED: 409,
    ErrorCode.POLICY_VIOLATION: 409,
    ErrorCode.INSUFFICIENT_PERMISSIONS: 403,
    ErrorCode.KEY_REVOKED: 409,
    ErrorCode.KEY_EXPIRED: 401,
    ErrorCode.WEBHOOK_NOT_FOUND: 404,
    ErrorCode.WEBHOOK_URL_INVALID: 400,
    ErrorCode.EVENT_NOT_FOUND: 404,
    ErrorCode.REPLAY_IN_PROGRESS: 409,
    ErrorCode.COUNT_MISMATCH: 409,
    ErrorCode.RESERVATION_EXPIRED: 410,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
}


class ProtocolError(Exception):
    """A request outcome that is answered with the spec's error body."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.status = status if status is not None else STATUS[code]
        self.headers = headers or {}


def invalid(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message, details=details or None)


class StoreUnavailable(Exception):
    """The store cannot be reached; answered as 503 so clients retry with the same key."""


class VersionConflict(ProtocolError):
    """A read-modify-write lost a race with another writer; the caller re-reads and retries."""

    def __init__(self, what: str) -> None:
        super().__init__(ErrorCode.DUPLICATE_RESOURCE, f"{what} changed concurrently; retry the request", status=409)
