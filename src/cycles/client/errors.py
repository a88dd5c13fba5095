"""Typed errors, keyed on the protocol's error codes (not only on the HTTP status).

Every error raised by the SDK derives from `CyclesError`. Protocol outcomes derive from
`CyclesProtocolError`, which carries `status`, `error_code`, `reason_code`, `request_id`, `trace_id`,
`details` and `retry_after_ms`. The class is chosen from the body's `error` code (or, for a DENY
inside a 200 body, from its `reason_code`), so `except BudgetExceededError` works for both a 409
and a DENY decision.
"""

from __future__ import annotations

from typing import Any

from ..protocol.errors import ErrorCode

__all__ = [
    "CyclesError", "CyclesProtocolError", "CyclesTransportError", "InvalidResponseError", "BudgetExceededError",
    "BudgetFrozenError", "BudgetClosedError", "OverdraftLimitExceededError", "DebtOutstandingError",
    "ReservationExpiredError", "ReservationFinalizedError", "IdempotencyKeyReusedError", "IdempotencyMismatchError",
    "IdempotencyKeyWarning", "UnitMismatchError",
    "TenantClosedError", "RateLimitedError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
    "InvalidRequestError", "MaxExtensionsExceededError", "ServerError", "JournalError", "ErrorCode",
    "error_for",
]


class CyclesError(Exception):
    """Base of every SDK error."""


class CyclesProtocolError(CyclesError):
    """A non-success outcome from the server (an error body, a DENY, or an unusable answer)."""

    def __init__(self, message: str, *, status: int = -1, error_code: str | None = None,
                 reason_code: str | None = None, request_id: str | None = None, trace_id: str | None = None,
                 details: dict[str, Any] | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_code = error_code
        self.reason_code = reason_code if reason_code is not None else error_code
        self.request_id = request_id
        self.trace_id = trace_id
        self.details = details
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        parts = [self.message]
        if self.status != -1:
            parts.append(f"status={self.status}")
        if self.error_code:
            parts.append(f"error_code={self.error_code}")
        if self.reason_code and self.reason_code != self.error_code:
            parts.append(f"reason_code={self.reason_code}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)

    # published-SDK helpers
    def _is(self, code: str) -> bool:
        return self.error_code == code or self.reason_code == code

    def is_budget_exceeded(self) -> bool:
        return self._is("BUDGET_EXCEEDED")

    def is_overdraft_limit_exceeded(self) -> bool:
        return self._is("OVERDRAFT_LIMIT_EXCEEDED")

    def is_debt_outstanding(self) -> bool:
        return self._is("DEBT_OUTSTANDING")

    def is_reservation_expired(self) -> bool:
        return self._is("RESERVATION_EXPIRED")

    def is_reservation_finalized(self) -> bool:
        return self._is("RESERVATION_FINALIZED")

    def is_idempotency_mismatch(self) -> bool:
        return self._is("IDEMPOTENCY_MISMATCH")

    def is_unit_mismatch(self) -> bool:
        return self._is("UNIT_MISMATCH")

    def is_tenant_closed(self) -> bool:
        return self._is("TENANT_CLOSED")

    def is_retryable(self) -> bool:
        """True for outcomes a same-key retry may resolve: transport, 429, 5xx, unusable 2xx."""
        return (self.status == -1 or self.status == 429 or self.status >= 500
                or self.error_code in ("INTERNAL_ERROR", "LIMIT_EXCEEDED", "UNKNOWN")
                or isinstance(self, InvalidResponseError))


class CyclesTransportError(CyclesProtocolError):
    """The request could not be completed (connect error, timeout, broken connection). status = -1."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message, status=-1)
        self.cause = cause


class InvalidResponseError(CyclesProtocolError):
    """A 2xx that is not the expected status or not a schema-valid body: the outcome is ambiguous."""


class BudgetExceededError(CyclesProtocolError):
    pass


class BudgetFrozenError(CyclesProtocolError):
    pass


class BudgetClosedError(CyclesProtocolError):
    pass


class OverdraftLimitExceededError(CyclesProtocolError):
    pass


class DebtOutstandingError(CyclesProtocolError):
    pass


class ReservationExpiredError(CyclesProtocolError):
    pass


class ReservationFinalizedError(CyclesProtocolError):
    pass


class IdempotencyMismatchError(CyclesProtocolError):
    pass


class IdempotencyKeyReusedError(ReservationFinalizedError):
    """A guarded call's idempotency key already belongs to a finished call: the server answered the
    reserve with that call's reservation, so running the function would go uncharged. Raised before the
    function runs. Make the key name one unit of work (job and step), not the call's arguments."""


class IdempotencyKeyWarning(UserWarning):
    """A caller-chosen idempotency key collided with a different request at settlement time."""


class UnitMismatchError(CyclesProtocolError):
    pass


class TenantClosedError(CyclesProtocolError):
    pass


class RateLimitedError(CyclesProtocolError):
    """429 LIMIT_EXCEEDED; `retry_after_ms` comes from the body or the Retry-After header."""


class AuthenticationError(CyclesProtocolError):
    """401 UNAUTHORIZED."""


class PermissionDeniedError(CyclesProtocolError):
    """403 FORBIDDEN."""


class NotFoundError(CyclesProtocolError):
    pass


class InvalidRequestError(CyclesProtocolError):
    pass


class MaxExtensionsExceededError(CyclesProtocolError):
    pass


class ServerError(CyclesProtocolError):
    """5xx (INTERNAL_ERROR or anything the server could not answer properly)."""


class JournalError(CyclesError):
    """The commit journal could not persist a record (surfaced to operators; settlement still runs)."""


_BY_CODE: dict[str, type[CyclesProtocolError]] = {
    "BUDGET_EXCEEDED": BudgetExceededError,
    "BUDGET_FROZEN": BudgetFrozenError,
    "BUDGET_CLOSED": BudgetClosedError,
    "OVERDRAFT_LIMIT_EXCEEDED": OverdraftLimitExceededError,
    "DEBT_OUTSTANDING": DebtOutstandingError,
    "RESERVATION_EXPIRED": ReservationExpiredError,
    "RESERVATION_FINALIZED": ReservationFinalizedError,
    "IDEMPOTENCY_MISMATCH": IdempotencyMismatchError,
    "UNIT_MISMATCH": UnitMismatchError,
    "TENANT_CLOSED": TenantClosedError,
    "LIMIT_EXCEEDED": RateLimitedError,
    "UNAUTHORIZED": AuthenticationError,
    "FORBIDDEN": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "INVALID_REQUEST": InvalidRequestError,
    "MAX_EXTENSIONS_EXCEEDED": MaxExtensionsExceededError,
    "INTERNAL_ERROR": ServerError,
}

_BY_STATUS: dict[int, type[CyclesProtocolError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    410: ReservationExpiredError, 429: RateLimitedError,
}


def error_for(code: str | None, status: int) -> type[CyclesProtocolError]:
    """The class for an error code; an unknown or missing code falls back on the status."""
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, CyclesProtocolError)
