"""Budgets on the admin plane: create, list, read and configure them, fund operations, period rollovers, and
the overview's counters and top lists."""

from __future__ import annotations

import sqlite3
from typing import Any

from ...core import events as E
from ...core import ledger as L
from ...protocol.errors import ErrorCode, ProtocolError
from ..base import FundCommand, Outcome, Page
from .common import _BUDGET_SELECT, _LEDGER_COLS, _budget_dicts, _budget_rows, _decode, _dumps, _guard_tenant_open, _ledger, new_id
from .core import _Core, _emit
from .runtime import _remember, _replay, _write_ledgers


class _NotRolled(Exception):
    """The period was already rolled over: nothing written, nothing journaled."""


class _Budgets(_Core):
    """Budget administration, funding, rollover and the overview."""

    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            _guard_tenant_open(conn, record["tenant_id"])
            exists = conn.execute(
                "SELECT 1 FROM budgets WHERE tenant_id=? AND scope=? AND unit=?",
                (record["tenant_id"], record["scope"], record["unit"]),
            ).fetchone()
            if exists:
                raise ProtocolError(
                    ErrorCode.DUPLICATE_RESOURCE,
                    f"Budget already exists for scope {record['scope']} and unit {record['unit']}",
                    details={"scope": record["scope"], "unit": record["unit"]},
                )
            ledger_id = new_id("ldg")
            conn.execute(
                "INSERT INTO budgets (tenant_id, scope, unit, ledger_id, allocated, overdraft_limit, "
                "commit_overage_policy, extra, created_at_ms, updated_at_ms, period_end_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (record["tenant_id"], record["scope"], record["unit"], ledger_id, record["allocated"],
                 record.get("overdraft_limit", 0), record.get("commit_overage_policy"),
                 _dumps(record.get("extra") or {}), now, now, (record.get("extra") or {}).get("period_end_ms")),
            )
            return _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?",
                                (record["tenant_id"], record["scope"], record["unit"]))[0]

        return await self._awrite(tx)

    async def list_budgets(self, tenant: str | None, filters: dict[str, Any], limit: int,
                           after: tuple[str, str, str] | None) -> Page:
        where, params = [], []
        if tenant is not None:
            where.append("tenant_id=?")
            params.append(tenant)
        if filters.get("scope_prefix"):
            # the scope itself and its descendants: workspace:eng does not take in workspace:engineering
            prefix = filters["scope_prefix"].rstrip("/")
            where.append("(scope = ? OR substr(scope, 1, ?) = ?)")
            params += [prefix, len(prefix) + 1, prefix + "/"]
        for col in ("unit", "status"):
            if filters.get(col):
                where.append(f"{col}=?")
                params.append(filters[col])
        if filters.get("over_limit") is not None:
            where.append("is_over_limit=?")
            params.append(1 if filters["over_limit"] else 0)
        if filters.get("has_debt") is not None:
            where.append("debt > 0" if filters["has_debt"] else "debt = 0")
        if after is not None:
            where.append("(tenant_id, scope, unit) > (?, ?, ?)")
            params += list(after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = _budget_dicts(self._read(_BUDGET_SELECT + f"{clause} ORDER BY tenant_id, scope, unit LIMIT ?",
                                        (*params, limit + 1)))
        return Page(rows[:limit], len(rows) > limit)

    async def fund(self, cmd: FundCommand) -> Outcome:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            if cmd.idempotency_key:
                replay = _replay(conn, cmd.tenant, "fund", cmd.idempotency_key, cmd.payload_hash)
                if replay is not None:
                    return Outcome(_decode(replay[0]), replay=True, now_ms=now)
            _guard_tenant_open(conn, cmd.tenant)
            row = conn.execute(
                f"SELECT {_LEDGER_COLS} FROM budgets WHERE tenant_id=? AND scope=? AND unit=?",
                (cmd.tenant, cmd.scope, cmd.unit),
            ).fetchone()
            if row is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for scope {cmd.scope} and unit {cmd.unit}")
            before = _ledger(row)
            after = L.fund(before, cmd.operation, cmd.amount, cmd.spent)
            _write_ledgers(conn, cmd.tenant, [after], now, before=[before])
            if cmd.operation in ("RESET", "RESET_SPENT"):
                _set_period_allocation(conn, cmd.tenant, cmd.scope, cmd.unit, cmd.amount)
            result = {
                "operation": cmd.operation, "unit": cmd.unit, "timestamp_ms": now,
                "previous": [before.allocated, before.remaining, before.debt, before.spent],
                "new": [after.allocated, after.remaining, after.debt, after.spent],
            }
            if cmd.idempotency_key:
                _remember(conn, cmd.tenant, "fund", cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        return await self._awrite(tx)

    async def get_budget(self, tenant: str, scope: str, unit: str) -> dict[str, Any] | None:
        rows = _budget_dicts(self._read(_BUDGET_SELECT + "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit)))
        return rows[0] if rows else None

    async def update_budget(self, tenant: str, scope: str, unit: str, changes: dict[str, Any],
                            *, guard_tenant: bool = True) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            if guard_tenant:
                _guard_tenant_open(conn, tenant)
            rows = _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))
            if not rows:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for scope {scope} and unit {unit}")
            row = rows[0]
            led, extra = row["ledger"], row["extra"]
            new = L.configure(led, changes)
            if changes.get("extra"):
                extra = {**extra, **changes["extra"]}
                extra = {k: v for k, v in extra.items() if v is not None}
            for event_type, ev_scope, data in E.transitions(led, new):
                _emit(event_type, tenant, ev_scope, data)
            policy = changes["commit_overage_policy"] if "commit_overage_policy" in changes else row["commit_overage_policy"]
            conn.execute(
                "UPDATE budgets SET allocated=?, overdraft_limit=?, is_over_limit=?, status=?, commit_overage_policy=?, "
                "extra=?, updated_at_ms=? WHERE tenant_id=? AND scope=? AND unit=?",
                (new.allocated, new.overdraft_limit, int(new.is_over_limit), new.status, policy, _dumps(extra), now,
                 tenant, scope, unit))
            return _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))[0]

        return await self._awrite(tx)

    async def due_rollovers(self, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        return _budget_dicts(self._read(
            _BUDGET_SELECT + "WHERE period_end_ms IS NOT NULL AND period_end_ms <= ? AND status != 'CLOSED' "
                             "ORDER BY period_end_ms LIMIT ?", (now_ms, limit)))

    async def rollover_budget(self, tenant: str, scope: str, unit: str, expected_end_ms: int,
                              period: dict[str, Any]) -> dict[str, Any] | None:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any] | None:
            rows = _budget_rows(conn, "WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit))
            if not rows or rows[0]["extra"].get("period_end_ms") != expected_end_ms or rows[0]["ledger"].status == "CLOSED":
                # Another process rolled it over first (or it was closed): exactly once. Raised, not returned,
                # so the scheduler's audit row, which rides with a successful write, is not recorded twice.
                raise _NotRolled
            row = rows[0]
            extra = row["extra"]
            before = row["ledger"]
            after = L.rollover(before, extra.get("rollover_policy") or "NONE", before.allocated if extra.get("period_allocation") is None else extra["period_allocation"])
            extra = {**extra, **period}
            conn.execute("UPDATE budgets SET allocated=?, spent=?, is_over_limit=?, extra=?, period_end_ms=?, updated_at_ms=? "
                         "WHERE tenant_id=? AND scope=? AND unit=?",
                         (after.allocated, after.spent, int(after.is_over_limit), _dumps(extra), extra["period_end_ms"],
                          now, tenant, scope, unit))
            _emit("budget.reset_spent", tenant, scope, {
                "ledger_id": row["ledger_id"], "scope": scope, "unit": unit, "operation": "ROLLOVER",
                "rollover_policy": extra.get("rollover_policy"), "previous_state": E.ledger_state(before),
                "new_state": E.ledger_state(after), "period_start": extra.get("period_start"),
                "period_end": extra.get("period_end")})
            return {"before": before, "after": after, "extra": extra}

        try:
            return await self._awrite(tx)
        except _NotRolled:
            return None

    async def counters(self) -> dict[str, int]:
        return {name: value for name, value in self._read("SELECT name, value FROM counters")}

    async def top_budgets(self, kind: str, limit: int = 10) -> list[dict[str, Any]]:
        where = "is_over_limit = 1" if kind == "over_limit" else "debt > 0"
        return _budget_dicts(self._read(_BUDGET_SELECT + f"WHERE {where} ORDER BY debt DESC LIMIT ?", (limit,)))


def _set_period_allocation(conn: sqlite3.Connection, tenant: str, scope: str, unit: str, amount: int) -> None:
    row = conn.execute("SELECT extra FROM budgets WHERE tenant_id=? AND scope=? AND unit=?", (tenant, scope, unit)).fetchone()
    extra = _decode(row[0])
    if "period_allocation" in extra:
        extra["period_allocation"] = amount
        conn.execute("UPDATE budgets SET extra=? WHERE tenant_id=? AND scope=? AND unit=?", (_dumps(extra), tenant, scope, unit))
