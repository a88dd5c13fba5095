"""The admin plane apart from budgets: settings, tenants, API keys, versioned documents (policies, webhooks...)
and the cascade that finishes closing a tenant."""

from __future__ import annotations

import sqlite3
from typing import Any

from ...core import ledger as L
from ...protocol.errors import ErrorCode, ProtocolError, VersionConflict
from ..base import pending_journal
from . import quotas as Q
from .common import _RES_COLS, _decode, _dumps, _guard_tenant_open, _reservation, _tenant_state
from .core import _Core, _cascade_event
from .runtime import _scope_ledgers, _write_ledgers


class _Admin(_Core):
    """Settings, tenants, API keys, documents and the tenant close cascade."""

    # ---- settings, tenants, keys ----

    async def get_setting(self, name: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE name=?", (name,))
        return rows[0][0] if rows else None

    async def put_setting(self, name: str, value: str, *, only_if_absent: bool) -> str:
        def tx(conn: sqlite3.Connection, now: int) -> str:
            if only_if_absent:
                conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
                return conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0]
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return value

        return await self._awrite(tx)

    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        def tx(conn: sqlite3.Connection, now: int) -> tuple[dict[str, Any], bool]:
            row = conn.execute("SELECT record FROM tenants WHERE tenant_id=?", (record["tenant_id"],)).fetchone()
            if row:
                journal = pending_journal()
                journal[:] = [e for e in journal if not e.get("only_if_created")]
                return _decode(row[0]), False
            conn.execute(
                "INSERT INTO tenants (tenant_id, status, record, created_at_ms) VALUES (?, ?, ?, ?)",
                (record["tenant_id"], record["status"], _dumps(record), now),
            )
            return record, True

        return await self._awrite(tx)

    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM tenants WHERE tenant_id=?", (tenant_id,))
        return _decode(rows[0][0]) if rows else None

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            record = _tenant_state(conn, tenant_id)
            if record is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id} not found")
            if record["status"] == "CLOSED":
                raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {tenant_id} is closed")
            status = changes.get("status")
            if status == "SUSPENDED" and record["status"] != "SUSPENDED":
                record["suspended_at"] = now_iso
            if status == "CLOSED":
                record["closed_at"] = now_iso
                record["cascade"] = "PENDING"  # finished by cascade_close, resumed after a crash
            record.update(changes)
            record["updated_at"] = now_iso
            conn.execute("UPDATE tenants SET status=?, record=? WHERE tenant_id=?",
                         (record["status"], _dumps(record), tenant_id))
            return record

        return await self._awrite(tx)

    async def create_api_key(self, record: dict[str, Any]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            try:
                conn.execute(
                    "INSERT INTO api_keys (key_id, prefix, tenant_id, record, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                    (record["key_id"], record["key_prefix"], record["tenant_id"], _dumps(record), now),
                )
            except sqlite3.IntegrityError:
                raise ProtocolError(ErrorCode.INTERNAL_ERROR, "API key prefix collision; retry the request") from None

        await self._awrite(tx)

    async def governance_gen(self, tenant: str) -> int:
        rows = self._read("SELECT gen FROM gens WHERE tenant_id=?", (tenant,))
        return rows[0][0] if rows else 0

    async def find_api_key(self, prefix: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM api_keys WHERE prefix=?", (prefix,))
        return _decode(rows[0][0]) if rows else None

    async def list_tenants(self) -> list[dict[str, Any]]:
        return [_decode(r[0]) for r in self._read("SELECT record FROM tenants ORDER BY tenant_id")]

    async def list_api_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        if tenant is None:
            rows = self._read("SELECT record FROM api_keys ORDER BY created_at_ms, key_id")
        else:
            rows = self._read("SELECT record FROM api_keys WHERE tenant_id=? ORDER BY created_at_ms, key_id", (tenant,))
        return [_decode(r[0]) for r in rows]

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM api_keys WHERE key_id=?", (key_id,))
        return _decode(rows[0][0]) if rows else None

    async def update_api_key(self, key_id: str, changes: dict[str, Any], *, guard_tenant: bool = True) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any]:
            row = conn.execute("SELECT record FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
            if row is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"API key {key_id} not found")
            record = _decode(row[0])
            if guard_tenant:
                _guard_tenant_open(conn, record["tenant_id"])
            if record.get("status") == "REVOKED":
                raise ProtocolError(ErrorCode.KEY_REVOKED, f"API key {key_id} is revoked", status=409)
            record.update(changes)
            conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(record), key_id))
            return record

        return await self._awrite(tx)

    async def touch_api_keys(self, last_used: dict[str, int]) -> None:
        def tx(conn: sqlite3.Connection, now: int) -> None:
            for key_id, at_ms in last_used.items():
                row = conn.execute("SELECT record FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
                if row is None:
                    continue
                record = _decode(row[0])
                if (record.get("last_used_at_ms") or 0) < at_ms:
                    record["last_used_at_ms"] = at_ms
                    conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(record), key_id))

        await self._awrite(tx)

    # ---- documents ----

    async def get_doc(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id))
        return _decode(rows[0][0]) if rows else None

    async def list_docs(self, kind: str, tenant: str | None) -> list[dict[str, Any]]:
        if tenant is None:
            rows = self._read("SELECT record FROM docs WHERE kind=? ORDER BY doc_id", (kind,))
        else:
            rows = self._read("SELECT record FROM docs WHERE kind=? AND tenant_id=? ORDER BY doc_id", (kind, tenant))
        return [_decode(r[0]) for r in rows]

    async def save_doc(self, kind: str, tenant: str, doc_id: str, record: dict[str, Any] | None,
                       expect_version: int | None, *, guard_tenant: bool = True) -> dict[str, Any] | None:
        def tx(conn: sqlite3.Connection, now: int) -> dict[str, Any] | None:
            if guard_tenant:
                _guard_tenant_open(conn, tenant)
            row = conn.execute("SELECT version FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id)).fetchone()
            current = row[0] if row else None
            if current != expect_version:
                raise _doc_conflict(kind, doc_id, current, expect_version)
            if record is None:
                conn.execute("DELETE FROM docs WHERE kind=? AND doc_id=?", (kind, doc_id))
                return None
            stored = {**record, "version": (current or 0) + 1}
            conn.execute("INSERT OR REPLACE INTO docs (kind, doc_id, tenant_id, version, record, due_ms) "
                         "VALUES (?,?,?,?,?,?)",
                         (kind, doc_id, tenant, stored["version"], _dumps(stored), stored.get("due_ms")))
            return stored

        return await self._awrite(tx)

    async def due_docs(self, kind: str, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._read("SELECT record FROM docs WHERE kind=? AND due_ms IS NOT NULL AND due_ms <= ? "
                          "ORDER BY due_ms LIMIT ?", (kind, now_ms, limit))
        return [_decode(r[0]) for r in rows]

    # ---- tenant close cascade ----

    async def cascade_close(self, tenant: str, batch: int = 200) -> bool:
        def tx(conn: sqlite3.Connection, now: int) -> bool:
            record = _tenant_state(conn, tenant)
            if record is None or record["status"] != "CLOSED":
                return True
            rows = conn.execute(f"SELECT {_RES_COLS}, quota_runs FROM reservations WHERE tenant_id=? AND "
                                "status='ACTIVE' LIMIT ?", (tenant, batch)).fetchall()
            corr = f"tenant_close_cascade:{tenant}:{record.get('closed_at', '')}"
            released: dict[tuple[str, str], int] = {}
            for r in rows:
                res = _reservation(r)
                ledgers = _scope_ledgers(conn, tenant, _decode(res["budgeted_scopes"]), res["unit"])
                _write_ledgers(conn, tenant, L.unhold(ledgers, res["amount"]), now)
                Q.uncount(conn, tenant, r[-1])  # per_run quota counts come back, as on release
                conn.execute("UPDATE reservations SET status='RELEASED', finalized_at_ms=? WHERE reservation_id=?",
                             (now, res["reservation_id"]))
                for led in ledgers:
                    released[(led.scope, led.unit)] = released.get((led.scope, led.unit), 0) + res["amount"]
            for (scope, unit), amount in sorted(released.items()):  # one aggregate per ledger and step
                _cascade_event("reservation.released_via_tenant_cascade", tenant, corr, scope=scope, unit=unit,
                               released_amount=amount)
            if len(rows) == batch:
                return False
            for ledger_id, scope, unit, status in conn.execute(
                    "SELECT ledger_id, scope, unit, status FROM budgets WHERE tenant_id=? AND status!='CLOSED'",
                    (tenant,)).fetchall():
                _cascade_event("budget.closed_via_tenant_cascade", tenant, corr, ledger_id=ledger_id, scope=scope,
                               unit=unit, prior_status=status, new_status="CLOSED")
            conn.execute("UPDATE budgets SET status='CLOSED', updated_at_ms=? WHERE tenant_id=? AND status!='CLOSED'",
                         (now, tenant))
            for key_id, raw in conn.execute("SELECT key_id, record FROM api_keys WHERE tenant_id=?", (tenant,)).fetchall():
                key = _decode(raw)
                if key.get("status") != "REVOKED":
                    _cascade_event("api_key.revoked_via_tenant_cascade", tenant, corr, key_id=key_id,
                                   name=key.get("name"), prior_status=key.get("status"), new_status="REVOKED")
                    key.update(status="REVOKED", revoked_at_ms=now, revoked_reason="tenant closed")
                    conn.execute("UPDATE api_keys SET record=? WHERE key_id=?", (_dumps(key), key_id))
            for doc_id, raw in conn.execute("SELECT doc_id, record FROM docs WHERE kind='webhook' AND tenant_id=?",
                                            (tenant,)).fetchall():
                hook = _decode(raw)
                if hook.get("status") != "DISABLED":
                    _cascade_event("webhook.disabled_via_tenant_cascade", tenant, corr, subscription_id=doc_id,
                                   prior_status=hook.get("status"), new_status="DISABLED")
                    hook.update(status="DISABLED", version=hook.get("version", 0) + 1)
                    conn.execute("UPDATE docs SET record=?, version=? WHERE kind='webhook' AND doc_id=?",
                                 (_dumps(hook), hook["version"], doc_id))
            record["cascade"] = "DONE"
            conn.execute("UPDATE tenants SET record=? WHERE tenant_id=?", (_dumps(record), tenant))
            return True

        return await self._awrite(tx)

    async def pending_cascades(self) -> list[str]:
        rows = self._read("SELECT tenant_id, record FROM tenants WHERE status='CLOSED'")
        return [t for t, raw in rows if _decode(raw).get("cascade") == "PENDING"]


def _doc_conflict(kind: str, doc_id: str, current: int | None, expected: int | None) -> ProtocolError:
    if expected is None:
        return ProtocolError(ErrorCode.DUPLICATE_RESOURCE, f"{kind} {doc_id} already exists")
    if current is None:
        return ProtocolError(ErrorCode.NOT_FOUND, f"{kind} {doc_id} not found")
    return VersionConflict(f"{kind} {doc_id}")
