"""Pieces of the reserve -> execute -> commit/release lifecycle shared by the decorator, the streaming
helpers, and the sync and async clients."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..protocol import models as m
from . import core
from . import errors as e
from .config import SUBJECT_LEVELS, CyclesConfig
from .context import CyclesContext, CyclesMetrics

log = logging.getLogger("cycles.client")


def check_amount(value: Any, what: str) -> int:
    if type(value) is not int or value < 0 or value > m.INT64_MAX:
        raise ValueError(f"{what} must be a non-negative int64 (got {value!r}); money is integer minor units")
    return value


@dataclass
class Keys:
    reservation: str
    commit: str
    release: str
    chosen: bool = False  # by the caller: only then can it collide with another request's key

    @classmethod
    def from_key(cls, key: str | None) -> "Keys":
        if key is None:
            return cls(core.new_key(), core.new_key(), core.new_key())
        if not isinstance(key, str) or not key or len(key) > core.MAX_KEY:
            raise ValueError("idempotency_key must be a non-empty string of at most 256 characters")
        return cls(key, core.derive_key("commit", key), core.derive_key("release", key), chosen=True)


@dataclass
class CallSpec:
    estimate: int
    unit: str
    subject: m.Subject
    action: m.Action
    ttl_ms: int = 60_000
    grace_period_ms: int | None = None
    overage_policy: str = "ALLOW_IF_AVAILABLE"
    metadata: dict[str, Any] | None = None
    keys: Keys = field(default_factory=lambda: Keys.from_key(None))

    def create_request(self, *, dry_run: bool = False) -> m.ReservationCreateRequest:
        key = self.keys.reservation if not dry_run else core.derive_key("shadow", self.keys.reservation)
        return m.ReservationCreateRequest(
            idempotency_key=key, subject=self.subject, action=self.action,
            estimate=m.Amount(unit=self.unit, amount=self.estimate), ttl_ms=self.ttl_ms,
            grace_period_ms=self.grace_period_ms, overage_policy=self.overage_policy, dry_run=dry_run,
            metadata=self.metadata or None)

    def commit_request(self, ctx: CyclesContext, actual: int, *, actual_source: str | None = None) -> m.CommitRequest:
        metadata = dict(ctx.commit_metadata)
        if actual_source:
            metadata["actual_source"] = actual_source
        return m.CommitRequest(idempotency_key=self.keys.commit, actual=m.Amount(unit=self.unit, amount=actual),
                               metrics=ctx.metrics.to_wire(), metadata=metadata or None)

    def release_request(self, reason: str) -> m.ReleaseRequest:
        return m.ReleaseRequest(idempotency_key=self.keys.release, reason=reason[:256])


def make_subject(cfg: CyclesConfig, explicit: dict[str, Any], dimensions: dict[str, str] | None) -> m.Subject:
    values = cfg.default_subject()
    for lvl in SUBJECT_LEVELS:
        v = explicit.get(lvl)
        if v:
            values[lvl] = v
    if not values:
        raise ValueError("a subject needs at least one of tenant, workspace, app, workflow, agent, toolset "
                         "(argument or CYCLES_TENANT ...)")
    if dimensions:
        values["dimensions"] = dict(dimensions)
    return core.to_struct(values, m.Subject)


def make_action(kind: str | None, name: str | None, tags: list[str] | None) -> m.Action:
    return m.Action(kind=kind or "unknown", name=name or "unknown", tags=list(tags) if tags else None)


def deny_error(resp: m.ReservationCreateResponse, *, dry_run: bool = False) -> e.CyclesProtocolError:
    """A DENY inside a 200 body, as the typed error of its reason code (status 200)."""
    reason = resp.reason_code or "DENIED"
    cls = e.error_for(reason, 409) if reason in ("BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING",
                                                 "BUDGET_FROZEN", "BUDGET_CLOSED", "TENANT_CLOSED") \
        else e.CyclesProtocolError
    return cls(("Dry run denied" if dry_run else "Reservation denied") + f": {reason}", status=200,
               reason_code=reason, retry_after_ms=resp.retry_after_ms)


def evaluate_actual(actual: Any, result: Any, estimate: int, use_estimate: bool) -> tuple[int, str | None]:
    """The committed amount and its source marker. A failing `actual` callable commits the estimate
    (the work already happened; it is never released)."""
    if actual is None:
        if not use_estimate:
            raise ValueError("actual is required when use_estimate_if_actual_not_provided=False")
        return estimate, "estimate"
    if callable(actual):
        try:
            value = actual(result)
            return check_amount(value, "actual"), None
        except Exception:  # noqa: BLE001
            log.warning("the actual callable failed; committing the estimate (%d) instead", estimate, exc_info=True)
            return estimate, "estimate"
    return check_amount(actual, "actual"), None


def usage_metrics(ctx: CyclesContext, latency_ms: int) -> None:
    if ctx.metrics.latency_ms is None:
        ctx.metrics.latency_ms = max(0, latency_ms)


__all__ = ["CallSpec", "Keys", "CyclesMetrics", "make_subject", "make_action", "deny_error", "evaluate_actual",
           "check_amount", "usage_metrics"]
