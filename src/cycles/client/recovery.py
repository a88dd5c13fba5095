"""Commit recovery (cycles-sdk-recovery profile 0.3, durable level): the shared, I/O-free part.

`attempt(record, journal)` is a plan (see core.py) for ONE settlement attempt of a record in its current
mode; it returns an `Outcome`. `first_settlement` adds the journal choreography of the first attempt and
`retry` the bounded same-key retry loop. The sync and async engines (sync.py / aio.py) run these plans.

Classification of a commit/event answer:

* schema-valid 200 CommitResponse / 201 EventCreateResponse -> SUCCESS: record removed.
* 410 or RESERVATION_EXPIRED on commit -> the record switches to event mode, is persisted, and only
  then `POST /v1/events` goes out with the commit's idempotency key.
* RESERVATION_FINALIZED, IDEMPOTENCY_MISMATCH, BUDGET_EXCEEDED, OVERDRAFT_LIMIT_EXCEEDED,
  UNIT_MISMATCH, INVALID_REQUEST, NOT_FOUND, TENANT_CLOSED, BUDGET_FROZEN/CLOSED, DEBT_OUTSTANDING
  -> TERMINAL (an understood rejection): record removed, error surfaced. Spend is never released.
* 401 / 403 -> AUTH: record kept, no more retries in this process (replays after a restart).
* transport error, 5xx, 429 (not-before persisted), a 2xx that is not schema-valid, any other 4xx
  -> RETRY with the same body and key; the record is kept until a terminal outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from ..protocol import models as m
from . import core
from . import errors as e
from .journal import Journal, PendingRecord, now_ms

log = logging.getLogger("cycles.client.recovery")

SUCCESS, TERMINAL, AUTH, RETRY = "success", "terminal", "auth", "retry"
TERMINAL_CODES = frozenset({
    "RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH", "BUDGET_EXCEEDED", "OVERDRAFT_LIMIT_EXCEEDED",
    "UNIT_MISMATCH", "INVALID_REQUEST", "NOT_FOUND", "TENANT_CLOSED", "BUDGET_FROZEN", "BUDGET_CLOSED",
    "DEBT_OUTSTANDING",
})
MAX_WAIT_S = 3600.0


@dataclass
class Outcome:
    kind: str
    reservation_id: str
    mode: str
    response: Any = None
    error: e.CyclesError | None = None
    not_before_ms: int | None = None

    @property
    def settled(self) -> bool:
        return self.kind == SUCCESS


def classify(err: e.CyclesError) -> str:
    if isinstance(err, e.CyclesTransportError) or isinstance(err, e.InvalidResponseError):
        return RETRY
    assert isinstance(err, e.CyclesProtocolError)
    if err.status in (401, 403):
        return AUTH
    if err.status == 429 or err.status >= 500:
        return RETRY
    if err.error_code in TERMINAL_CODES:
        return TERMINAL
    return RETRY  # unknown code or a 4xx without one: keep the record


def _expired(err: e.CyclesError) -> bool:
    return isinstance(err, e.CyclesProtocolError) and (err.status == 410 or err.error_code == "RESERVATION_EXPIRED")


def build_record(base_url: str, reservation_id: str, commit: m.CommitRequest, subject: m.Subject, action: m.Action,
                 metadata: dict[str, Any] | None = None) -> PendingRecord:
    """The journal record of a guarded call's settlement, with its event fallback prepared up front."""
    event_meta = dict(metadata or {})
    event_meta.update(commit.metadata or {})
    event_meta["recovered_reservation_id"] = reservation_id
    event_meta["recovery_reason"] = "commit_after_reservation_expired"
    event = m.EventCreateRequest(idempotency_key=commit.idempotency_key, subject=subject, action=action,
                                 actual=commit.actual, metrics=commit.metrics, metadata=event_meta)
    return PendingRecord(reservation_id, base_url, "commit", msgspec.to_builtins(commit), msgspec.to_builtins(event))


