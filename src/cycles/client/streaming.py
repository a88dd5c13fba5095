"""`client.stream_reservation(...)`: reserve, expose caps, accumulate usage, commit in `finally` from
the usage (or the estimate when no usage was reported), release on failure."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from ..protocol import models as m
from . import core
from . import errors as e
from .context import CyclesContext, _enter, _exit
from .guard import AsyncGuard, SyncGuard
from .lifecycle import CallSpec, Keys, check_amount

log = logging.getLogger("cycles.client")


@dataclass
class StreamUsage:
    tokens_input: int = 0
    tokens_output: int = 0
    actual_cost: int | None = None
    model_version: str | None = None
    custom: dict[str, Any] = field(default_factory=dict)

    def add_input_tokens(self, n: int) -> None:
        self.tokens_input += check_amount(n, "tokens")

    def add_output_tokens(self, n: int) -> None:
        self.tokens_output += check_amount(n, "tokens")

    def set_actual_cost(self, amount: int) -> None:
        self.actual_cost = check_amount(amount, "actual_cost")


class _StreamBase:
    def __init__(self, client: Any, *, action: m.Action | dict, estimate: m.Amount | dict,
                 subject: m.Subject | dict | None = None, ttl_ms: int = 120_000, grace_period_ms: int | None = None,
                 overage_policy: str = "ALLOW_IF_AVAILABLE", cost_fn: Callable[[StreamUsage], int] | None = None,
                 metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
                 raise_on_commit_failure: bool = False, shadow: bool = False) -> None:
        est = core.to_struct(estimate, m.Amount)
        subj = core.to_struct(subject, m.Subject) if subject is not None else core.to_struct(
            client.config.default_subject(), m.Subject)
        self.spec = CallSpec(est.amount, est.unit, subj, core.to_struct(action, m.Action), ttl_ms, grace_period_ms,
                             overage_policy, metadata, Keys.from_key(idempotency_key))
        self.client = client
        self.cost_fn = cost_fn
        self.raise_on_commit_failure = raise_on_commit_failure
        self.shadow = shadow
        self.usage = StreamUsage()
        self.ctx: CyclesContext | None = None
        self.settlement_error: BaseException | None = None
        self._token: Any = None

    @property
    def reservation_id(self) -> str | None:
        return self.ctx.reservation_id if self.ctx else None

    @property
    def caps(self) -> m.Caps | None:
        return self.ctx.caps if self.ctx else None

    @property
    def decision(self) -> str | None:
        return self.ctx.decision if self.ctx else None

    @property
    def release_error(self) -> BaseException | None:
        return self._guard.release_error

    @property
    def outcome(self) -> Any:
        return self._guard.outcome

    def _actual(self) -> tuple[int, str | None]:
        if self.usage.actual_cost is not None:
            return self.usage.actual_cost, None
        if self.cost_fn is not None:
            try:
                return check_amount(self.cost_fn(self.usage), "cost_fn result"), None
            except Exception:  # noqa: BLE001
                log.warning("cost_fn failed; committing the estimate", exc_info=True)
        return self.spec.estimate, "estimate"

    def _fill_metrics(self) -> None:
        assert self.ctx is not None
        mt = self.ctx.metrics
        if mt.tokens_input is None and self.usage.tokens_input:
            mt.tokens_input = self.usage.tokens_input
        if mt.tokens_output is None and self.usage.tokens_output:
            mt.tokens_output = self.usage.tokens_output
        if mt.model_version is None and self.usage.model_version:
            mt.model_version = self.usage.model_version
        if mt.custom is None and self.usage.custom:
            mt.custom = dict(self.usage.custom)

    def _check_outcome(self) -> None:
        out = self._guard.outcome
        if out is not None and out.kind != "success":
            self.settlement_error = out.error
            if self.raise_on_commit_failure and out.error is not None:
                raise out.error


class StreamReservation(_StreamBase):
    def __enter__(self) -> "StreamReservation":
        self._guard = SyncGuard(self.client, self.spec, shadow=self.shadow)
        self.ctx = self._guard.enter()
        self._token = _enter(self.ctx)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self._guard.release("stream_failed")
                return
            self._fill_metrics()
            amount, source = self._actual()
            self._guard.commit(amount, source)
            self._check_outcome()
        finally:
            _exit(self._token)


class AsyncStreamReservation(_StreamBase):
    async def __aenter__(self) -> "AsyncStreamReservation":
        self._guard = AsyncGuard(self.client, self.spec, shadow=self.shadow)
        self.ctx = await self._guard.enter()
        self._token = _enter(self.ctx)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                await self._guard.release("stream_failed")
                return
            self._fill_metrics()
            amount, source = self._actual()
            await self._guard.commit(amount, source)
            self._check_outcome()
        finally:
            _exit(self._token)


__all__ = ["StreamReservation", "AsyncStreamReservation", "StreamUsage", "e"]
