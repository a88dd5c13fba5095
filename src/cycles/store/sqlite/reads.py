"""Runtime-plane reads: a reservation, reservation listings (filters, sort, keyset pages), balances and the
count of active reservations."""

from __future__ import annotations

import json
from typing import Any

from ..base import Page, ReservationQuery
from .common import _LEDGER_COLS, _RES_COLS, _ledger, _reservation
from .core import _Core


class _Reads(_Core):
    """Reads of reservations and balances, outside transactions."""

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {_RES_COLS} FROM reservations WHERE reservation_id=?", (reservation_id,))
        return _reservation(rows[0]) if rows else None

    async def list_reservations(self, q: ReservationQuery) -> Page:
        where, params = ["tenant_id=?"], [q.tenant]
        if q.status:
            where.append("status=?")
            params.append(q.status)
        if q.idempotency_key:
            where.append("idempotency_key=?")
            params.append(q.idempotency_key)
        for level, value in q.subject.items():
            where.append(f"s_{level}=?")
            params.append(value.lower())
        for col, (lo, hi) in q.windows.items():
            if lo is not None:
                where.append(f"{col} >= ?")
                params.append(lo)
            if hi is not None:
                where.append(f"{col} <= ?")
                params.append(hi)
        col = _SORT_COLUMNS[q.sort_by]
        op, direction = ("<", "DESC") if q.sort_dir == "desc" else (">", "ASC")
        if q.after is not None:
            where.append(f"({col}, reservation_id) {op} (?, ?)")
            params += list(q.after)
        rows = self._read(
            f"SELECT {_RES_COLS} FROM reservations WHERE {' AND '.join(where)} "
            f"ORDER BY {col} {direction}, reservation_id {direction} LIMIT ?",
            (*params, q.limit + 1),
        )
        return Page([_reservation(r) for r in rows[:q.limit]], len(rows) > q.limit)

    async def scan_spend(self, tenant: str, from_ms: int, to_ms: int, limit: int) -> Page:
        reservations = self._read(
            "SELECT scope_path, subject, action, unit, committed, finalized_at_ms FROM reservations "
            "WHERE tenant_id=? AND status='COMMITTED' AND finalized_at_ms BETWEEN ? AND ? "
            "ORDER BY created_at_ms DESC LIMIT ?", (tenant, from_ms, to_ms, limit + 1))
        events = self._read(
            "SELECT scope_path, subject, action, unit, charged, created_at_ms FROM events "
            "WHERE tenant_id=? AND created_at_ms BETWEEN ? AND ? ORDER BY created_at_ms DESC LIMIT ?",
            (tenant, from_ms, to_ms, limit + 1))
        items = [_spend(source, row) for source, rows in (("reservation", reservations), ("event", events))
                 for row in rows[:limit]]
        return Page(items, len(reservations) > limit or len(events) > limit)

    async def balances(self, tenant: str, wanted: dict[str, str], include_children: bool, limit: int,
                       after: tuple[str, str] | None) -> Page:
        from ...core.scopes import matches_filter

        items: list[dict[str, Any]] = []
        cursor = after
        # Scopes are filtered in Python (segment matching); scan in keyset batches until the page fills.
        while True:
            where, params = ["tenant_id=?"], [tenant]
            if cursor is not None:
                where.append("(scope, unit) > (?, ?)")
                params += list(cursor)
            rows = self._read(
                f"SELECT {_LEDGER_COLS} FROM budgets WHERE {' AND '.join(where)} ORDER BY scope, unit LIMIT 500",
                params,
            )
            for row in rows:
                if matches_filter(row[0], wanted, include_children):
                    if len(items) == limit:
                        return Page(items, True)
                    items.append({"ledger": _ledger(row)})
            if len(rows) < 500:
                return Page(items, False)
            cursor = (rows[-1][0], rows[-1][1])

    async def count_active(self) -> int:
        return self._read("SELECT count(*) FROM reservations WHERE status='ACTIVE'")[0][0]


_SORT_COLUMNS = {
    "reservation_id": "reservation_id",
    "tenant": "tenant_id",
    "scope_path": "scope_path",
    "status": "status",
    "reserved": "amount",
    "created_at_ms": "created_at_ms",
    "expires_at_ms": "expires_at_ms",
}


def _spend(source: str, row: Any) -> dict[str, Any]:
    scope_path, subject, action, unit, amount, at_ms = row
    return {"source": source, "scope_path": scope_path, "subject": json.loads(subject), "action": json.loads(action),
            "unit": unit, "amount": int(amount or 0), "at_ms": int(at_ms)}