def attempt(record: PendingRecord, journal: Journal | None) -> core.Plan[Outcome]:
    rid = record.reservation_id
    if record.mode == "commit":
        req = core.commit(rid, record.commit_body)
        answer = yield core.Send(req)
        try:
            if isinstance(answer, BaseException):
                raise core.transport_error(req, answer)
            return Outcome(SUCCESS, rid, "commit", core.interpret(req, answer))
        except e.CyclesError as err:
            if not _expired(err):
                return _outcome(err, rid, "commit")
            if not record.event_fallback_body:
                log.error("commit of %s: reservation expired and the record has no event fallback; kept", rid)
                return Outcome(AUTH, rid, "commit", error=err)
            record.mode = "event"
            record.not_before_ms = None
            if journal is not None:
                journal.promote(record)  # the mode switch is durable before the event leaves
            log.warning("reservation %s expired before commit; settling through POST /v1/events with the same key",
                        rid)
    req = core.create_event(record.event_fallback_body)
    answer = yield core.Send(req)
    try:
        if isinstance(answer, BaseException):
            raise core.transport_error(req, answer)
        return Outcome(SUCCESS, rid, "event", core.interpret(req, answer))
    except e.CyclesError as err:
        return _outcome(err, rid, "event")


def _outcome(err: e.CyclesError, rid: str, mode: str) -> Outcome:
    kind = classify(err)
    nb = None
    if kind == RETRY and isinstance(err, e.CyclesProtocolError) and err.status == 429 and err.retry_after_ms:
        nb = now_ms() + min(err.retry_after_ms, int(MAX_WAIT_S * 1000))
    return Outcome(kind, rid, mode, error=err, not_before_ms=nb)


def apply(outcome: Outcome, record: PendingRecord, journal: Journal | None) -> None:
    """Make the journal reflect an attempt's outcome."""
    if journal is None:
        return
    if outcome.kind in (SUCCESS, TERMINAL):
        journal.discard(record.reservation_id)
        if outcome.kind == TERMINAL:
            log.error("settlement of %s rejected (%s); record removed, spend NOT released: %s",
                      record.reservation_id, outcome.mode, outcome.error)
    else:
        if outcome.not_before_ms is not None:
            record.not_before_ms = outcome.not_before_ms
        journal.promote(record)
        log.warning("settlement of %s is unresolved (%s, %s); record kept for a same-key retry: %s",
                    record.reservation_id, outcome.mode, outcome.kind, outcome.error)


def first_settlement(record: PendingRecord, journal: Journal | None) -> core.Plan[Outcome]:
    """Journal, then the first attempt (the caller's thread/task). The intent is written before Send."""
    if journal is not None:
        journal.intend(record)
    outcome = yield from attempt(record, journal)
    apply(outcome, record, journal)
    return outcome


def retry(record: PendingRecord, journal: Journal | None, policy: core.RetryPolicy, *,
          deadline: float | None = None, attempts: int | None = None) -> core.Plan[Outcome]:
    """Same-key retries with backoff, honouring the persisted not-before. Stops on a terminal outcome,
    AUTH, exhaustion or the deadline (monotonic); an unresolved record stays in the journal."""
    n = 0
    limit = attempts if attempts is not None else policy.max_attempts
    outcome = Outcome(RETRY, record.reservation_id, record.mode)
    while n < limit:
        wait = policy.backoff(n - 1) if n > 0 else 0.0
        if record.not_before_ms is not None:
            wait = max(wait, (record.not_before_ms - now_ms()) / 1000)
        wait = min(wait, MAX_WAIT_S)
        if deadline is not None and time.monotonic() + wait > deadline:
            log.warning("settlement of %s deferred: next attempt not allowed before the deadline", record.reservation_id)
            return Outcome(RETRY, record.reservation_id, record.mode, error=outcome.error)
        if wait > 0:
            yield core.Sleep(wait)
        outcome = yield from attempt(record, journal)
        apply(outcome, record, journal)
        if outcome.kind != RETRY:
            return outcome
        n += 1
    log.warning("settlement of %s still unresolved after %d attempts; record kept for the next process",
                record.reservation_id, n)
    return outcome


@dataclass
class RecoveryReport:
    settled: list[Outcome]
    rejected: list[Outcome]
    unresolved: list[Outcome]
    quarantined: list[str]

    @property
    def ok(self) -> bool:
        return not self.unresolved and not self.quarantined
