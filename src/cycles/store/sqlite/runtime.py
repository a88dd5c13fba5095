"""The runtime plane: reserve (and decide / dry run), commit, release, extend, direct events and the expiry
of overdue reservations, with their helpers: idempotent replay, the governance generation check, rate
limits, and reading and writing the ledgers of a scope path."""

from __future__ import annotations

import itertools
import operator
import secrets
import sqlite3
from typing import Any, Callable, Coroutine, Sequence

from ...core import events as E
from ...core import ledger as L
from ...core import policies as P
from ...protocol.errors import ErrorCode, ProtocolError
from ..base import EventCommand, Outcome, ReserveCommand, SettleCommand, StaleGovernance
from .common import (
    _LEDGER_COLS, _RES_COLS, _decode, _dumps, _ledger, _reservation, _tenant_state, new_id,
)
from .core import _CommitThenRaise, _Core, _emit
from . import quotas as Q

SUBJECT_LEVELS = ("workspace", "app", "workflow", "agent", "toolset")

DEFAULT_TTL_MS = 60_000
DEFAULT_GRACE_MS = 5_000
DEFAULT_MAX_EXTENSIONS = 10


_ID_PROCESS = secrets.randbits(40)
_ID_SEQ = itertools.count()


def time_ordered_id(prefix: str, now_ms: int) -> str:
    """`<prefix>_` + 24 hex digits: the time, then this process's random part and a counter. Unique across
    processes (40 random bits) and time-ordered, so a batch of new rows fills one B-tree page instead of
    dirtying a random page each."""
    return f"{prefix}_{now_ms & 0xFFFFFFFFFF:010x}{_ID_PROCESS:010x}{next(_ID_SEQ) & 0xFFFF:04x}"


# built once: an f-string is formatted again on every call, and the statement cache is keyed by the text
# status, committed, committed_metadata, finalized_at_ms and extensions are constants for a new reservation:
# written as literals, not bound per row (the stored record is the same: tests/test_hot_trims.py compares)
_INSERT_RESERVATION = (
    f"INSERT INTO reservations ({_RES_COLS}, s_workspace, s_app, s_workflow, s_agent, s_toolset, commit_limits, "
    "payload_hash, result, quota_runs) "
    "VALUES (?,?,'ACTIVE',?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,NULL,0,?,?,?,?,?,?,?,?,?,?)")
_COMMIT_RESERVATION = ("UPDATE reservations SET status='COMMITTED', committed=?, committed_metadata=NULL, "
                       "finalized_at_ms=? WHERE reservation_id=?")
_COMMIT_RESERVATION_METADATA = ("UPDATE reservations SET status='COMMITTED', committed=?, committed_metadata=?, "
                                "finalized_at_ms=? WHERE reservation_id=?")
_OPEN_RESERVATION = f"SELECT {_RES_COLS}, commit_limits, quota_runs FROM reservations WHERE reservation_id=?"


def balance_record(led: L.Ledger) -> list[Any]:
    """The compact form of a ledger inside result records (rendered into a wire Balance)."""
    return [led.scope, led.unit, led.allocated, led.spent, led.reserved, led.debt, led.overdraft_limit, led.is_over_limit]


