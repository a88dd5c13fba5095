"""The context visible inside a guarded function (`get_cycles_context()`).

It lives in a ContextVar that is set with a token and RESET (not cleared) when the guarded call ends,
so after a nested guarded call returns, the outer function sees its own context again. For generators
the context is installed only while the generator body runs (around each step), so it never leaks
into the consumer's code between items.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from ..protocol import models as m

_current: contextvars.ContextVar["CyclesContext | None"] = contextvars.ContextVar("cycles_context", default=None)


def get_cycles_context() -> "CyclesContext | None":
    return _current.get()


def _enter(ctx: "CyclesContext") -> contextvars.Token:
    return _current.set(ctx)


def _exit(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # reset from another context (e.g. a generator finalised elsewhere)
        _current.set(None)


@dataclass
class CyclesMetrics:
    """Writable by the guarded function; sent as the commit's `metrics`."""

    tokens_input: int | None = None
    tokens_output: int | None = None
    latency_ms: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] | None = None

    def put_custom(self, key: str, value: Any) -> None:
        if self.custom is None:
            self.custom = {}
        self.custom[key] = value

    def is_empty(self) -> bool:
        return all(v is None for v in (self.tokens_input, self.tokens_output, self.latency_ms, self.model_version,
                                       self.custom))

    def to_wire(self) -> m.StandardMetrics | None:
        if self.is_empty():
            return None
        return m.StandardMetrics(tokens_input=self.tokens_input, tokens_output=self.tokens_output,
                                 latency_ms=self.latency_ms, model_version=self.model_version, custom=self.custom)


@dataclass
class HeartbeatEvent:
    """An observable heartbeat failure: which reservation, what happened, and what the SDK does next."""

    reservation_id: str
    error: str
    disposition: str  # "retry" (same key) | "stop"
    at_ms: int


@dataclass
class CyclesContext:
    reservation_id: str | None
    estimate: int
    unit: str
    decision: str
    idempotency_key: str
    caps: m.Caps | None = None
    reason_code: str | None = None
    expires_at_ms: int | None = None
    remaining_ttl_ms: int | None = None
    affected_scopes: list[str] = field(default_factory=list)
    scope_path: str | None = None
    reserved: m.Amount | None = None
    balances: list[m.Balance] | None = None
    shadow: bool = False
    metrics: CyclesMetrics = field(default_factory=CyclesMetrics)
    commit_metadata: dict[str, Any] = field(default_factory=dict)
    heartbeat_events: list[HeartbeatEvent] = field(default_factory=list)
    extensions: int = 0
    parent: "CyclesContext | None" = None

    def has_caps(self) -> bool:
        return self.caps is not None

    def is_tool_allowed(self, tool: str) -> bool:
        """Allowlist wins (a tool must be on it when it is present), then the denylist."""
        if self.caps is None:
            return True
        if self.caps.tool_allowlist is not None:
            return tool in self.caps.tool_allowlist
        if self.caps.tool_denylist is not None:
            return tool not in self.caps.tool_denylist
        return True

    @property
    def would_allow(self) -> bool:
        """In shadow mode: whether the live call would have been allowed."""
        return self.decision != "DENY"

    @classmethod
    def from_response(cls, resp: m.ReservationCreateResponse, *, estimate: int, unit: str, key: str,
                      shadow: bool = False) -> "CyclesContext":
        return cls(reservation_id=resp.reservation_id, estimate=estimate, unit=unit, decision=resp.decision,
                   idempotency_key=key, caps=resp.caps, reason_code=resp.reason_code,
                   expires_at_ms=resp.expires_at_ms, remaining_ttl_ms=resp.remaining_ttl_ms,
                   affected_scopes=list(resp.affected_scopes), scope_path=resp.scope_path, reserved=resp.reserved,
                   balances=resp.balances, shadow=shadow, parent=get_cycles_context())
