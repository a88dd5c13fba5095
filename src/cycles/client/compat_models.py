"""The runcycles 0.5.3 enums and models of `cycles.client.compat`: thin subclasses of the protocol's msgspec
models that validate at construction (raising ValueError, like pydantic's ValidationError) and add the
pydantic-style helpers runcycles users call (`model_dump`, `model_validate`, …); enums are `str` enums."""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable

import msgspec

from ..protocol import models as _m


# ====================================================================== enums


class Unit(str, Enum):
    USD_MICROCENTS = "USD_MICROCENTS"
    TOKENS = "TOKENS"
    CREDITS = "CREDITS"
    RISK_POINTS = "RISK_POINTS"


class CommitOveragePolicy(str, Enum):
    REJECT = "REJECT"
    ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
    ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


class Decision(str, Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CAPS = "ALLOW_WITH_CAPS"
    DENY = "DENY"


class ReservationStatus(str, Enum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class CommitStatus(str, Enum):
    COMMITTED = "COMMITTED"


class ReleaseStatus(str, Enum):
    RELEASED = "RELEASED"


class ExtendStatus(str, Enum):
    ACTIVE = "ACTIVE"


class EventStatus(str, Enum):
    APPLIED = "APPLIED"


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
    UNKNOWN = "UNKNOWN"

    @property
    def is_retryable(self) -> bool:
        return self in (ErrorCode.INTERNAL_ERROR, ErrorCode.UNKNOWN, ErrorCode.LIMIT_EXCEEDED)

    @classmethod
    def from_string(cls, value: str | None) -> "ErrorCode | None":
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


# ====================================================================== models


class _PydanticStyle:
    """pydantic-style helpers mixed into the compat model classes (see `_model`)."""

    def model_dump(self, *, exclude_none: bool = True, mode: str = "python", **_: Any) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def model_dump_json(self, *, exclude_none: bool = True, **_: Any) -> str:
        return _m.encode(self).decode()

    @classmethod
    def model_validate(cls, obj: Any, **_: Any) -> Any:
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, msgspec.Struct):
            obj = msgspec.to_builtins(obj)
        try:
            return msgspec.convert(obj, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid {cls.__name__}: {exc}") from None

    @classmethod
    def model_validate_json(cls, data: str | bytes, **_: Any) -> Any:
        try:
            return msgspec.json.decode(data, type=cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid {cls.__name__}: {exc}") from None

    def model_copy(self, *, update: dict[str, Any] | None = None, **_: Any) -> Any:
        return msgspec.structs.replace(self, **(update or {}))


def _validate_post_init(self: Any) -> None:
    """Validate like pydantic does at construction; nested dicts become the protocol models."""
    base = type(self).__compat_base__
    try:
        checked = msgspec.convert(msgspec.to_builtins(self), base)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid {type(self).__name__}: {exc}") from None
    for name in self.__struct_fields__:
        value = getattr(self, name)
        if isinstance(value, (dict, list)):
            new = getattr(checked, name)
            if isinstance(new, msgspec.Struct) or (isinstance(new, list) and any(
                    isinstance(x, msgspec.Struct) for x in new)):
                setattr(self, name, new)


def _model(base: type, name: str, validate: bool = True, **methods: Any) -> type:
    ns: dict[str, Any] = {"__module__": __name__, "__compat_base__": base, "__qualname__": name}
    for k in ("model_dump", "model_dump_json", "model_copy"):
        ns[k] = getattr(_PydanticStyle, k)
    ns["model_validate"] = classmethod(_PydanticStyle.model_validate.__func__)
    ns["model_validate_json"] = classmethod(_PydanticStyle.model_validate_json.__func__)
    if validate:
        ns["__post_init__"] = _validate_post_init
    ns.update(methods)
    return type(name, (base,), ns)


def _is_allowed(self: Any) -> bool:
    return self.decision in ("ALLOW", "ALLOW_WITH_CAPS")


def _is_denied(self: Any) -> bool:
    return self.decision == "DENY"


def _tool_allowed(self: Any, tool: str) -> bool:
    if self.tool_allowlist is not None:
        return tool in self.tool_allowlist
    return not (self.tool_denylist and tool in self.tool_denylist)


def _has_std(self: Any) -> bool:
    return any([self.tenant, self.workspace, self.app, self.workflow, self.agent, self.toolset])


def _metrics_is_empty(self: Any) -> bool:
    return (self.tokens_input is None and self.tokens_output is None and self.latency_ms is None
            and self.model_version is None and not self.custom)


def _metrics_put_custom(self: Any, key: str, value: Any) -> None:
    if self.custom is None:
        self.custom = {}
    self.custom[key] = value


def _metrics_to_wire(self: Any) -> Any:
    return None if _metrics_is_empty(self) else self


def _status_is(value: str) -> Callable[[Any], bool]:
    return lambda self: self.status == value


Amount = _model(_m.Amount, "Amount")
SignedAmount = _model(_m.SignedAmount, "SignedAmount")
Subject = _model(_m.Subject, "Subject", has_at_least_one_standard_field=_has_std)
Action = _model(_m.Action, "Action")
Caps = _model(_m.Caps, "Caps", is_tool_allowed=_tool_allowed)
CyclesMetrics = _model(_m.StandardMetrics, "CyclesMetrics", validate=False, is_empty=_metrics_is_empty,
                       put_custom=_metrics_put_custom, to_wire=_metrics_to_wire)
Balance = _model(_m.Balance, "Balance")

ReservationCreateRequest = _model(_m.ReservationCreateRequest, "ReservationCreateRequest")
CommitRequest = _model(_m.CommitRequest, "CommitRequest")
ReleaseRequest = _model(_m.ReleaseRequest, "ReleaseRequest")
ReservationExtendRequest = _model(_m.ReservationExtendRequest, "ReservationExtendRequest")
DecisionRequest = _model(_m.DecisionRequest, "DecisionRequest")
EventCreateRequest = _model(_m.EventCreateRequest, "EventCreateRequest")

ReservationCreateResponse = _model(_m.ReservationCreateResponse, "ReservationCreateResponse", validate=False,
                                   is_allowed=_is_allowed, is_denied=_is_denied)
DryRunResult = _model(_m.ReservationCreateResponse, "DryRunResult", validate=False, is_allowed=_is_allowed,
                      is_denied=_is_denied, has_caps=lambda self: self.caps is not None)
CommitResponse = _model(_m.CommitResponse, "CommitResponse", validate=False)
ReleaseResponse = _model(_m.ReleaseResponse, "ReleaseResponse", validate=False)
ReservationExtendResponse = _model(_m.ReservationExtendResponse, "ReservationExtendResponse", validate=False)
DecisionResponse = _model(_m.DecisionResponse, "DecisionResponse", validate=False, is_allowed=_is_allowed,
                          is_denied=_is_denied)
EventCreateResponse = _model(_m.EventCreateResponse, "EventCreateResponse", validate=False)
ReservationDetail = _model(_m.ReservationDetail, "ReservationDetail", validate=False,
                           is_active=_status_is("ACTIVE"), is_committed=_status_is("COMMITTED"),
                           is_released=_status_is("RELEASED"), is_expired=_status_is("EXPIRED"))
ReservationSummary = _model(_m.ReservationSummary, "ReservationSummary", validate=False)
ReservationListResponse = _model(_m.ReservationListResponse, "ReservationListResponse", validate=False)
BalanceResponse = _model(_m.BalanceResponse, "BalanceResponse", validate=False)
ErrorResponse = _model(_m.ErrorResponse, "ErrorResponse", validate=False,
                       error_code=property(lambda self: ErrorCode.from_string(self.error)))
