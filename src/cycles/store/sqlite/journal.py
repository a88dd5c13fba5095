"""The audit log and governance events as stored: appending journal entries, time-ordered scans, one event by
id, and retention purges. (The events a transaction produces are collected in core.py.)"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..base import AuditScan, stamp_journal
from .common import _decode
from .core import _Core, _insert_journal


class _Journal(_Core):
    """Audit and governance-event storage."""

    async def append_journal(self, entries: list[dict[str, Any]]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            _insert_journal(conn, stamp_journal(entries, now, None))

        await self._awrite(tx)

    async def scan_audit(self, scan: AuditScan) -> list[dict[str, Any]]:
        return self._scan("audit", "log_id", scan)

    def _scan(self, table: str, id_col: str, scan: AuditScan) -> list[dict[str, Any]]:
        where, params = [], []
        if scan.tenant is not None:
            where.append("tenant_id=?")
            params.append(scan.tenant)
        if scan.from_ms is not None:
            where.append("timestamp_ms >= ?")
            params.append(scan.from_ms)
        if scan.to_ms is not None:
            where.append("timestamp_ms <= ?")
            params.append(scan.to_ms)
        op, direction = ("<", "DESC") if scan.descending else (">", "ASC")
        if scan.after is not None:
            where.append(f"(timestamp_ms, {id_col}) {op} (?, ?)")
            params += list(scan.after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self._read(f"SELECT record FROM {table} {clause} ORDER BY timestamp_ms {direction}, {id_col} {direction} "
                          "LIMIT ?", (*params, scan.limit))
        return [_decode(r[0]) for r in rows]

    async def scan_events(self, scan: AuditScan) -> list[dict[str, Any]]:
        return self._scan("gov_events", "event_id", scan)

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM gov_events WHERE event_id=?", (event_id,))
        return _decode(rows[0][0]) if rows else None

    async def purge_events(self, older_than_ms: int) -> int:
        return await self._awrite(
            lambda conn, now: conn.execute("DELETE FROM gov_events WHERE timestamp_ms < ?", (older_than_ms,)).rowcount)

    async def purge_audit(self, older_than_ms: int) -> int:
        return await self._awrite(
            lambda conn, now: conn.execute("DELETE FROM audit WHERE timestamp_ms < ?", (older_than_ms,)).rowcount)