class _Runtime(_Core):
    """reserve / decide, commit, release, extend, create_event, and the maintenance writes of the runtime."""

    # The runtime writes return _awrite's coroutine instead of awaiting it in a coroutine of their own: one
    # frame and one suspension fewer per request on the hot path (callers await them all the same).
    def reserve(self, cmd: ReserveCommand) -> Coroutine[Any, Any, Outcome]:
        return self._awrite(lambda conn, now: self._reserve(conn, now, cmd), rerun=True)

    def _reserve(self, conn: sqlite3.Connection, now: int, cmd: ReserveCommand) -> Outcome:
        if cmd.endpoint == "reserve":
            made = _reserve_prelude(conn, cmd, now)
            if made is not None:
                return made
        else:
            if cmd.gen is not None:
                _check_gen(conn, cmd.tenant, cmd.gen)
            replay = _replay(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash)
            if replay is not None:
                return _replayed(conn, replay, now)
        evaluate_only = cmd.dry_run or cmd.endpoint == "decide"
        tenant = _tenant_of(conn, cmd.tenant, cmd)
        base = {"scope_path": cmd.scope_path, "affected_scopes": cmd.scopes, "unit": cmd.unit, "amount": cmd.amount}

        status = tenant.get("status") if tenant else None
        if status == "CLOSED":
            if evaluate_only:
                return _deny(conn, cmd, base, now, "TENANT_CLOSED")
            raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {cmd.tenant} is closed")
        if status == "SUSPENDED":
            if evaluate_only:
                return _deny(conn, cmd, base, now, "TENANT_SUSPENDED")
            raise ProtocolError(ErrorCode.FORBIDDEN, f"Tenant {cmd.tenant} is suspended; new reservations are refused")
        if cmd.endpoint == "reserve" and Q.observed(cmd.observe_mode, tenant):
            evaluate_only = True  # shadow mode: the full evaluation, nothing changed
            base["observed"] = True
        gov, counted = cmd.actions, None
        if gov is not None:  # v0.1.26 steps 1 to 3, before rate limits and budgets
            if gov.get("deny"):
                reason, detail, message = gov["deny"]
                if evaluate_only:
                    return _deny(conn, cmd, base, now, reason, detail=detail)
                raise ProtocolError(ErrorCode(reason), message,
                                    details={"scope": detail["blocked_by_scope"], "deny_detail": detail})
            if gov.get("quotas"):
                counted, detail = Q.check(conn, cmd.tenant, gov["quotas"], now)
                if detail is not None:
                    if evaluate_only:
                        return _deny(conn, cmd, base, now, "ACTION_QUOTA_EXCEEDED", detail=detail)
                    raise Q.denial(detail)

        if cmd.limits and not evaluate_only:
            _rate_check(conn, cmd.limits, now)
        overage: dict[str, str | None] = {}
        ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
        if not ledgers:
            if evaluate_only:
                return _deny(conn, cmd, base, now, "BUDGET_NOT_FOUND")
            raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for provided scope: {cmd.scope_path}",
                                details={"scope": cmd.scope_path, "unit": cmd.unit})
        denial = L.check_reserve(ledgers, cmd.amount)
        expired = 0
        if denial is not None:
            expired = _expire_due(conn, now, 1000, tenant=cmd.tenant)
            if expired:
                ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
                denial = L.check_reserve(ledgers, cmd.amount)
        if denial is not None:
            if evaluate_only:
                return _deny(conn, cmd, base, now, denial.code.value, ledgers)
            if expired:
                raise _CommitThenRaise(denial.error())
            raise denial.error()

        caps = cmd.caps
        decision = "ALLOW_WITH_CAPS" if caps else "ALLOW"
        if evaluate_only:
            result = {**base, "decision": decision, "caps": caps, "balances": [balance_record(l) for l in ledgers]}
            _remember(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        # Precedence for every setting: the request, then the governing policy, then the budget
        # (overage only), then the tenant, then the built-in default.
        pol, t = cmd.policy, tenant or {}
        ttl = cmd.ttl_ms or pol.get("default_ttl_ms") or t.get("default_reservation_ttl_ms") or DEFAULT_TTL_MS
        max_ttl = pol.get("max_ttl_ms") or t.get("max_reservation_ttl_ms")
        if max_ttl:
            ttl = min(ttl, max_ttl)
        grace = DEFAULT_GRACE_MS if cmd.grace_ms is None else cmd.grace_ms
        policy = (cmd.overage_policy or pol.get("overage_policy") or _budget_policy(ledgers, overage)
                  or t.get("default_commit_overage_policy") or L.ALLOW_IF_AVAILABLE)
        max_ext = pol.get("max_extensions", t.get("max_reservation_extensions"))
        max_ext = DEFAULT_MAX_EXTENSIONS if max_ext is None else max_ext
        if cmd.limits:
            _rate_count(conn, cmd.limits, now)
        runs = Q.count(conn, cmd.tenant, gov["quotas"], counted, now) if counted else None
        held = L.hold(ledgers, cmd.amount)
        _write_ledgers(conn, cmd.tenant, held, now, before=ledgers)
        rid = time_ordered_id("rsv", now)
        expires = now + ttl
        subj = cmd.subject
        result = {**base, "decision": decision, "caps": caps, "reservation_id": rid, "expires_at_ms": expires,
                  "balances": [balance_record(l) for l in held]}
        # the reservation row is also the idempotency record of the reserve that made it (_reserve_prelude)
        conn.execute(
            _INSERT_RESERVATION,
            (rid, cmd.tenant, _dumps(subj), _dumps(cmd.action), cmd.unit, cmd.amount, cmd.scope_path,
             _dumps(cmd.scopes), _dumps([l.scope for l in held]), now, expires, grace, expires + grace, policy,
             cmd.idempotency_key, _dumps(cmd.metadata) if cmd.metadata is not None else None,
             max_ext, *[v.lower() if isinstance(v := subj.get(level), str) else None for level in SUBJECT_LEVELS],
             _dumps(cmd.commit_limits) if cmd.commit_limits else None, cmd.payload_hash, _dumps(result),
             _dumps(runs) if runs else None),
        )
        return Outcome(result, now_ms=now, reservation_active=True)

    def commit(self, cmd: SettleCommand) -> Coroutine[Any, Any, Outcome]:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "commit", allow_grace=True)
            if replay is not None:
                return replay
            if cmd.unit != res["unit"]:
                raise ProtocolError(
                    ErrorCode.UNIT_MISMATCH,
                    f"Commit unit {cmd.unit} does not match the reservation unit {res['unit']}",
                    details={"scope": res["scope_path"], "requested_unit": cmd.unit, "expected_units": [res["unit"]]},
                )
            limits = res["commit_limits"]
            if limits:
                _rate_check(conn, limits, now)
            ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
            settled = L.settle(ledgers, res["amount"], cmd.actual or 0, res["overage_policy"], reject_any_overage=True)
            if limits:
                _rate_count(conn, limits, now)
            _write_ledgers(conn, res["tenant_id"], settled.ledgers, now, before=ledgers,
                           reservation_id=cmd.reservation_id, overage_policy=res["overage_policy"])
            if settled.charged > res["amount"] or (cmd.actual or 0) > res["amount"]:
                _emit("reservation.commit_overage", res["tenant_id"], res["scope_path"], {
                    "reservation_id": cmd.reservation_id, "scope": res["scope_path"], "unit": res["unit"],
                    "estimated_amount": res["amount"], "actual_amount": cmd.actual or 0,
                    "overage": (cmd.actual or 0) - res["amount"], "overage_policy": res["overage_policy"],
                    "debt_incurred": sum(a.debt - b.debt for a, b in zip(settled.ledgers, ledgers))})
            if cmd.metadata is None:  # the usual commit: the NULL written as a literal, not bound
                conn.execute(_COMMIT_RESERVATION, (settled.charged, now, cmd.reservation_id))
            else:
                conn.execute(_COMMIT_RESERVATION_METADATA,
                             (settled.charged, _dumps(cmd.metadata), now, cmd.reservation_id))
            result = {"unit": res["unit"], "charged": settled.charged,
                      "released": max(0, res["amount"] - settled.charged),
                      "balances": [balance_record(l) for l in settled.ledgers]}
            return _settled(conn, res, cmd, "commit", result, now)

        return self._awrite(tx, rerun=True)

    def release(self, cmd: SettleCommand) -> Coroutine[Any, Any, Outcome]:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "release", allow_grace=True)
            if replay is not None:
                return replay
            ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
            freed = L.unhold(ledgers, res["amount"])
            _write_ledgers(conn, res["tenant_id"], freed, now, before=ledgers)
            Q.uncount(conn, res["tenant_id"], res["quota_runs"])
            conn.execute("UPDATE reservations SET status='RELEASED', finalized_at_ms=? WHERE reservation_id=?",
                         (now, cmd.reservation_id))
            result = {"unit": res["unit"], "released": res["amount"], "balances": [balance_record(l) for l in freed]}
            return _settled(conn, res, cmd, "release", result, now)

        return self._awrite(tx, rerun=True)

    def extend(self, cmd: SettleCommand) -> Coroutine[Any, Any, Outcome]:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            res, replay = _open_reservation(conn, now, cmd, "extend", allow_grace=False)
            if replay is not None:
                return replay
            if res["extensions"] >= res["max_extensions"]:
                raise ProtocolError(
                    ErrorCode.MAX_EXTENSIONS_EXCEEDED,
                    f"Reservation {cmd.reservation_id} reached its maximum of {res['max_extensions']} extensions",
                )
            expires = res["expires_at_ms"] + (cmd.extend_by_ms or 0)
            max_ttl = (_tenant_of(conn, res["tenant_id"], cmd) or {}).get("max_reservation_ttl_ms")
            if max_ttl:
                expires = max(res["expires_at_ms"], min(expires, now + max_ttl))
            conn.execute(
                "UPDATE reservations SET expires_at_ms=?, deadline_ms=?, extensions=extensions+1 WHERE reservation_id=?",
                (expires, expires + res["grace_ms"], cmd.reservation_id),
            )
            result = {"expires_at_ms": expires, "reservation_id": cmd.reservation_id}
            return _settled(conn, res, cmd, "extend", result, now)

        return self._awrite(tx, rerun=True)

    def create_event(self, cmd: EventCommand) -> Coroutine[Any, Any, Outcome]:
        def tx(conn: sqlite3.Connection, now: int) -> Outcome:
            if cmd.gen is not None:
                _check_gen(conn, cmd.tenant, cmd.gen)
            replay = _replay(conn, cmd.tenant, "event", cmd.idempotency_key, cmd.payload_hash)
            if replay is not None:
                return Outcome(_decode(replay[0]), replay=True, now_ms=now)
            tenant = _tenant_of(conn, cmd.tenant, cmd)
            if tenant and tenant.get("status") == "CLOSED":
                raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {cmd.tenant} is closed")
            overage: dict[str, str | None] = {}
            ledgers = _scope_ledgers(conn, cmd.tenant, cmd.scopes, cmd.unit, overage)
            if not ledgers:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"Budget not found for provided scope: {cmd.scope_path}",
                                    details={"scope": cmd.scope_path, "unit": cmd.unit})
            policy = (cmd.overage_policy or _budget_policy(ledgers, overage)
                      or (tenant or {}).get("default_commit_overage_policy") or L.ALLOW_IF_AVAILABLE)
            settled = L.settle(ledgers, 0, cmd.amount, policy, reject_any_overage=False)
            _write_ledgers(conn, cmd.tenant, settled.ledgers, now, before=ledgers, overage_policy=policy)
            event_id = new_id("evt")
            conn.execute(
                "INSERT INTO events (event_id, tenant_id, scope_path, subject, action, unit, actual, charged, "
                "overage_policy, metadata, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (event_id, cmd.tenant, cmd.scope_path, _dumps(cmd.subject), _dumps(cmd.action), cmd.unit,
                 cmd.amount, settled.charged, policy,
                 _dumps({"metadata": cmd.metadata, "metrics": cmd.metrics, "client_time_ms": cmd.client_time_ms}),
                 now),
            )
            result = {"event_id": event_id, "unit": cmd.unit, "actual": cmd.amount, "charged": settled.charged,
                      "balances": [balance_record(l) for l in settled.ledgers]}
            _remember(conn, cmd.tenant, "event", cmd.idempotency_key, cmd.payload_hash, result, None, now)
            return Outcome(result, now_ms=now)

        return self._awrite(tx, rerun=True)

    # ---- maintenance ----

    async def expire_due(self, limit: int = 500) -> int:
        return await self._awrite(lambda conn, now: _expire_due(conn, now, limit))

    async def purge_idempotency(self, older_than_ms: int) -> int:
        def tx(conn: sqlite3.Connection, now: int) -> int:
            Q.purge(conn, now)  # action quota counters whose window ended (Redis lets their keys expire)
            return conn.execute("DELETE FROM idempotency WHERE created_at_ms < ?", (older_than_ms,)).rowcount

        return await self._awrite(tx)


