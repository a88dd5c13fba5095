"""Ledger math: the pure rules for reserve, commit, release, events and funding.

A ledger keeps four counters per (scope, unit): allocated, spent, reserved, debt; remaining is always
derived (allocated - spent - reserved - debt), so the spec's ledger invariant holds by construction.
`spent` is consumption paid from the allocation and `debt` is consumption beyond it, so spent + debt is
the total consumption and funding never makes consumption disappear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.models import INT64_MAX, INT64_MIN

REJECT = "REJECT"
ALLOW_IF_AVAILABLE = "ALLOW_IF_AVAILABLE"
ALLOW_WITH_OVERDRAFT = "ALLOW_WITH_OVERDRAFT"


@dataclass(slots=True, frozen=True)
class Ledger:
    scope: str
    unit: str
    allocated: int
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    overdraft_limit: int = 0
    is_over_limit: bool = False
    status: str = "ACTIVE"

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt


@dataclass(slots=True, frozen=True)
class Denial:
    code: ErrorCode
    scope: str
    message: str

    def error(self) -> ProtocolError:
        return ProtocolError(self.code, self.message, details={"scope": self.scope})


def check_reserve(ledgers: Sequence[Ledger], amount: int) -> Denial | None:
    """The first reason a new reservation of `amount` must be refused, condition by condition.

    Conditions are checked across all scopes before the next one, so over-limit wins over debt
    on any scope (spec: OVERDRAFT_LIMIT_EXCEEDED takes precedence over DEBT_OUTSTANDING).
    """
    for led in ledgers:
        if led.status == "CLOSED":
            return Denial(ErrorCode.BUDGET_CLOSED, led.scope, f"Budget is closed for scope {led.scope}")
    for led in ledgers:
        if led.status == "FROZEN":
            return Denial(ErrorCode.BUDGET_FROZEN, led.scope, f"Budget is frozen for scope {led.scope}")
    for led in ledgers:
        if led.is_over_limit:
            return Denial(
                ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
                led.scope,
                f"Scope {led.scope} is over its overdraft limit; no new reservations until reconciled",
            )
    for led in ledgers:
        if led.debt > 0 and led.overdraft_limit == 0:
            return Denial(ErrorCode.DEBT_OUTSTANDING, led.scope, f"Scope {led.scope} has outstanding debt {led.debt}")
    for led in ledgers:
        if led.remaining < amount:
            return Denial(
                ErrorCode.BUDGET_EXCEEDED,
                led.scope,
                f"Insufficient remaining budget for scope {led.scope}: remaining {led.remaining}, requested {amount}",
            )
    return None


def _moved(l: Ledger, reserved: int, spent: int, debt: int | None = None, is_over_limit: bool | None = None) -> Ledger:
    """A copy with new counters (the runtime's per-scope step: dataclasses.replace costs several times more)."""
    return Ledger(l.scope, l.unit, l.allocated, spent, reserved, l.debt if debt is None else debt, l.overdraft_limit,
                  l.is_over_limit if is_over_limit is None else is_over_limit, l.status)


def hold(ledgers: Sequence[Ledger], amount: int) -> list[Ledger]:
    return [_moved(led, led.reserved + amount, led.spent) for led in ledgers]


def unhold(ledgers: Sequence[Ledger], amount: int) -> list[Ledger]:
    return [_moved(led, led.reserved - amount, led.spent) for led in ledgers]


@dataclass(slots=True, frozen=True)
class Settlement:
    charged: int
    ledgers: list[Ledger]


def settle(
    ledgers: Sequence[Ledger], held: int, actual: int, policy: str, *, reject_any_overage: bool
) -> Settlement:
    """See `_settle`; also refuses a charge that would take `spent` past the int64 range."""
    out = _settle(ledgers, held, actual, policy, reject_any_overage=reject_any_overage)
    for led in out.ledgers:
        if led.spent > INT64_MAX:
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                f"charging {actual} would take spent past the int64 range for scope {led.scope}")
    return out


def _settle(
    ledgers: Sequence[Ledger], held: int, actual: int, policy: str, *, reject_any_overage: bool
) -> Settlement:
    """Charge `actual` against scopes that hold `held` for it (held is 0 for a direct event).

    `reject_any_overage` is the commit flavour of REJECT (any actual above the reservation is
    refused); events under REJECT are refused only when some scope cannot cover the amount.
    Raises ProtocolError for BUDGET_EXCEEDED / OVERDRAFT_LIMIT_EXCEEDED; nothing is changed then.
    """
    delta = actual - held
    if delta <= 0:
        return Settlement(actual, [_moved(l, l.reserved - held, l.spent + actual) for l in ledgers])

    if policy == REJECT and reject_any_overage:
        raise ProtocolError(
            ErrorCode.BUDGET_EXCEEDED,
            f"Actual {actual} exceeds the reserved {held} and the overage policy is REJECT",
            details={"scope": ledgers[0].scope, "reserved": held, "actual": actual},
        )
    short = [(l, max(0, delta - max(0, l.remaining))) for l in ledgers]
    if all(s == 0 for _, s in short):
        return Settlement(actual, [_moved(l, l.reserved - held, l.spent + actual) for l in ledgers])

    if policy == REJECT:
        scope = next(l.scope for l, s in short if s > 0)
        raise ProtocolError(
            ErrorCode.BUDGET_EXCEEDED,
            f"Actual {actual} exceeds what is available for scope {scope} and the overage policy is REJECT",
            details={"scope": scope},
        )
    if policy == ALLOW_WITH_OVERDRAFT:
        for led, s in short:
            if led.debt + s > led.overdraft_limit:
                raise ProtocolError(
                    ErrorCode.OVERDRAFT_LIMIT_EXCEEDED,
                    f"Overdraft limit exceeded for scope {led.scope}: debt {led.debt} + shortfall {s} > limit {led.overdraft_limit}",
                    details={"scope": led.scope, "debt": led.debt, "shortfall": s, "overdraft_limit": led.overdraft_limit},
                )
        out = []
        for led, s in short:
            out.append(_moved(led, led.reserved - held, led.spent + actual - s, led.debt + s,
                              led.is_over_limit or led.debt + s > led.overdraft_limit))
        return Settlement(actual, out)

    # ALLOW_IF_AVAILABLE (and commit-REJECT already handled): charge what every scope can cover.
    covered = min(delta, min(max(0, l.remaining) for l in ledgers))
    charged = held + covered
    out = [
        _moved(l, l.reserved - held, l.spent + charged, is_over_limit=l.is_over_limit or s > 0)
        for l, s in short
    ]
    return Settlement(charged, out)


