"""Action quota counters (v0.1.26) on the embedded store, read and written inside the reserve transaction.

A counter row is one window instance: `<scope>|<kind or __risk__:class>|<window>|<window key>`, where the
window key is the UTC calendar bucket of the store's time, or the run id for per_run windows. Counts of
per_run windows go back down when their reservation is released or expires (the spec's per_run lifecycle);
the keys they counted are kept on the reservation (`quota_runs`).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Sequence

from ...core import actions as A
from ...protocol.errors import ErrorCode, ProtocolError
from ..base import Outcome
from .common import _decode
from .core import _Core, _emit

Quota = Sequence[Any]  # see core.actions._quota


def _instance(q: Quota, now: int) -> tuple[str, str, int]:
    """(full key, window key, end of the window instance) of a quota at `now`."""
    size, bucket, fmt = q[1], q[2], q[3]
    if size:
        bucket = A.window_key(now, fmt)
        return f"{q[0]}|{bucket}", bucket, now - now % size + size
    return f"{q[0]}|{bucket}", bucket, now + q[5]


def check(conn: sqlite3.Connection, tenant: str, quotas: Sequence[Quota], now: int) -> tuple[list[Any], dict | None]:
    """Step 2 and 3: the counters as they are now, and the deny detail of the one that denies (None: all pass)."""
    keys = [_instance(q, now) for q in quotas]
    marks = ",".join("?" * len(keys))
    live = dict(conn.execute(f"SELECT counter, used FROM action_counters WHERE tenant_id=? AND counter IN ({marks}) "
                             "AND expires_at_ms > ?", (tenant, *(k[0] for k in keys), now)).fetchall())
    rows = []
    full: list[tuple[int, int]] = []
    for i, (q, (key, bucket, end)) in enumerate(zip(quotas, keys)):
        used = live.get(key, 0)
        rows.append((key, bucket, end, used))
        if used >= q[4]:
            full.append((i, used))
    hit = A.pick_violation(full, quotas)
    if hit is None:
        return rows, None
    detail = {**quotas[hit][7]}
    detail["quota_violation"] = {**detail["quota_violation"], "used": rows[hit][3], "window_key": rows[hit][1]}
    return rows, detail


def denial(detail: dict[str, Any]) -> ProtocolError:
    return ProtocolError(ErrorCode.ACTION_QUOTA_EXCEEDED, A.quota_message(detail["quota_violation"]),
                         details={"scope": detail["blocked_by_scope"], "deny_detail": detail})


def count(conn: sqlite3.Connection, tenant: str, quotas: Sequence[Quota], rows: Sequence[Any], now: int) -> list[str]:
    """Step 5: one more on every counter; returns the per_run keys (to count down on release / expiry)."""
    runs = []
    conn.executemany(
        "INSERT INTO action_counters (tenant_id, counter, used, expires_at_ms, last_ms, lim, policy_id) "
        "VALUES (?,?,?,?,?,?,?) ON CONFLICT (tenant_id, counter) DO UPDATE SET used=excluded.used, "
        "expires_at_ms=excluded.expires_at_ms, last_ms=excluded.last_ms, lim=excluded.lim, "
        "policy_id=excluded.policy_id",
        [(tenant, key, used + 1, end, now, q[4], q[7]["quota_violation"].get("policy_id"))
         for q, (key, _bucket, end, used) in zip(quotas, rows)])
    for q, (key, bucket, end, used) in zip(quotas, rows):
        violation = q[7]["quota_violation"]
        if used < q[6] <= used + 1:
            _emit("quota.threshold_approaching", tenant, violation["scope"], {
                "scope": violation["scope"],
                "action_kind": A.RISK if violation.get("risk_class") else violation["action_kind"],
                **({"risk_class": violation["risk_class"]} if violation.get("risk_class") else {}),
                "window": violation["window"], "window_key": bucket, "used": used + 1, "limit": q[4],
                "threshold_pct": round(q[6] / q[4], 4), "policy_id": violation.get("policy_id"), "tenant_id": tenant})
        if not q[1]:
            runs.append(key)
    return runs


def uncount(conn: sqlite3.Connection, tenant: str, runs_json: str | None) -> None:
    """A released or expired reservation's per_run counts go back down."""
    if not runs_json:
        return
    for key in _decode(runs_json):
        conn.execute("UPDATE action_counters SET used = used - 1 WHERE tenant_id=? AND counter=? AND used > 0",
                     (tenant, key))


def observed(cmd_mode: str | None, tenant: dict[str, Any] | None) -> bool:
    """The effective observe mode: the request's, else the tenant's (DISABLED is ENFORCE)."""
    mode = cmd_mode or (tenant or {}).get("observe_mode")
    return mode == "OBSERVE"


def list_counters(conn: sqlite3.Connection, tenant: str, now: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT counter, used, expires_at_ms, last_ms, lim, policy_id FROM action_counters "
                        "WHERE tenant_id=? AND expires_at_ms > ? ORDER BY counter", (tenant, now)).fetchall()
    return [{"counter": r[0], "used": r[1], "expires_at_ms": r[2], "last_ms": r[3], "limit": r[4], "policy_id": r[5]}
            for r in rows]


def reset_counter(conn: sqlite3.Connection, tenant: str, key: str, now: int) -> dict[str, Any]:
    row = conn.execute("SELECT used, expires_at_ms, last_ms, lim, policy_id FROM action_counters "
                       "WHERE tenant_id=? AND counter=? AND expires_at_ms > ?", (tenant, key, now)).fetchone()
    if row is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"No live action quota counter {key}")
    conn.execute("UPDATE action_counters SET used=0 WHERE tenant_id=? AND counter=?", (tenant, key))
    return {"counter": key, "previous_used": row[0], "used": 0, "expires_at_ms": row[1], "last_ms": row[2],
            "limit": row[3], "policy_id": row[4]}


def purge(conn: sqlite3.Connection, now: int) -> int:
    return conn.execute("DELETE FROM action_counters WHERE expires_at_ms <= ?", (now,)).rowcount


class _Quotas(_Core):
    """The admin view of the counters (GET /v1/admin/action-quota-counters and its reset)."""

    async def action_counters(self, tenant: str) -> list[dict[str, Any]]:
        return await self._awrite(lambda conn, now: list_counters(conn, tenant, now))

    async def reset_action_counter(self, tenant: str, key: str) -> dict[str, Any]:
        # an Outcome, so the reset's quota.counter_reset event takes previous_used, limit and policy_id from it
        out = await self._awrite(lambda conn, now: Outcome(reset_counter(conn, tenant, key, now), now_ms=now))
        return out.result


__all__ = ["check", "count", "denial", "list_counters", "observed", "purge", "reset_counter", "uncount"]