def _rate_check(conn: sqlite3.Connection, limits: Sequence[Sequence[Any]], now: int) -> None:
    """Refuse with 429 when one more event would exceed any bucket's per-minute limit."""
    window = now // P.WINDOW_MS
    for bucket, limit, policy_id, scope in limits:
        counts = dict(conn.execute("SELECT window, count FROM rate_counters WHERE bucket=? AND window IN (?, ?)",
                                   (bucket, window - 1, window)).fetchall())
        prev, cur = counts.get(window - 1, 0), counts.get(window, 0)
        scaled, _ = P.window_count(prev, cur, now)
        if scaled + P.WINDOW_MS > limit * P.WINDOW_MS:
            raise P.rate_error(bucket, limit, policy_id, scope, P.retry_after_ms(prev, cur, limit, now))


def _rate_count(conn: sqlite3.Connection, limits: Sequence[Sequence[Any]], now: int) -> None:
    window = now // P.WINDOW_MS
    for bucket, *_ in limits:
        conn.execute("INSERT INTO rate_counters (bucket, window, count) VALUES (?, ?, 1) "
                     "ON CONFLICT (bucket, window) DO UPDATE SET count = count + 1", (bucket, window))
        conn.execute("DELETE FROM rate_counters WHERE bucket=? AND window < ?", (bucket, window - 1))