def _int64(value: int, what: str) -> int:
    if value > INT64_MAX:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{what} would exceed the int64 range")
    return value


def fund(led: Ledger, operation: str, amount: int, spent: int | None = None) -> Ledger:
    """Apply a funding operation (governance BudgetFundingRequest) to one ledger."""
    if led.status == "FROZEN":
        raise ProtocolError(ErrorCode.BUDGET_FROZEN, f"Budget is frozen for scope {led.scope}")
    if led.status == "CLOSED":
        raise ProtocolError(ErrorCode.BUDGET_CLOSED, f"Budget is closed for scope {led.scope}")
    if operation == "CREDIT":
        new = replace(led, allocated=_int64(led.allocated + amount, "allocated"))
    elif operation == "DEBIT":
        if led.remaining - amount < 0:
            raise ProtocolError(
                ErrorCode.BUDGET_EXCEEDED,
                f"DEBIT of {amount} would make remaining negative for scope {led.scope} (remaining {led.remaining})",
            )
        new = replace(led, allocated=led.allocated - amount)
    elif operation == "RESET":
        new = replace(led, allocated=amount)
    elif operation == "RESET_SPENT":
        new = replace(led, allocated=amount, spent=spent or 0)
    elif operation == "REPAY_DEBT":
        repay = min(amount, led.debt)
        new = replace(
            led,
            debt=led.debt - repay,
            spent=_int64(led.spent + repay, "spent"),
            allocated=_int64(led.allocated + amount, "allocated"),
        )
    else:  # decoding restricts the operation to the enum
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"unknown funding operation {operation}")
    if new.remaining < INT64_MIN:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{operation} would push remaining below the int64 range")
    return replace(new, is_over_limit=new.debt > new.overdraft_limit)


def configure(led: Ledger, changes: dict) -> Ledger:
    """Apply a settings change or status transition (freeze, unfreeze, close) to one ledger.

    `from_status` lists the statuses the transition may start from. CLOSED is terminal. A FROZEN
    ledger still takes settings changes (the operator may raise its overdraft limit to thaw safely).
    """
    if led.status == "CLOSED":
        raise ProtocolError(ErrorCode.BUDGET_CLOSED, f"Budget is closed for scope {led.scope}")
    new = led
    status = changes.get("status")
    if status is not None and status != led.status:
        allowed = changes.get("from_status")
        if allowed and led.status not in allowed:
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                f"Budget for scope {led.scope} is {led.status}; cannot become {status}", status=409)
        if status == "CLOSED" and led.reserved > 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                f"Budget for scope {led.scope} still holds {led.reserved} for open reservations; "
                                "release them (or let them expire) before closing it", status=409)
        new = replace(new, status=status)
    elif status is not None:
        code = ErrorCode.BUDGET_FROZEN if status == "FROZEN" else ErrorCode.INVALID_REQUEST
        raise ProtocolError(code, f"Budget for scope {led.scope} is already {status}", status=409)
    if changes.get("allocated") is not None:
        new = replace(new, allocated=changes["allocated"])
        if new.remaining < INT64_MIN:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "allocated would push remaining below the int64 range")
    if changes.get("overdraft_limit") is not None:
        # As with funding: a changed limit re-decides the flag from the debt.
        new = replace(new, overdraft_limit=changes["overdraft_limit"])
        new = replace(new, is_over_limit=new.debt > new.overdraft_limit)
    return new


ROLLOVER_POLICIES = ("NONE", "CARRY_FORWARD", "CAP_AT_ALLOCATED")


def rollover(led: Ledger, policy: str, base: int) -> Ledger:
    """Start a new budget period on one ledger.

    `base` is one period's allocation. Spent starts again from 0; what is reserved stays held (those
    actions are in flight and settle in the new period) and debt stays owed. Unused budget, what
    nobody spent, reserved or owes (`max(0, remaining)`), is
      NONE: dropped (use it or lose it),
      CARRY_FORWARD: added to the new period's allocation,
      CAP_AT_ALLOCATED: added, but at most one period's allocation (balance never above 2 × base).
    """
    unused = max(0, led.remaining)
    if policy == "CARRY_FORWARD":
        carried = unused
    elif policy == "CAP_AT_ALLOCATED":
        carried = min(unused, base)
    else:
        carried = 0
    new = replace(led, allocated=_int64(base + carried, "allocated"), spent=0)
    return replace(new, is_over_limit=new.debt > new.overdraft_limit)
