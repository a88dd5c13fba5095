"""Shared by every plane (like lua/common.lua): the JSON codec, ids, column lists, row decoders and the
in-transaction lookups of a tenant's state and of budget rows."""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, Sequence

import msgspec

from ...core import ledger as L
from ...protocol.errors import ErrorCode, ProtocolError

_LEDGER_COLS = "scope, unit, allocated, spent, reserved, debt, overdraft_limit, is_over_limit, status, commit_overage_policy"
_RES_COLS = (
    "reservation_id, tenant_id, status, subject, action, unit, amount, scope_path, affected_scopes, "
    "budgeted_scopes, created_at_ms, expires_at_ms, grace_ms, deadline_ms, overage_policy, idempotency_key, "
    "metadata, committed, committed_metadata, finalized_at_ms, extensions, max_extensions"
)
_RES_KEYS = tuple(k.strip() for k in _RES_COLS.split(","))

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _dumps(obj: Any) -> str:
    return _encode(obj).decode()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _ledger(row: Sequence[Any]) -> L.Ledger:
    return L.Ledger(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8])


def _reservation(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_RES_KEYS, row))


_BUDGET_SELECT = "SELECT tenant_id, ledger_id, created_at_ms, updated_at_ms, extra, " + _LEDGER_COLS + " FROM budgets "


def _budget_rows(conn: sqlite3.Connection, clause: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    return _budget_dicts(conn.execute(_BUDGET_SELECT + clause, tuple(params)).fetchall())


def _budget_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        out.append({
            "tenant_id": r[0], "ledger_id": r[1], "created_at_ms": r[2], "updated_at_ms": r[3],
            "extra": _decode(r[4]), "commit_overage_policy": r[14], "ledger": _ledger(r[5:]),
        })
    return out


def _tenant_state(conn: sqlite3.Connection, tenant_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT record FROM tenants WHERE tenant_id=?", (tenant_id,)).fetchone()
    if row is None:
        return None
    try:
        record = _decode(row[0])
        if record.get("status") not in ("ACTIVE", "SUSPENDED", "CLOSED"):
            raise ValueError("status")
        return record
    except (ValueError, AttributeError) as exc:
        # The spec requires failing closed when governance state cannot be read.
        raise ProtocolError(ErrorCode.INTERNAL_ERROR, f"Malformed tenant record: {tenant_id}") from exc


def _guard_tenant_open(conn: sqlite3.Connection, tenant_id: str) -> None:
    tenant = _tenant_state(conn, tenant_id)
    if tenant is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id} not found")
    if tenant["status"] == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {tenant_id} is closed")