def _mismatch(key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.IDEMPOTENCY_MISMATCH,
                         f"Idempotency key {key!r} was already used with a different request payload")


def _replay(conn: sqlite3.Connection, tenant: str, endpoint: str, key: str, payload_hash: str) -> tuple[str, str | None] | None:
    row = conn.execute(
        "SELECT payload_hash, result, reservation_id FROM idempotency WHERE tenant_id=? AND endpoint=? AND key=?",
        (tenant, endpoint, key),
    ).fetchone()
    if row is None:
        return None
    if row[0] != payload_hash:
        raise _mismatch(key)
    return row[1], row[2]


# commit / release / extend with a tenant key: the generation (tag 0) and a stored answer under the key (tag 1)
_SETTLE_PRELUDE = (
    "SELECT 0, gen, NULL, NULL FROM gens WHERE tenant_id=?1 "
    "UNION ALL SELECT 1, payload_hash, result, reservation_id FROM idempotency "
    "WHERE tenant_id=?1 AND endpoint=?2 AND key=?3")


def _settled(conn: sqlite3.Connection, res: dict[str, Any], cmd: SettleCommand, endpoint: str,
             result: dict[str, Any], now: int) -> Outcome:
    """Record a commit / release / extend under its idempotency key and answer it."""
    _remember(conn, res["tenant_id"], endpoint, cmd.idempotency_key, cmd.payload_hash, result, cmd.reservation_id, now)
    return Outcome(result, now_ms=now)


