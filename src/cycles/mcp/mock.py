"""Mock backend (`CYCLES_MOCK=true`): synthetic ALLOW answers without a Cycles server.

It has the methods of `AsyncCyclesClient` that the tools use and returns the same wire models, so
the tools, hints and output schemas behave exactly as against a server. It always allows and never
enforces anything; ids carry a `mock_` prefix. Reservations are remembered in memory (per process)
so commit/release/extend/get/list answer consistently.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from ..client import errors as e
from ..client.core import to_struct
from ..core import scopes as S
from ..protocol import models as m

ALLOCATED = 1_000_000
SPENT = 200_000
HELD = 50_000
OVERDRAFT = 100_000


def _now() -> int:
    return int(time.time() * 1000)


def _balance(scope: str, unit: str) -> m.Balance:
    return m.Balance(
        scope=scope, scope_path=scope, remaining=m.SignedAmount(unit, ALLOCATED - SPENT - HELD),
        reserved=m.Amount(unit, HELD), spent=m.Amount(unit, SPENT), allocated=m.Amount(unit, ALLOCATED),
        debt=m.Amount(unit, 0), overdraft_limit=m.Amount(unit, OVERDRAFT), is_over_limit=False)


class MockBackend:
    def __init__(self) -> None:
        self.reservations: dict[str, m.ReservationDetail] = {}

    @staticmethod
    def _scopes(subject: m.Subject) -> tuple[str, list[str]]:
        path, scopes = S.derive(msgspec.to_builtins(subject))
        return path or "tenant:default", scopes or ["tenant:default"]

    def _get(self, reservation_id: str) -> m.ReservationDetail:
        rsv = self.reservations.get(reservation_id)
        if rsv is None:
            raise e.NotFoundError(f"Reservation {reservation_id} not found (mock)", status=404,
                                  error_code="NOT_FOUND", request_id=f"mock_req_{uuid.uuid4().hex[:12]}")
        return rsv

    async def create_reservation(self, req: Any) -> m.ReservationCreateResponse:
        r = to_struct(req, m.ReservationCreateRequest)
        path, scopes = self._scopes(r.subject)
        bal = [_balance(path, r.estimate.unit)]
        if r.dry_run:
            return m.ReservationCreateResponse(decision="ALLOW", affected_scopes=scopes, reserved=r.estimate,
                                               scope_path=path, balances=bal)
        ttl = r.ttl_ms or 60_000
        rid = f"mock_rsv_{uuid.uuid4()}"
        now = _now()
        self.reservations[rid] = m.ReservationDetail(
            reservation_id=rid, status="ACTIVE", subject=r.subject, action=r.action, reserved=r.estimate,
            created_at_ms=now, expires_at_ms=now + ttl, scope_path=path, affected_scopes=scopes,
            idempotency_key=r.idempotency_key, metadata=r.metadata)
        return m.ReservationCreateResponse(decision="ALLOW", affected_scopes=scopes, reservation_id=rid,
                                           reserved=r.estimate, expires_at_ms=now + ttl, remaining_ttl_ms=ttl,
                                           scope_path=path, balances=bal)

    async def commit_reservation(self, reservation_id: str, req: Any) -> m.CommitResponse:
        r = to_struct(req, m.CommitRequest)
        rsv = self._get(reservation_id)
        released = max(0, rsv.reserved.amount - r.actual.amount)
        self.reservations[reservation_id] = msgspec.structs.replace(
            rsv, status="COMMITTED", committed=r.actual, finalized_at_ms=_now(), committed_metadata=r.metadata)
        return m.CommitResponse(status="COMMITTED", charged=r.actual,
                                released=m.Amount(r.actual.unit, released) if released else None,
                                balances=[_balance(rsv.scope_path, r.actual.unit)])

    async def release_reservation(self, reservation_id: str, req: Any) -> m.ReleaseResponse:
        to_struct(req, m.ReleaseRequest)
        rsv = self._get(reservation_id)
        self.reservations[reservation_id] = msgspec.structs.replace(rsv, status="RELEASED", finalized_at_ms=_now())
        return m.ReleaseResponse(status="RELEASED", released=rsv.reserved,
                                 balances=[_balance(rsv.scope_path, rsv.reserved.unit)])

    async def extend_reservation(self, reservation_id: str, req: Any) -> m.ReservationExtendResponse:
        r = to_struct(req, m.ReservationExtendRequest)
        rsv = self._get(reservation_id)
        expires = max(rsv.expires_at_ms, _now()) + r.extend_by_ms
        self.reservations[reservation_id] = msgspec.structs.replace(rsv, expires_at_ms=expires)
        return m.ReservationExtendResponse(status="ACTIVE", expires_at_ms=expires,
                                           remaining_ttl_ms=max(0, expires - _now()))

    async def decide(self, req: Any) -> m.DecisionResponse:
        r = to_struct(req, m.DecisionRequest)
        return m.DecisionResponse(decision="ALLOW", affected_scopes=self._scopes(r.subject)[1])

    async def create_event(self, req: Any) -> m.EventCreateResponse:
        r = to_struct(req, m.EventCreateRequest)
        path, _ = self._scopes(r.subject)
        return m.EventCreateResponse(status="APPLIED", event_id=f"mock_evt_{uuid.uuid4()}", charged=r.actual,
                                     balances=[_balance(path, r.actual.unit)])

    async def get_balances(self, **q: Any) -> m.BalanceResponse:
        level = next((lvl for lvl in S.LEVELS if q.get(lvl)), None)
        scope = f"{level}:{q[level]}" if level else "tenant:default"
        return m.BalanceResponse(balances=[_balance(scope, "USD_MICROCENTS")], has_more=False)

    async def list_reservations(self, **q: Any) -> m.ReservationListResponse:
        out = []
        for rsv in self.reservations.values():
            if q.get("status") and rsv.status != q["status"]:
                continue
            if q.get("idempotency_key") and rsv.idempotency_key != q["idempotency_key"]:
                continue
            if any(q.get(lvl) and getattr(rsv.subject, lvl) != q[lvl] for lvl in S.LEVELS):
                continue
            out.append(m.ReservationSummary(**{f: getattr(rsv, f) for f in m.ReservationSummary.__struct_fields__}))
        limit = q.get("limit") or 50
        return m.ReservationListResponse(reservations=out[:limit], has_more=len(out) > limit)

    async def get_reservation(self, reservation_id: str) -> m.ReservationDetail:
        return self._get(reservation_id)

    async def aclose(self) -> None:
        pass
