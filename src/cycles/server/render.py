"""Turn store result records into wire responses.

Rendering is a pure function of (result record, replay facts), which is what makes idempotent
replays byte-identical: only `remaining_ttl_ms`, a volatile observation, is recomputed.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.ledger import Ledger
from ..protocol import models as m
from ..store.base import Outcome


def balance(rec: list[Any]) -> m.Balance:
    scope, unit, allocated, spent, reserved, debt, overdraft_limit, over = rec
    allocated, spent, reserved, debt, overdraft_limit = (
        int(allocated), int(spent), int(reserved), int(debt), int(overdraft_limit))
    return m.Balance(
        scope=scope,
        scope_path=scope,
        remaining=m.SignedAmount(unit=unit, amount=allocated - spent - reserved - debt),
        reserved=m.Amount(unit=unit, amount=reserved),
        spent=m.Amount(unit=unit, amount=spent),
        allocated=m.Amount(unit=unit, amount=allocated),
        debt=m.Amount(unit=unit, amount=debt),
        overdraft_limit=m.Amount(unit=unit, amount=overdraft_limit),
        is_over_limit=bool(over),
    )


def ledger_balance(led: Ledger) -> m.Balance:
    return balance([led.scope, led.unit, led.allocated, led.spent, led.reserved, led.debt, led.overdraft_limit,
                    led.is_over_limit])


def _caps(raw: dict[str, Any] | None) -> m.Caps | None:
    return m.Caps(**raw) if raw else None


def _ttl(out: Outcome, expires_at_ms: int) -> int:
    if out.replay and not out.reservation_active:
        return 0
    return max(0, expires_at_ms - out.now_ms)


def reservation_create(out: Outcome) -> m.ReservationCreateResponse:
    r = out.result
    bal = [balance(b) for b in r.get("balances") or []] or None
    if r["decision"] == "DENY":
        return m.ReservationCreateResponse(
            decision="DENY", affected_scopes=r["affected_scopes"], scope_path=r["scope_path"],
            reason_code=r["reason_code"], balances=bal, deny_detail=r.get("deny_detail"))
    live = "reservation_id" in r
    return m.ReservationCreateResponse(
        decision=r["decision"],
        affected_scopes=r["affected_scopes"],
        reservation_id=r.get("reservation_id"),
        reserved=m.Amount(unit=r["unit"], amount=int(r["amount"])),
        expires_at_ms=int(r["expires_at_ms"]) if live else None,
        remaining_ttl_ms=_ttl(out, int(r["expires_at_ms"])) if live else None,
        scope_path=r["scope_path"],
        caps=_caps(r.get("caps")),
        balances=bal,
    )


def decision(out: Outcome) -> m.DecisionResponse:
    r = out.result
    return m.DecisionResponse(
        decision=r["decision"], caps=_caps(r.get("caps")), reason_code=r.get("reason_code"),
        affected_scopes=r["affected_scopes"], deny_detail=r.get("deny_detail"))


def commit(out: Outcome) -> m.CommitResponse:
    r = out.result
    released = int(r.get("released") or 0)
    return m.CommitResponse(
        status="COMMITTED",
        charged=m.Amount(unit=r["unit"], amount=int(r["charged"])),
        released=m.Amount(unit=r["unit"], amount=released) if released else None,
        balances=[balance(b) for b in r["balances"]],
    )


def release(out: Outcome) -> m.ReleaseResponse:
    r = out.result
    return m.ReleaseResponse(status="RELEASED", released=m.Amount(unit=r["unit"], amount=int(r["released"])),
                             balances=[balance(b) for b in r["balances"]])


def extend(out: Outcome) -> m.ReservationExtendResponse:
    expires = int(out.result["expires_at_ms"])
    return m.ReservationExtendResponse(status="ACTIVE", expires_at_ms=expires, remaining_ttl_ms=_ttl(out, expires))


def event(out: Outcome) -> m.EventCreateResponse:
    r = out.result
    capped = int(r["charged"]) != int(r["actual"])
    return m.EventCreateResponse(
        status="APPLIED", event_id=r["event_id"],
        charged=m.Amount(unit=r["unit"], amount=int(r["charged"])) if capped else None,
        balances=[balance(b) for b in r["balances"]])


def reservation(rec: dict[str, Any], include: frozenset[str] = frozenset({"metadata", "committed_metadata"}),
                detail: bool = False) -> m.ReservationSummary:
    unit = rec["unit"]
    cls = m.ReservationDetail if detail else m.ReservationSummary
    committed = rec.get("committed")
    finalized = rec.get("finalized_at_ms") if rec["status"] in ("COMMITTED", "RELEASED") else None
    return cls(
        reservation_id=rec["reservation_id"],
        status=rec["status"],
        subject=m.Subject(**json.loads(rec["subject"])),
        action=m.Action(**json.loads(rec["action"])),
        reserved=m.Amount(unit=unit, amount=int(rec["amount"])),
        created_at_ms=int(rec["created_at_ms"]),
        expires_at_ms=int(rec["expires_at_ms"]),
        scope_path=rec["scope_path"],
        affected_scopes=json.loads(rec["affected_scopes"]),
        idempotency_key=rec.get("idempotency_key") or None,
        finalized_at_ms=int(finalized) if finalized is not None else None,
        committed=m.Amount(unit=unit, amount=int(committed)) if rec["status"] == "COMMITTED" and committed is not None else None,
        metadata=json.loads(rec["metadata"]) if "metadata" in include and rec.get("metadata") else None,
        committed_metadata=(json.loads(rec["committed_metadata"])
                            if "committed_metadata" in include and rec.get("committed_metadata") else None),
    )