def _deny(conn: sqlite3.Connection, cmd: ReserveCommand, base: dict[str, Any], now: int, reason: str,
          ledgers: Sequence[L.Ledger] = (), detail: dict[str, Any] | None = None) -> Outcome:
    """A denial answered (and remembered under the idempotency key) as a DENY decision."""
    result = {**base, "decision": "DENY", "reason_code": reason, "balances": [balance_record(l) for l in ledgers]}
    if detail is not None:
        result["deny_detail"] = detail
    _remember(conn, cmd.tenant, cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, result, None, now)
    return Outcome(result, now_ms=now)


# A live reserve's three reads before it acts, in one statement: the tenant's governance generation (tag 0),
# a stored answer under the key in the idempotency table (a denial, tag 1) and the newest reservation made
# under the key (tag 2). Each execute costs a statement step and its Python glue; these three are always run.
_RESERVE_PRELUDE = (
    "SELECT 0, gen, NULL, NULL, NULL FROM gens WHERE tenant_id=?1 "
    "UNION ALL SELECT 1, payload_hash, result, reservation_id, NULL FROM idempotency "
    "WHERE tenant_id=?1 AND endpoint='reserve' AND key=?2 "
    "UNION ALL SELECT * FROM (SELECT 2, payload_hash, result, status, expires_at_ms FROM reservations "
    "INDEXED BY reservations_tenant_key_time WHERE tenant_id=?1 AND idempotency_key=?2 AND result IS NOT NULL "
    "ORDER BY created_at_ms DESC LIMIT 1)")


