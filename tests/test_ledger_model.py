"""Model-based test of the store's ledger: a Hypothesis state machine drives the store directly.

One tenant, a small scope tree, budgets in two units. Rules reserve (live, dry run, /decide), commit,
release, extend, post events, fund, advance the store's clock and sweep expired leases, and replay
earlier requests (same key + payload: the same result, rendered to the same bytes except
remaining_ttl_ms; same key + other payload: IDEMPOTENCY_MISMATCH).

A small independent reference model (per scope: allocated, spent, reserved, debt, is_over_limit; per
reservation: state) predicts every outcome (success or which error code) and, after every step, the
store's ledgers and reservation states must equal the model's and satisfy the ledger invariants.

The model follows cycles-protocol-v0 (CommitOveragePolicy, DEBT SEMANTICS, OVERDRAFT LIMIT) as the
server implements it: spent is consumption paid from the allocation and debt the consumption beyond
it (a shortfall goes to debt under ALLOW_WITH_OVERDRAFT when debt + shortfall <= overdraft_limit);
REJECT refuses any commit above the reservation; ALLOW_IF_AVAILABLE caps the overage at the minimum
remaining across scopes and marks the scopes it could not cover as over limit.

Another store kind is plugged in by adding a factory to STORE_FACTORIES (keyed like conftest.STORES).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import STORES
from cycles.core import scopes as S
from cycles.protocol import admin as a
from cycles.protocol import models as m
from cycles.protocol.errors import ProtocolError
from cycles.server import render
from cycles.server.runtime import _hash
from cycles.store.base import EventCommand, FundCommand, ReservationQuery, ReserveCommand, SettleCommand, Store

INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# stores under test


def _sqlite(directory: str, clock: Callable[[], int]) -> Store:
    from cycles.store.sqlite import SQLiteStore

    return SQLiteStore(os.path.join(directory, "ledger.db"), synchronous="OFF", clock=clock)


_REDIS: dict[str, Any] = {}


def _redis(directory: str, clock: Callable[[], int]) -> Store:
    """A RedisStore on database 15 of a private redis-server, flushed for every machine.

    Redis takes time from TIME inside its scripts; the store's test clock replaces it with the model's.
    """
    import atexit
    from pathlib import Path

    import redis as redis_py

    from cycles.store.redis import RedisStore
    from redis_support import RedisServer

    if "server" not in _REDIS:
        rs = RedisServer(Path(tempfile.mkdtemp(prefix="cycles-model-redis-"))).start()
        atexit.register(rs.stop)
        _REDIS["server"] = rs
    url = f"redis://127.0.0.1:{_REDIS['server'].port}/15"
    redis_py.Redis.from_url(url).flushdb()
    return RedisStore(url, clock=clock)


def _redis_cluster(directory: str, clock: Callable[[], int]) -> Store:
    """A RedisClusterStore on a private Redis Cluster (3 primaries + 3 replicas), flushed for every machine."""
    import atexit
    from pathlib import Path

    from cycles.store.redis_cluster import RedisClusterStore
    from redis_support import RedisClusterNodes, flush_cluster

    if "cluster" not in _REDIS:
        rc = RedisClusterNodes(Path(tempfile.mkdtemp(prefix="cycles-model-cluster-"))).start()
        atexit.register(rc.stop)
        _REDIS["cluster"] = rc
    flush_cluster(_REDIS["cluster"].url)
    return RedisClusterStore(_REDIS["cluster"].url, clock=clock)


STORE_FACTORIES: dict[str, Callable[[str, Callable[[], int]], Store]] = {
    "sqlite": _sqlite, "redis": _redis, "redis-cluster": _redis_cluster}


def open_store(kind: str, directory: str, clock: Callable[[], int]) -> Store:
    if kind not in STORE_FACTORIES:
        raise NotImplementedError(f"store kind {kind!r} is in conftest.STORES but has no factory in {__file__}")
    return STORE_FACTORIES[kind](directory, clock)


# ---------------------------------------------------------------------------------------------
# the world: one tenant, a scope tree, two units

T = "t1"
USD, TOK = "USD_MICROCENTS", "TOKENS"
UNITS = [USD, TOK]
SCOPES = ["tenant:t1", "tenant:t1/workspace:w1", "tenant:t1/workspace:w1/app:a1", "tenant:t1/workspace:w2",
          "tenant:t1/app:a1"]
SUBJECTS = [
    {"tenant": T},
    {"tenant": T, "workspace": "w1"},
    {"tenant": T, "workspace": "w1", "app": "a1"},
    {"tenant": T, "workspace": "W1", "app": "a1", "agent": "g1"},  # upper case folds; agent has no budget
    {"tenant": T, "workspace": "w2"},
    {"tenant": T, "app": "a1"},  # gap: tenant:t1/app:a1
    {"workspace": "w2"},  # no tenant level: scopes without budgets
]
POLICIES = ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
DEFAULT_TTL, MAX_TTL, DEFAULT_GRACE, MAX_EXTENSIONS = 60_000, 120_000, 5_000, 2
ACTION = m.Action(kind="llm.completion", name="model-x")
START_MS = 1_767_225_600_000

amounts = st.integers(0, 1_500) | st.integers(0, 300) | st.sampled_from([0, 1, 10**9, INT64_MAX])
allocations = st.sampled_from([0, 50, 500, 1_000, 1_000, 5_000, 5_000, 10**6])
overdrafts = st.sampled_from([0, 0, 100, 1_000])
maybe_policy = st.sampled_from([None, None, *POLICIES])
units = st.sampled_from([USD] * 5 + [TOK])
picks = st.integers(0, 10_000)
targets = st.sampled_from(["active"] * 6 + ["any", "done", "unknown"])


class Rejected(Exception):
    def __init__(self, code: str, *, keep: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.keep = keep  # the store keeps part of the work (expiries done before a denial)


# ---------------------------------------------------------------------------------------------
# the reference model


@dataclass
class MBudget:
    allocated: int
    overdraft_limit: int
    policy: str | None
    spent: int = 0
    reserved: int = 0
    debt: int = 0
    over: bool = False
    reset_below_usage: bool = False  # a RESET left allocated below spent + reserved (documented, operator-made)

    @property
    def remaining(self) -> int:
        return self.allocated - self.spent - self.reserved - self.debt

    def record(self, scope: str, unit: str) -> list[Any]:
        return [scope, unit, self.allocated, self.spent, self.reserved, self.debt, self.overdraft_limit, self.over]


@dataclass
class MRes:
    unit: str
    amount: int
    budgeted: list[str]
    policy: str
    expires: int
    grace: int
    status: str = "ACTIVE"
    extensions: int = 0
    committed: int | None = None
    finalized_at: int | None = None

    @property
    def deadline(self) -> int:
        return self.expires + self.grace


@dataclass
class Idem:
    payload_hash: str
    result: dict[str, Any]
    body: bytes  # the first response, rendered, with remaining_ttl_ms zeroed
    rid: str | None = None


PENDING = "<pending>"


@dataclass
class Model:
    default_policy: str
    budgets: dict[tuple[str, str], MBudget] = field(default_factory=dict)
    res: dict[str, MRes] = field(default_factory=dict)
    idem: dict[tuple[str, str], Idem] = field(default_factory=dict)

    # -- helpers

    def ledgers(self, scopes: list[str], unit: str) -> list[str]:
        same = [s for s in scopes if (s, unit) in self.budgets]
        if not same and any(s == scope for s in scopes for scope, _ in self.budgets):
            raise Rejected("UNIT_MISMATCH")
        return same

    def denial(self, scopes: list[str], unit: str, amount: int) -> str | None:
        bs = [self.budgets[(s, unit)] for s in scopes]
        if any(b.over for b in bs):
            return "OVERDRAFT_LIMIT_EXCEEDED"
        if any(b.debt > 0 and b.overdraft_limit == 0 for b in bs):
            return "DEBT_OUTSTANDING"
        if any(b.remaining < amount for b in bs):
            return "BUDGET_EXCEEDED"
        return None

    def policy_for(self, requested: str | None, scopes: list[str], unit: str) -> str:
        if requested:
            return requested
        for s in reversed(scopes):
            if self.budgets[(s, unit)].policy:
                return self.budgets[(s, unit)].policy  # type: ignore[return-value]
        return self.default_policy

    def expire(self, now: int) -> int:
        n = 0
        for r in self.res.values():
            if r.status == "ACTIVE" and r.deadline < now:
                r.status = "EXPIRED"
                for s in r.budgeted:
                    self.budgets[(s, r.unit)].reserved -= r.amount
                n += 1
        return n

    def settle(self, scopes: list[str], unit: str, held: int, actual: int, policy: str, *, commit: bool) -> int:
        """Charge `actual` against scopes holding `held` for it; returns the amount charged."""
        charged = self._settle(scopes, unit, held, actual, policy, commit=commit)
        if any(self.budgets[(s, unit)].spent > INT64_MAX for s in scopes):
            raise Rejected("INVALID_REQUEST")  # the store refuses to overflow spent (changes roll back)
        return charged

    def _settle(self, scopes: list[str], unit: str, held: int, actual: int, policy: str, *, commit: bool) -> int:
        bs = [self.budgets[(s, unit)] for s in scopes]
        over = actual - held
        if over > 0 and commit and policy == "REJECT":
            raise Rejected("BUDGET_EXCEEDED")  # REJECT: a commit may not exceed its reservation
        short = [max(0, over - max(0, b.remaining)) for b in bs]
        if over <= 0 or not any(short):
            for b in bs:
                b.reserved -= held
                b.spent += actual
            return actual
        if policy == "REJECT":
            raise Rejected("BUDGET_EXCEEDED")
        if policy == "ALLOW_WITH_OVERDRAFT":
            if any(b.debt + s > b.overdraft_limit for b, s in zip(bs, short)):
                raise Rejected("OVERDRAFT_LIMIT_EXCEEDED")
            for b, s in zip(bs, short):
                b.reserved -= held
                b.spent += actual - s
                b.debt += s
            return actual
        cap = min(over, min(max(0, b.remaining) for b in bs))
        for b, s in zip(bs, short):
            b.reserved -= held
            b.spent += held + cap
            b.over = b.over or s > 0
        return held + cap

    def open_res(self, rid: str, now: int, *, grace: bool) -> MRes:
        r = self.res.get(rid)
        if r is None:
            raise Rejected("NOT_FOUND")
        if r.status in ("COMMITTED", "RELEASED"):
            raise Rejected("RESERVATION_FINALIZED")
        if r.status == "EXPIRED" or now > (r.deadline if grace else r.expires):
            raise Rejected("RESERVATION_EXPIRED")
        return r

    def tidy(self) -> None:
        for b in self.budgets.values():
            if b.allocated - b.spent - b.reserved >= 0:
                b.reset_below_usage = False

    # -- operations: each mutates this (tentative) model and returns what the store should answer

    def reserve(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        _, scopes = S.derive(p["subject"])
        unit, amount = p["unit"], p["amount"]
        evaluate = p["kind"] == "decide" or p["dry_run"]
        led = self.ledgers(scopes, unit)
        if not led:
            if evaluate:
                return {"decision": "DENY", "reason": "BUDGET_NOT_FOUND", "ledgers": []}
            raise Rejected("NOT_FOUND")
        reason = self.denial(led, unit, amount)
        expired = 0
        if reason:
            expired = self.expire(now)
            if expired:
                reason = self.denial(led, unit, amount)
        if reason:
            if evaluate:
                return {"decision": "DENY", "reason": reason, "ledgers": led}
            raise Rejected(reason, keep=bool(expired))
        if evaluate:
            return {"decision": "ALLOW", "ledgers": led}
        ttl = min(p["ttl"] or DEFAULT_TTL, MAX_TTL)
        grace = DEFAULT_GRACE if p["grace"] is None else p["grace"]
        policy = self.policy_for(p["policy"], led, unit)
        for s in led:
            self.budgets[(s, unit)].reserved += amount
        self.res[PENDING] = MRes(unit, amount, led, policy, now + ttl, grace)
        return {"decision": "ALLOW", "ledgers": led, "expires": now + ttl, "policy": policy, "grace": grace}

    def commit(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        r = self.open_res(p["rid"], now, grace=True)
        if p["unit"] != r.unit:
            raise Rejected("UNIT_MISMATCH")
        charged = self.settle(r.budgeted, r.unit, r.amount, p["actual"], r.policy, commit=True)
        r.status, r.committed, r.finalized_at = "COMMITTED", charged, now
        return {"charged": charged, "released": max(0, r.amount - charged), "ledgers": r.budgeted, "unit": r.unit}

    def release(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        r = self.open_res(p["rid"], now, grace=True)
        for s in r.budgeted:
            self.budgets[(s, r.unit)].reserved -= r.amount
        r.status, r.finalized_at = "RELEASED", now
        return {"released": r.amount, "ledgers": r.budgeted, "unit": r.unit}

    def extend(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        r = self.open_res(p["rid"], now, grace=False)
        if r.extensions >= MAX_EXTENSIONS:
            raise Rejected("MAX_EXTENSIONS_EXCEEDED")
        r.expires = max(r.expires, min(r.expires + p["by"], now + MAX_TTL))
        r.extensions += 1
        return {"expires": r.expires}

    def event(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        _, scopes = S.derive(p["subject"])
        led = self.ledgers(scopes, p["unit"])
        if not led:
            raise Rejected("NOT_FOUND")
        policy = self.policy_for(p["policy"], led, p["unit"])
        charged = self.settle(led, p["unit"], 0, p["amount"], policy, commit=False)
        return {"charged": charged, "ledgers": led, "unit": p["unit"]}

    def fund(self, p: dict[str, Any], now: int) -> dict[str, Any]:
        b = self.budgets.get((p["scope"], p["unit"]))
        if b is None:
            raise Rejected("NOT_FOUND")
        before = [b.allocated, b.remaining, b.debt, b.spent]
        op, amount = p["op"], p["amount"]
        if op == "CREDIT":
            b.allocated += amount
        elif op == "DEBIT":
            if b.remaining < amount:
                raise Rejected("BUDGET_EXCEEDED")
            b.allocated -= amount
        elif op == "RESET":
            b.allocated = amount
        elif op == "RESET_SPENT":
            b.allocated, b.spent = amount, p["spent"] or 0
        elif op == "REPAY_DEBT":
            repaid = min(amount, b.debt)
            b.debt -= repaid
            b.spent += repaid
            b.allocated += amount
        if b.allocated > INT64_MAX or b.spent > INT64_MAX or b.remaining < -INT64_MAX - 1:
            raise Rejected("INVALID_REQUEST")
        b.over = b.debt > b.overdraft_limit
        if b.allocated - b.spent - b.reserved < 0:
            b.reset_below_usage = True
        return {"previous": before, "new": [b.allocated, b.remaining, b.debt, b.spent]}


# ---------------------------------------------------------------------------------------------
# requests: built exactly as the HTTP layer builds them (same payload hashing)

ENDPOINT = {"reserve": "reserve", "decide": "decide", "commit": "commit", "release": "release", "extend": "extend",
            "event": "event", "fund": "fund"}


def build(p: dict[str, Any]) -> Any:
    kind = p["kind"]
    if kind in ("reserve", "decide", "event"):
        subject = m.Subject(**p["subject"])
        fields = msgspec.to_builtins(subject)
        path, scopes = S.derive(fields)
        amount = m.Amount(unit=p["unit"], amount=p["amount"])
        if kind == "reserve":
            req = m.ReservationCreateRequest(idempotency_key=p["key"], subject=subject, action=ACTION, estimate=amount,
                                             ttl_ms=p["ttl"], grace_period_ms=p["grace"], overage_policy=p["policy"],
                                             dry_run=p["dry_run"])
        elif kind == "decide":
            req = m.DecisionRequest(idempotency_key=p["key"], subject=subject, action=ACTION, estimate=amount)
        else:
            req = m.EventCreateRequest(idempotency_key=p["key"], subject=subject, action=ACTION, actual=amount,
                                       overage_policy=p["policy"])
            return EventCommand(tenant=T, idempotency_key=p["key"], payload_hash=_hash(m.canonical(req)),
                                subject=fields, action=msgspec.to_builtins(ACTION), unit=p["unit"],
                                amount=p["amount"], scope_path=path, scopes=scopes, overage_policy=p["policy"])
        return ReserveCommand(
            tenant=T, endpoint=kind, idempotency_key=p["key"], payload_hash=_hash(m.canonical(req)), subject=fields,
            action=msgspec.to_builtins(ACTION), unit=p["unit"], amount=p["amount"], scope_path=path, scopes=scopes,
            dry_run=kind == "reserve" and p["dry_run"], ttl_ms=p.get("ttl"), grace_ms=p.get("grace"),
            overage_policy=p.get("policy"))
    if kind in ("commit", "release", "extend"):
        rid = p["rid"]
        if kind == "commit":
            req = m.CommitRequest(idempotency_key=p["key"], actual=m.Amount(unit=p["unit"], amount=p["actual"]))
        elif kind == "release":
            req = m.ReleaseRequest(idempotency_key=p["key"], reason=p["reason"])
        else:
            req = m.ReservationExtendRequest(idempotency_key=p["key"], extend_by_ms=p["by"])
        cmd = SettleCommand(tenant=T, reservation_id=rid, idempotency_key=p["key"],
                            payload_hash=_hash(rid.encode(), m.canonical(req)))
        if kind == "commit":
            cmd.actual, cmd.unit = p["actual"], p["unit"]
        elif kind == "release":
            cmd.reason = p["reason"]
        else:
            cmd.extend_by_ms = p["by"]
        return cmd
    assert kind == "fund"
    req = a.BudgetFundingRequest(
        operation=p["op"], amount=m.Amount(unit=p["unit"], amount=p["amount"]),
        spent=m.Amount(unit=p["unit"], amount=p["spent"]) if p["spent"] is not None else None,
        idempotency_key=p["key"])
    payload = hashlib.sha256(p["scope"].encode() + b"\x00" + p["unit"].encode() + b"\x00" + m.canonical(req)).hexdigest()
    return FundCommand(tenant=T, scope=p["scope"], unit=p["unit"], operation=p["op"], amount=p["amount"],
                       spent=p["spent"], idempotency_key=p["key"], payload_hash=payload)


CALL = {"reserve": "reserve", "decide": "reserve", "commit": "commit", "release": "release", "extend": "extend",
        "event": "create_event", "fund": "fund"}
RENDER: dict[str, Callable[[Any], Any]] = {
    "reserve": render.reservation_create, "decide": render.decision, "commit": render.commit,
    "release": render.release, "extend": render.extend, "event": render.event,
}


def rendered(kind: str, out: Any) -> tuple[bytes, int | None]:
    """The response bytes with remaining_ttl_ms zeroed, and remaining_ttl_ms itself.

    The body is also decoded back with its wire type, so constraint violations (a negative Amount, say)
    that construction alone does not check are caught."""
    if kind == "fund":
        return msgspec.json.encode(out.result), None
    body = RENDER[kind](out)
    raw = m.encode(body)
    msgspec.json.decode(raw, type=type(body))
    ttl = getattr(body, "remaining_ttl_ms", None)
    if ttl is not None:
        body = msgspec.structs.replace(body, remaining_ttl_ms=0)
    return m.encode(body), ttl


# ---------------------------------------------------------------------------------------------
# the state machine


class LedgerMachine(RuleBasedStateMachine):
    STORE_KIND = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.now = START_MS
        self.dir = tempfile.mkdtemp(prefix="cycles-ledger-model-")
        self.loop = asyncio.new_event_loop()
        self.store = open_store(self.STORE_KIND, self.dir, lambda: self.now)
        self.model: Model | None = None
        self.rids: list[str] = []
        self.history: list[dict[str, Any]] = []
        self.keys = 0

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def key(self) -> str:
        self.keys += 1
        return f"key-{self.keys}"

    # -- setup

    @initialize(default_policy=st.sampled_from(POLICIES), allocated=allocations, overdraft=overdrafts,
                policy=maybe_policy, more=st.lists(st.tuples(st.sampled_from(SCOPES[1:]), allocations, overdrafts,
                                                             maybe_policy), max_size=3, unique_by=lambda t: t[0]))
    def setup(self, default_policy: str, allocated: int, overdraft: int, policy: str | None,
              more: list[tuple[str, int, int, str | None]]) -> None:
        record = {"tenant_id": T, "name": T, "status": "ACTIVE", "created_at": "2026-01-01T00:00:00.000Z",
                  "updated_at": "2026-01-01T00:00:00.000Z", "default_commit_overage_policy": default_policy,
                  "default_reservation_ttl_ms": DEFAULT_TTL, "max_reservation_ttl_ms": MAX_TTL,
                  "max_reservation_extensions": MAX_EXTENSIONS, "reservation_expiry_policy": "AUTO_RELEASE"}
        _, created = self.run(self.store.create_tenant(record))
        assert created
        self.model = Model(default_policy)
        self.create_budget(SCOPES[0], USD, allocated, overdraft, policy)
        for scope, alloc, od, pol in more:
            self.create_budget(scope, USD, alloc, od, pol)

    @rule(scope=st.sampled_from(SCOPES), unit=units, allocated=allocations, overdraft=overdrafts, policy=maybe_policy)
    def create_budget(self, scope: str, unit: str, allocated: int, overdraft: int, policy: str | None) -> None:
        assert self.model is not None
        record = {"tenant_id": T, "scope": scope, "unit": unit, "allocated": allocated, "overdraft_limit": overdraft,
                  "commit_overage_policy": policy, "extra": {}}
        try:
            rec = self.run(self.store.create_budget(record))
        except ProtocolError as err:
            assert (scope, unit) in self.model.budgets, f"create_budget failed: {err.code} {err.message}"
            assert err.code.value == "DUPLICATE_RESOURCE"
            return
        assert (scope, unit) not in self.model.budgets, "a duplicate budget was created"
        led = rec["ledger"]
        assert (led.scope, led.unit, led.allocated, led.spent, led.reserved, led.debt, led.overdraft_limit) == (
            scope, unit, allocated, 0, 0, 0, overdraft)
        self.model.budgets[(scope, unit)] = MBudget(allocated, overdraft, policy)

    # -- the engine: run one request on the store and on the model, compare

    def execute(self, p: dict[str, Any]) -> str:
        """Returns 'ok', 'replay', 'mismatch' or the error code both sides agreed on."""
        assert self.model is not None
        kind = p["kind"]
        cmd = build(p)
        key = p.get("key")
        endpoint = ENDPOINT[kind]
        try:
            out, err = self.run(getattr(self.store, CALL[kind])(cmd)), None
        except ProtocolError as exc:
            out, err = None, exc.code.value
        prev = self.model.idem.get((endpoint, key)) if key else None

        if prev is not None and prev.payload_hash != cmd.payload_hash:
            assert err == "IDEMPOTENCY_MISMATCH", f"{p}: reused key with another payload gave {err or 'success'}"
            return "mismatch"
        if prev is not None:
            assert err is None, f"{p}: replay failed with {err}"
            assert out.replay, f"{p}: same key and payload was executed again instead of replayed"
            assert out.result == prev.result, f"{p}: replay returned a different result"
            body, ttl = rendered(kind, out)
            assert body == prev.body, f"{p}: replay rendered differently:\n{body!r}\n{prev.body!r}"
            if ttl is not None:
                assert prev.rid is not None
                expires = int(out.result["expires_at_ms"])
                active = self.model.res[prev.rid].status == "ACTIVE"
                assert ttl == (max(0, expires - self.now) if active else 0), f"{p}: replayed remaining_ttl_ms {ttl}"
            return "replay"

        model = copy.deepcopy(self.model)
        try:
            expected, expected_err = getattr(model, kind if kind != "decide" else "reserve")(p, self.now), None
        except Rejected as rej:
            expected, expected_err = None, rej.code
            if rej.keep:
                self.model = model
        assert err == expected_err, f"{p}: store answered {err or 'success'}, model predicts {expected_err or 'success'}"
        self.history.append(p)
        if err is not None:
            return err
        assert not out.replay
        rid = self.check_fresh(p, expected, out, model)
        model.tidy()
        if key:
            model.idem[(endpoint, key)] = Idem(cmd.payload_hash, out.result, rendered(kind, out)[0], rid)
        self.model = model
        return "ok"

    def check_fresh(self, p: dict[str, Any], exp: dict[str, Any], out: Any, model: Model) -> str | None:
        """Compare a fresh success with the model's prediction; returns the reservation id it concerns."""
        kind, r = p["kind"], out.result
        records = lambda scopes, unit: [model.budgets[(s, unit)].record(s, unit) for s in scopes]  # noqa: E731
        if kind in ("reserve", "decide"):
            assert r["decision"] == exp["decision"], f"{p}: decision {r['decision']} != model {exp['decision']}"
            assert (r.get("reason_code") if r["decision"] == "DENY" else None) == exp.get("reason")
            assert r["balances"] == records(exp["ledgers"], p["unit"]), f"{p}: balances in the result"
            if "expires" not in exp:
                assert "reservation_id" not in r
                return None
            rid = r["reservation_id"]
            assert rid not in model.res and r["expires_at_ms"] == exp["expires"]
            model.res[rid] = model.res.pop(PENDING)
            self.rids.append(rid)
            row = self.run(self.store.get_reservation(rid))
            assert row is not None and row["status"] == "ACTIVE" and row["amount"] == p["amount"]
            assert json.loads(row["budgeted_scopes"]) == exp["ledgers"]
            assert (row["overage_policy"], row["grace_ms"], row["expires_at_ms"]) == (
                exp["policy"], exp["grace"], exp["expires"])
            return rid
        if kind == "commit":
            assert (r["charged"], r["released"]) == (exp["charged"], exp["released"]), f"{p}: {r} vs {exp}"
            assert r["balances"] == records(exp["ledgers"], exp["unit"])
            assert render.commit(out).charged.amount == exp["charged"]
            return p["rid"]
        if kind == "release":
            assert r["released"] == exp["released"]
            assert r["balances"] == records(exp["ledgers"], exp["unit"])
            return p["rid"]
        if kind == "extend":
            assert r["expires_at_ms"] == exp["expires"], f"{p}: {r} vs {exp}"
            return p["rid"]
        if kind == "event":
            assert r["charged"] == exp["charged"] and r["actual"] == p["amount"], f"{p}: {r} vs {exp}"
            assert r["balances"] == records(exp["ledgers"], exp["unit"])
            return None
        assert kind == "fund"
        assert (r["previous"], r["new"]) == (exp["previous"], exp["new"]), f"{p}: {r} vs {exp}"
        return None

    def target(self, pick: int, which: str) -> tuple[str, str]:
        """A reservation id for a settle rule and how it was chosen: mostly an ACTIVE reservation (where
        things happen), sometimes any, an already resolved one, or one that never existed."""
        assert self.model is not None
        pools = {
            "active": [rid for rid in self.rids if self.model.res[rid].status == "ACTIVE"],
            "done": [rid for rid in self.rids if self.model.res[rid].status != "ACTIVE"],
            "any": self.rids,
        }
        pool = pools.get(which) or []
        if which == "unknown" or not self.rids:
            return "rsv_" + "0" * 24, "unknown"
        if not pool:
            pool, which = self.rids, "any"
        return pool[pick % len(pool)], which

    def edge(self, scopes: list[str], unit: str, held: int, mode: str) -> int | None:
        """An amount right at (or one past) a boundary of the current ledgers, read from the model:
        'cover' = all every scope can pay from remaining, 'limit' = the most the overdraft limits allow.
        The model only chooses inputs here; outcomes are still predicted by its rules."""
        assert self.model is not None
        bs = [self.model.budgets[(sc, unit)] for sc in scopes if (sc, unit) in self.model.budgets]
        if not bs:
            return None
        base, _, plus = mode.partition("+")
        if base == "cover":
            room = min(max(0, b.remaining) for b in bs)
        else:
            room = min(max(0, b.remaining) + b.overdraft_limit - b.debt for b in bs)
        return max(0, min(INT64_MAX, held + room + (1 if plus else 0)))

    def check_target(self, which: str, got: str, status_before: str | None) -> None:
        if which == "unknown":
            assert got == "NOT_FOUND", got
        elif which == "done":
            # resolved at most once: a new key cannot commit, release or extend it again
            want = "RESERVATION_EXPIRED" if status_before == "EXPIRED" else "RESERVATION_FINALIZED"
            assert got == want, f"resolved ({status_before}) reservation answered {got}"

    @rule(subject=st.sampled_from(SUBJECTS), unit=units, amount=amounts,
          ttl=st.sampled_from([None, 1_000, 5_000, 60_000, 600_000]), grace=st.sampled_from([None, 0, 1_000]),
          policy=maybe_policy, mode=st.sampled_from(["live"] * 4 + ["dry_run", "decide"]),
          edge=st.sampled_from([None, None, "cover", "cover+1"]))
    def reserve(self, subject: dict[str, str], unit: str, amount: int, ttl: int | None, grace: int | None,
                policy: str | None, mode: str, edge: str | None) -> None:
        at = self.edge(S.derive(subject)[1], unit, 0, edge) if edge else None
        amount = amount if at is None else at
        if mode == "decide":
            self.execute({"kind": "decide", "key": self.key(), "subject": subject, "unit": unit, "amount": amount})
            return
        self.execute({"kind": "reserve", "key": self.key(), "subject": subject, "unit": unit, "amount": amount,
                      "ttl": ttl, "grace": grace, "policy": policy, "dry_run": mode == "dry_run"})

    @rule(subject=st.sampled_from(SUBJECTS[:-1]), amount=amounts, policy=maybe_policy,
          then=st.sampled_from(["commit", "commit", "release", "extend"]),
          mode=st.sampled_from(["below", "equal", "above", "above", "zero", "huge"]),
          offset=st.one_of(st.integers(1, 100), st.integers(1, 5_000)), wait=st.sampled_from([0, 0, 1_000, 6_000]),
          replay=st.booleans())
    def reserve_then_settle(self, subject: dict[str, str], amount: int, policy: str | None, then: str, mode: str,
                            offset: int, wait: int, replay: bool) -> None:
        """The usual client flow: reserve, maybe wait, then commit / release / extend that reservation;
        optionally the client then retries its reserve request (a replay of a settled reservation)."""
        assert self.model is not None
        n = len(self.rids)
        reserve = {"kind": "reserve", "key": self.key(), "subject": subject, "unit": USD, "amount": amount,
                   "ttl": 5_000, "grace": 1_000, "policy": policy, "dry_run": False}
        self.execute(reserve)
        if len(self.rids) == n:
            return
        rid = self.rids[-1]
        self.now += wait
        if then == "commit":
            actual = {"below": max(0, amount - offset), "equal": amount, "above": amount + offset, "zero": 0,
                      "huge": amount + 10**12}[mode]
            self.execute({"kind": "commit", "key": self.key(), "rid": rid, "unit": USD,
                          "actual": min(INT64_MAX, actual)})
        elif then == "release":
            self.execute({"kind": "release", "key": self.key(), "rid": rid, "reason": None})
        else:
            self.execute({"kind": "extend", "key": self.key(), "rid": rid,
                          "by": offset if mode != "huge" else 86_400_000})
        if replay:
            assert self.execute(reserve) == "replay"

    @rule(pick=picks, mode=st.sampled_from(["below", "equal", "above", "above", "zero", "huge", "cover", "cover+1",
                                            "limit", "limit+1"]),
          offset=st.one_of(st.integers(1, 100), st.integers(1, 5_000)),
          wrong_unit=st.sampled_from([False] * 7 + [True]), which=targets)
    def commit(self, pick: int, mode: str, offset: int, wrong_unit: bool, which: str) -> None:
        assert self.model is not None
        rid, which = self.target(pick, which)
        res = self.model.res.get(rid)
        amount, unit = (res.amount, res.unit) if res else (10, USD)
        if res and mode in ("cover", "cover+1", "limit", "limit+1"):
            actual = self.edge(res.budgeted, res.unit, res.amount, mode) or 0  # budgets never disappear
        else:
            actual = {"below": max(0, amount - offset), "equal": amount, "above": amount + offset,
                      "zero": 0, "huge": amount + 10**12}.get(mode, amount)
        actual = min(INT64_MAX, actual)  # the wire refuses more; the HTTP layer never passes it on
        if wrong_unit:
            unit = TOK if unit == USD else USD
        got = self.execute({"kind": "commit", "key": self.key(), "rid": rid, "unit": unit, "actual": actual})
        self.check_target(which, got, res.status if res else None)

    @rule(pick=picks, reason=st.sampled_from([None, "done"]), which=targets)
    def release(self, pick: int, reason: str | None, which: str) -> None:
        assert self.model is not None
        rid, which = self.target(pick, which)
        res = self.model.res.get(rid)
        got = self.execute({"kind": "release", "key": self.key(), "rid": rid, "reason": reason})
        self.check_target(which, got, res.status if res else None)

    @rule(pick=picks, by=st.sampled_from([1, 1_000, 60_000, 86_400_000]), which=targets)
    def extend(self, pick: int, by: int, which: str) -> None:
        assert self.model is not None
        rid, which = self.target(pick, which)
        res = self.model.res.get(rid)
        got = self.execute({"kind": "extend", "key": self.key(), "rid": rid, "by": by})
        self.check_target(which, got, res.status if res else None)

    @rule(subject=st.sampled_from(SUBJECTS), unit=units, amount=amounts, policy=maybe_policy,
          edge=st.sampled_from([None, None, "cover", "cover+1", "limit", "limit+1"]))
    def event(self, subject: dict[str, str], unit: str, amount: int, policy: str | None, edge: str | None) -> None:
        at = self.edge(S.derive(subject)[1], unit, 0, edge) if edge else None
        amount = amount if at is None else at
        self.execute({"kind": "event", "key": self.key(), "subject": subject, "unit": unit, "amount": amount,
                      "policy": policy})

    @rule(pick=picks, scope=st.sampled_from(SCOPES), unit=units, existing=st.sampled_from([True, True, True, False]),
          op=st.sampled_from(["CREDIT", "DEBIT", "RESET", "RESET_SPENT", "REPAY_DEBT"]),
          amount=st.one_of(st.integers(0, 3_000), st.sampled_from([10**9, INT64_MAX])),
          spent=st.sampled_from([None, 0, 100]), keyed=st.booleans(), edge=st.sampled_from([None, -1, 0, 1]))
    def fund(self, pick: int, scope: str, unit: str, existing: bool, op: str, amount: int, spent: int | None,
             keyed: bool, edge: int | None) -> None:
        assert self.model is not None
        if existing:  # mostly a budget that exists (one in debt to repay), sometimes any (scope, unit)
            pool = sorted(self.model.budgets)
            if op == "REPAY_DEBT":
                pool = [k for k in pool if self.model.budgets[k].debt] or pool
            scope, unit = pool[pick % len(pool)]
        b = self.model.budgets.get((scope, unit))
        if b is not None and edge is not None:  # amounts at the operation's boundary, and one either side
            at = {"CREDIT": INT64_MAX - b.allocated, "DEBIT": b.remaining, "REPAY_DEBT": b.debt,
                  "RESET": b.spent + b.reserved + b.debt, "RESET_SPENT": b.reserved + b.debt + (spent or 0)}[op]
            amount = max(0, min(INT64_MAX, at + edge))
        self.execute({"kind": "fund", "key": self.key() if keyed else None, "scope": scope, "unit": unit, "op": op,
                      "amount": amount, "spent": spent if op == "RESET_SPENT" else None})

    @rule(ms=st.sampled_from([1, 500, 1_000, 1_001, 5_000, 6_001, 60_000, 65_001, 130_000]))
    def advance_clock(self, ms: int) -> None:
        self.now += ms

    @rule()
    def sweep(self) -> None:
        assert self.model is not None
        expired = self.run(self.store.expire_due())
        assert expired == self.model.expire(self.now), "expire_due expired a different number of leases"
        self.model.tidy()

    @precondition(lambda self: self.history)
    @rule(pick=picks, succeeded=st.sampled_from([True, True, True, False]))
    def replay(self, pick: int, succeeded: bool) -> None:
        """Send an earlier request again, unchanged: a replay if it succeeded, else evaluated afresh."""
        assert self.model is not None
        pool = [p for p in self.history if p.get("key") and (ENDPOINT[p["kind"]], p["key"]) in self.model.idem]
        if not succeeded or not pool:
            pool = self.history
        p = pool[pick % len(pool)]
        recorded = bool(p.get("key")) and (ENDPOINT[p["kind"]], p["key"]) in self.model.idem
        got = self.execute(p)
        if recorded:
            assert got == "replay", got

    @precondition(lambda self: self.model is not None and self.model.idem)
    @rule(pick=picks)
    def reuse_key_with_other_payload(self, pick: int) -> None:
        assert self.model is not None
        keyed = [p for p in self.history if p.get("key") and (ENDPOINT[p["kind"]], p["key"]) in self.model.idem]
        p = dict(keyed[pick % len(keyed)])
        if p["kind"] == "release":
            p["reason"] = "other" if p["reason"] != "other" else None
        elif p["kind"] == "commit":
            p["actual"] += 1
        elif p["kind"] == "extend":
            p["by"] = p["by"] + 1 if p["by"] < 86_400_000 else 1
        else:
            p["amount"] = p["amount"] + 1 if p["amount"] < INT64_MAX else 0
        assert self.execute(p) == "mismatch"

    # -- invariants, checked against the store after every step

    @invariant()
    def ledgers_match_model(self) -> None:
        if self.model is None:
            return
        page = self.run(self.store.balances(T, {"tenant": T}, True, 1_000, None))
        assert not page.has_more
        store = {(i["ledger"].scope, i["ledger"].unit): i["ledger"] for i in page.items}
        listed = self.run(self.store.list_budgets(T, {}, 1_000, None))
        assert {(i["ledger"].scope, i["ledger"].unit): i["ledger"] for i in listed.items} == store
        assert set(store) == set(self.model.budgets), "budgets differ"
        for (scope, unit), led in store.items():
            b = self.model.budgets[(scope, unit)]
            got = [led.allocated, led.spent, led.reserved, led.debt, led.overdraft_limit, led.is_over_limit]
            want = [b.allocated, b.spent, b.reserved, b.debt, b.overdraft_limit, b.over]
            assert got == want, f"{scope} {unit}: store [alloc, spent, reserved, debt, od, over]={got} model={want}"
            wire = render.ledger_balance(led)
            assert wire.remaining.amount == led.allocated - led.spent - led.reserved - led.debt == b.remaining
            assert min(led.allocated, led.spent, led.reserved, led.debt) >= 0, f"{scope} {unit}: negative counter"
            assert led.debt <= led.overdraft_limit, f"{scope} {unit}: debt beyond the overdraft limit"
            if not b.reset_below_usage:
                # without an operator RESET, only debt (bounded by overdraft_limit) may push remaining below 0
                assert wire.remaining.amount >= -led.debt, f"{scope} {unit}: remaining {wire.remaining.amount}"
            if led.overdraft_limit == 0 and not b.reset_below_usage:
                assert wire.remaining.amount >= 0

    @invariant()
    def reservations_match_model(self) -> None:
        if self.model is None:
            return
        page = self.run(self.store.list_reservations(ReservationQuery(tenant=T, limit=10_000)))
        rows = {r["reservation_id"]: r for r in page.items}
        assert set(rows) == set(self.model.res), "reservations differ"
        held: dict[tuple[str, str], int] = {}
        for rid, row in rows.items():
            res = self.model.res[rid]
            assert row["status"] == res.status, f"{rid}: store {row['status']} model {res.status}"
            assert (row["expires_at_ms"], row["extensions"]) == (res.expires, res.extensions)
            if res.status == "ACTIVE":
                for scope in json.loads(row["budgeted_scopes"]):
                    held[(scope, row["unit"])] = held.get((scope, row["unit"]), 0) + row["amount"]
            if res.status in ("COMMITTED", "RELEASED"):
                # resolved exactly once: the outcome recorded then never changes
                assert (row["committed"], row["finalized_at_ms"]) == (res.committed, res.finalized_at)
        for (scope, unit), b in self.model.budgets.items():
            assert b.reserved == held.get((scope, unit), 0), f"{scope} {unit}: reserved {b.reserved} != active holds"


