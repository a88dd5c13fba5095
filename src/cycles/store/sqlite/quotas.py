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
        "INSERT INTO action_counters (tenant_id, counter, used, expires_at_ms, last_ms, lim, policy_id, ttl_ms) "
        "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (tenant_id, counter) DO UPDATE SET used=excluded.used, "
        "expires_at_ms=excluded.expires_at_ms, last_ms=excluded.last_ms, lim=excluded.lim, "
        "policy_id=excluded.policy_id, ttl_ms=excluded.ttl_ms",
        [(tenant, key, used + 1, end, now, q[4], q[7]["quota_violation"].get("policy_id"), None if q[1] else q[5])
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
    """The spec's reset: used 0; a calendar window keeps its end, a per_run counter's TTL starts again now."""
    row = conn.execute("SELECT used, expires_at_ms, last_ms, lim, policy_id, ttl_ms FROM action_counters "
                       "WHERE tenant_id=? AND counter=? AND expires_at_ms > ?", (tenant, key, now)).fetchone()
    if row is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"No live action quota counter {key}")
    expires = row[1]
    if A.split_key(key)[3] == "per_run":
        expires = now + (row[5] or A.DEFAULT_RUN_TTL_MS)
    conn.execute("UPDATE action_counters SET used=0, expires_at_ms=? WHERE tenant_id=? AND counter=?",
                 (expires, tenant, key))
    return {"counter": key, "previous_used": row[0], "used": 0, "expires_at_ms": expires, "last_ms": row[2],
            "limit": row[3], "policy_id": row[4]}


# the same condition as the partial index action_counters_hot, so only the rows it holds are read
# (no ORDER BY: with one the planner may prefer the primary key and scan every row)
HOT = "SELECT tenant_id, counter, used, lim FROM action_counters WHERE used * 5 >= lim * 4 AND expires_at_ms > ?"


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

    async def hot_action_counters(self) -> list[dict[str, Any]]:
        now = await self.now_ms()
        return [{"tenant_id": r[0], "counter": r[1], "used": r[2], "limit": r[3]} for r in self._read(HOT, (now,))]

    async def governance_counts(self) -> dict[str, int]:
        observe = self._read("SELECT count(*) FROM tenants "
                             "WHERE coalesce(json_extract(record, '$.observe_mode'), 'ENFORCE') != 'ENFORCE'")[0][0]
        allow, deny = self._read(
            "SELECT coalesce(sum(coalesce(json_array_length(record, '$.allowed_action_kinds'), 0) > 0), 0), "
            "coalesce(sum(coalesce(json_array_length(record, '$.denied_action_kinds'), 0) > 0), 0) "
            "FROM docs WHERE kind = 'policy'")[0]
        return {"in_observe_mode": observe, "policies_with_allow_list": allow, "policies_with_deny_list": deny}


__all__ = ["check", "count", "denial", "list_counters", "observed", "purge", "reset_counter",
           "uncount"]