def _reserve_prelude(conn: sqlite3.Connection, cmd: ReserveCommand, now: int) -> Outcome | None:
    """The generation check, then the replay of a stored answer, then of a live reserve, in that order (as
    _check_gen and _replay would, then the newest reservation under the key); None when the reserve is new."""
    found = {row[0]: row for row in conn.execute(_RESERVE_PRELUDE, (cmd.tenant, cmd.idempotency_key)).fetchall()}
    if cmd.gen is not None:
        gen = found.get(0)
        if (gen[1] if gen is not None else 0) != cmd.gen:
            raise StaleGovernance()
    row = found.get(1) or found.get(2)
    if row is None:
        return None
    if row[1] != cmd.payload_hash:
        raise _mismatch(cmd.idempotency_key)
    if row[0] == 1:
        return _replayed(conn, (row[2], row[3]), now)
    return Outcome(_decode(row[2]), replay=True, now_ms=now, reservation_active=row[3] == "ACTIVE" and now <= row[4])


def _replayed(conn: sqlite3.Connection, replay: tuple[str, str | None], now: int) -> Outcome:
    result_json, rid = replay
    active = False
    if rid:
        row = conn.execute("SELECT status, expires_at_ms FROM reservations WHERE reservation_id=?", (rid,)).fetchone()
        active = bool(row) and row[0] == "ACTIVE" and now <= row[1]
    return Outcome(_decode(result_json), replay=True, now_ms=now, reservation_active=active)


def _remember(conn: sqlite3.Connection, tenant: str, endpoint: str, key: str, payload_hash: str,
              result: dict[str, Any], reservation_id: str | None, now: int) -> None:
    conn.execute(
        "INSERT INTO idempotency (tenant_id, endpoint, key, payload_hash, result, reservation_id, created_at_ms) "
        "VALUES (?,?,?,?,?,?,?)",
        (tenant, endpoint, key, payload_hash, _dumps(result), reservation_id, now),
    )


def _gen(conn: sqlite3.Connection, tenant: str) -> int:
    row = conn.execute("SELECT gen FROM gens WHERE tenant_id=?", (tenant,)).fetchone()
    return row[0] if row else 0


def _tenant_of(conn: sqlite3.Connection, tenant: str, cmd: ReserveCommand | SettleCommand | EventCommand,
               ) -> dict[str, Any] | None:
    """The tenant's record: the caller's copy when this transaction checked the generation it was read at
    (so it is current), else read here."""
    if cmd.gen is not None and cmd.tenant_record is not None and cmd.tenant == tenant:
        return cmd.tenant_record
    return _tenant_state(conn, tenant)


def _check_gen(conn: sqlite3.Connection, tenant: str, gen: int) -> None:
    if _gen(conn, tenant) != gen:
        raise StaleGovernance()


# One primary-key lookup per scope, joined with UNION ALL: `scope IN (...)` over two or more values builds an
# ephemeral table on every run (about a third of the statement's cost).
_LEDGER_SQL = f"SELECT {_LEDGER_COLS} FROM budgets WHERE tenant_id=? AND scope=?"
_LEDGERS_SQL: dict[int, str] = {}