SETTINGS = settings(max_examples=300, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _machine_for(kind: str) -> type[LedgerMachine]:
    return type(f"LedgerMachine_{kind}", (LedgerMachine,), {"STORE_KIND": kind})


for _kind in STORES:
    _case = _machine_for(_kind).TestCase
    _case.settings = SETTINGS
    globals()[f"TestLedgerModel_{_kind}"] = _case
del _kind, _case


# ---------------------------------------------------------------------------------------------
# fixed walks through the documented paths (the same machine and model, steps chosen by hand)


def _walk(kind: str = STORES[0], *, default_policy: str = "ALLOW_IF_AVAILABLE", allocated: int = 1_000,
          overdraft: int = 0, more: list[tuple[str, int, int, str | None]] | None = None) -> LedgerMachine:
    machine = _machine_for(kind)()
    machine.setup(default_policy=default_policy, allocated=allocated, overdraft=overdraft, policy=None,
                  more=more or [])
    return machine


def _check(machine: LedgerMachine) -> None:
    machine.ledgers_match_model()
    machine.reservations_match_model()


def _ledger(machine: LedgerMachine, scope: str = SCOPES[0]) -> MBudget:
    assert machine.model is not None
    return machine.model.budgets[(scope, USD)]


def test_reject_refuses_a_commit_above_the_reservation_even_when_remaining_covers_it() -> None:
    machine = _walk(default_policy="REJECT")
    try:
        machine.reserve_then_settle(subject={"tenant": T}, amount=100, policy=None, then="commit", mode="above",
                                    offset=50, wait=0, replay=False)
        _check(machine)
        rid = machine.rids[0]
        assert machine.model is not None and machine.model.res[rid].status == "ACTIVE"
        assert (_ledger(machine).spent, _ledger(machine).reserved) == (0, 100)
        assert machine.execute({"kind": "commit", "key": "k-eq", "rid": rid, "unit": USD, "actual": 100}) == "ok"
        _check(machine)
        assert _ledger(machine).spent == 100
    finally:
        machine.teardown()


def test_allow_if_available_caps_at_the_tightest_scope_and_marks_it_over_limit() -> None:
    machine = _walk(allocated=1_000, more=[("tenant:t1/workspace:w1", 150, 0, None)])
    try:
        machine.reserve_then_settle(subject={"tenant": T, "workspace": "w1"}, amount=100, policy=None,
                                    then="commit", mode="above", offset=200, wait=0,
                                    replay=False)
        _check(machine)
        root, ws = _ledger(machine), _ledger(machine, "tenant:t1/workspace:w1")
        # delta 200, the workspace could cover only 50: both charged 150, only the workspace is over limit
        assert (root.spent, ws.spent, root.debt, ws.debt) == (150, 150, 0, 0)
        assert (root.over, ws.over) == (False, True)
        assert machine.execute({"kind": "reserve", "key": "k2", "subject": {"tenant": T, "workspace": "w1"},
                                "unit": USD, "amount": 0, "ttl": None, "grace": None, "policy": None,
                                "dry_run": False}) == "OVERDRAFT_LIMIT_EXCEEDED"
        _check(machine)
    finally:
        machine.teardown()


def test_overdraft_puts_the_shortfall_into_debt_up_to_the_limit() -> None:
    machine = _walk(default_policy="ALLOW_WITH_OVERDRAFT", allocated=100, overdraft=50)
    try:
        machine.reserve_then_settle(subject={"tenant": T}, amount=100, policy=None, then="commit", mode="above",
                                    offset=30, wait=0, replay=False)
        _check(machine)
        led = _ledger(machine)
        assert (led.spent, led.debt, led.remaining, led.over) == (100, 30, -30, False)
        machine.execute({"kind": "event", "key": "e1", "subject": {"tenant": T}, "unit": USD, "amount": 21,
                         "policy": None})
        _check(machine)
        assert _ledger(machine).debt == 30  # 30 + 21 > 50: refused, nothing changed
        machine.execute({"kind": "fund", "key": "f1", "scope": SCOPES[0], "unit": USD, "op": "REPAY_DEBT",
                         "amount": 40, "spent": None})
        _check(machine)
        led = _ledger(machine)
        assert (led.debt, led.spent, led.allocated, led.remaining) == (0, 130, 140, 10)
    finally:
        machine.teardown()


def test_expiry_returns_the_hold_once_and_replays_report_zero_ttl() -> None:
    machine = _walk()
    try:
        p = {"kind": "reserve", "key": "r1", "subject": {"tenant": T}, "unit": USD, "amount": 300, "ttl": 1_000,
             "grace": 0, "policy": None, "dry_run": False}
        assert machine.execute(p) == "ok"
        machine.now += 500
        assert machine.execute(p) == "replay"  # remaining_ttl_ms 500 checked inside
        machine.now += 501
        machine.sweep()
        _check(machine)
        assert _ledger(machine).reserved == 0
        machine.sweep()
        _check(machine)
        assert machine.execute(p) == "replay"  # now EXPIRED: remaining_ttl_ms 0
        rid = machine.rids[0]
        for kind in ("commit", "release"):
            got = machine.execute({"kind": kind, "key": f"{kind}-late", "rid": rid, "unit": USD, "actual": 1,
                                   "reason": None})
            assert got == "RESERVATION_EXPIRED"
        _check(machine)
    finally:
        machine.teardown()


def test_a_denied_reserve_first_expires_due_leases_and_extensions_are_capped() -> None:
    machine = _walk(allocated=1_000)
    try:
        base = {"kind": "reserve", "subject": {"tenant": T}, "unit": USD, "ttl": 1_000, "grace": 0,
                "policy": None, "dry_run": False}
        assert machine.execute({**base, "key": "a", "amount": 800}) == "ok"
        assert machine.execute({**base, "key": "b", "amount": 800}) == "BUDGET_EXCEEDED"
        machine.now += 1_001  # past the first lease's deadline, not swept yet
        _check(machine)
        assert _ledger(machine).reserved == 800
        assert machine.execute({**base, "key": "c", "amount": 800, "ttl": 60_000}) == "ok"  # expired "a" first
        _check(machine)
        assert machine.model is not None and machine.model.res[machine.rids[0]].status == "EXPIRED"
        rid = machine.rids[1]
        assert machine.execute({"kind": "extend", "key": "x1", "rid": rid, "by": 86_400_000}) == "ok"
        assert machine.model.res[rid].expires == machine.now + MAX_TTL  # capped at max_reservation_ttl_ms
        assert machine.execute({"kind": "extend", "key": "x2", "rid": rid, "by": 1}) == "ok"
        assert machine.execute({"kind": "extend", "key": "x3", "rid": rid, "by": 1}) == "MAX_EXTENSIONS_EXCEEDED"
        _check(machine)
    finally:
        machine.teardown()