def _scope_ledgers(conn: sqlite3.Connection, tenant: str, scopes: list[str], unit: str,
                   overage: dict[str, str | None] | None = None) -> list[L.Ledger]:
    """Ledgers of `scopes` in `unit`, in canonical order; raises UNIT_MISMATCH when only other units exist.
    `overage`, when given, receives each ledger's own commit_overage_policy (by scope)."""
    sql = _LEDGERS_SQL.get(len(scopes))
    if sql is None:
        sql = _LEDGERS_SQL[len(scopes)] = " UNION ALL ".join([_LEDGER_SQL] * len(scopes))
    params: list[str] = []
    for scope in scopes:
        params += (tenant, scope)
    rows = conn.execute(sql, params).fetchall()
    same = {r[0]: r for r in rows if r[1] == unit}
    if not same and rows:
        by_scope: dict[str, list[str]] = {}
        for r in rows:
            by_scope.setdefault(r[0], []).append(r[1])
        scope = next(s for s in scopes if s in by_scope)
        raise ProtocolError(
            ErrorCode.UNIT_MISMATCH,
            f"No budget in unit {unit} at the derived scopes; scope {scope} has budgets in {', '.join(sorted(by_scope[scope]))}",
            details={"scope": scope, "requested_unit": unit, "expected_units": sorted(by_scope[scope])},
        )
    if overage is not None:
        for r in same.values():
            overage[r[0]] = r[9]
    return [_ledger(same[s]) for s in scopes if s in same]


def _budget_policy(ledgers: Sequence[L.Ledger], overage: dict[str, str | None]) -> str | None:
    """The commit overage policy set on the deepest budgeted scope, if any."""
    for led in reversed(ledgers):
        if overage.get(led.scope):
            return overage[led.scope]
    return None


def _write_ledgers(conn: sqlite3.Connection, tenant: str, ledgers: Sequence[L.Ledger], now: int,
                   before: Sequence[L.Ledger] | None = None, reservation_id: str | None = None,
                   overage_policy: str | None = None) -> None:
    for old, new in zip(before or (), ledgers):
        for event_type, scope, data in E.transitions(old, new, reservation_id=reservation_id,
                                                     overage_policy=overage_policy):
            _emit(event_type, tenant, scope, data)
    if before is None or len(before) != len(ledgers):
        conn.executemany(
            _UPDATE_LEDGER_SQL[_LEDGER_FIELDS],
            [(l.allocated, l.spent, l.reserved, l.debt, int(l.is_over_limit), now, tenant, l.scope, l.unit)
             for l in ledgers])
        return
    for old, new in zip(before, ledgers):
        # Only the columns that changed: a column in the SET list makes SQLite maintain every index on it
        # (the debt and over-limit partial indexes) and fire the overview counters' trigger, even when the
        # value is the same. A reserve changes `reserved` alone, a commit `spent` and `reserved`.
        mask = (old.allocated != new.allocated, old.spent != new.spent, old.reserved != new.reserved,
                old.debt != new.debt, old.is_over_limit != new.is_over_limit)
        update = _UPDATE_BY_MASK.get(mask)
        if update is None:
            update = _UPDATE_BY_MASK[mask] = _update_for(mask)
        sql, values = update
        conn.execute(sql, (*values(new), now, tenant, new.scope, new.unit))


_LEDGER_FIELDS = ("allocated", "spent", "reserved", "debt", "is_over_limit")


def _update_ledger_sql(fields: tuple[str, ...]) -> str:
    sets = "".join(f"{f}=?, " for f in fields)
    return f"UPDATE budgets SET {sets}updated_at_ms=? WHERE tenant_id=? AND scope=? AND unit=?"


_UPDATE_LEDGER_SQL: dict[tuple[str, ...], str] = {_LEDGER_FIELDS: _update_ledger_sql(_LEDGER_FIELDS)}


def _update_for(mask: tuple[bool, ...]) -> tuple[str, Callable[[L.Ledger], tuple[int, ...]]]:
    """The UPDATE of the fields `mask` marks as changed, and a function reading their new values (as ints)."""
    fields = tuple(f for f, changed in zip(_LEDGER_FIELDS, mask) if changed)
    sql = _UPDATE_LEDGER_SQL.get(fields) or _update_ledger_sql(fields)
    if not fields:
        return sql, lambda led: ()
    get = operator.attrgetter(*fields)
    if len(fields) == 1:
        return sql, lambda led: (int(get(led)),)
    return sql, lambda led: tuple(map(int, get(led)))


_UPDATE_BY_MASK: dict[tuple[bool, ...], tuple[str, Callable[[L.Ledger], tuple[int, ...]]]] = {}


def _open_reservation(conn: sqlite3.Connection, now: int, cmd: SettleCommand, endpoint: str,
                      *, allow_grace: bool) -> tuple[dict[str, Any], Outcome | None]:
    """Load a reservation for a mutation, applying replay, ownership, tenant and state rules in spec order."""
    stored = None
    if cmd.tenant is not None:  # a tenant key: its generation and its stored answer under the key, one statement
        found = {r[0]: r for r in conn.execute(_SETTLE_PRELUDE, (cmd.tenant, endpoint, cmd.idempotency_key))}
        if cmd.gen is not None:
            gen = found.get(0)
            if (gen[1] if gen is not None else 0) != cmd.gen:
                raise StaleGovernance()
        stored = found.get(1)
    row = conn.execute(_OPEN_RESERVATION,
                       (cmd.reservation_id,)).fetchone()
    res = _reservation(row) if row else None
    if res is not None:
        res["commit_limits"] = _decode(row[-2]) if row[-2] else []
        res["quota_runs"] = row[-1]
    # Ownership before replay: another tenant must never see this tenant's stored responses.
    if res is not None and cmd.tenant is not None and res["tenant_id"] != cmd.tenant:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"Reservation {cmd.reservation_id} belongs to another tenant")
    if cmd.tenant is not None:  # read above under the same tenant (any other owner was refused just now)
        if stored is not None and stored[1] != cmd.payload_hash:
            raise _mismatch(cmd.idempotency_key)
        replay = (stored[2], stored[3]) if stored is not None else None
    else:
        replay = _replay(conn, res["tenant_id"], endpoint, cmd.idempotency_key, cmd.payload_hash) if res else None
    if replay is not None:
        return res or {}, _replayed(conn, replay, now)
    if res is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Reservation {cmd.reservation_id} not found")
    tenant = _tenant_of(conn, res["tenant_id"], cmd)
    if tenant and tenant.get("status") == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {res['tenant_id']} is closed")
    if res["status"] in ("COMMITTED", "RELEASED"):
        raise ProtocolError(ErrorCode.RESERVATION_FINALIZED,
                            f"Reservation {cmd.reservation_id} is already {res['status']}",
                            details={"status": res["status"]})
    limit = res["deadline_ms"] if allow_grace else res["expires_at_ms"]
    if res["status"] == "EXPIRED" or now > limit:
        raise ProtocolError(ErrorCode.RESERVATION_EXPIRED, f"Reservation {cmd.reservation_id} has expired",
                            details={"expires_at_ms": res["expires_at_ms"]})
    return res, None


def _expire_due(conn: sqlite3.Connection, now: int, limit: int, tenant: str | None = None) -> int:
    sql = f"SELECT {_RES_COLS}, quota_runs FROM reservations WHERE status='ACTIVE' AND deadline_ms < ?"
    params: list[Any] = [now]
    if tenant is not None:
        sql += " AND tenant_id=?"
        params.append(tenant)
    rows = conn.execute(sql + " LIMIT ?", (*params, limit)).fetchall()
    for row in rows:
        res = _reservation(row)
        ledgers = _scope_ledgers(conn, res["tenant_id"], _decode(res["budgeted_scopes"]), res["unit"])
        _write_ledgers(conn, res["tenant_id"], L.unhold(ledgers, res["amount"]), now, before=ledgers)
        Q.uncount(conn, res["tenant_id"], row[-1])
        conn.execute("UPDATE reservations SET status='EXPIRED' WHERE reservation_id=?", (res["reservation_id"],))
        _emit("reservation.expired", res["tenant_id"], res["scope_path"], {
            "reservation_id": res["reservation_id"], "scope": res["scope_path"], "unit": res["unit"],
            "estimated_amount": res["amount"], "created_at_ms": res["created_at_ms"], "expired_at_ms": now,
            "ttl_ms": res["expires_at_ms"] - res["created_at_ms"], "extensions_used": res["extensions"]}, system=True)
    return len(rows)
