"""The admin plane of the store, run directly against every store kind (conftest.STORES).

Covers the request journal (audit rows written in the same atomic step as the change, not with a failed
one), the audit scan and purge, reserves governed by policies (caps, TTL / extension / overage
precedence, rate limits on reserve and commit), API keys, versioned documents, budget updates (also
racing reserves), and the close cascade of a tenant. Time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from conftest import STORES
from cycles.core import policies as P
from cycles.core import scopes as S
from cycles.protocol.errors import ErrorCode, ProtocolError, VersionConflict
from cycles.store.base import (
    AuditScan,
    EventCommand,
    FundCommand,
    ReserveCommand,
    SettleCommand,
    Store,
    reset_journal,
    start_journal,
)

USD = "USD_MICROCENTS"
START_MS = 1_767_225_600_000  # a minute boundary
INT64_MAX = 2**63 - 1


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


@pytest.fixture(scope="module")
def redis_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from redis_support import RedisServer

    rs = RedisServer(tmp_path_factory.mktemp("redis-admin")).start()
    yield f"redis://127.0.0.1:{rs.port}/14"
    rs.stop()


class Env:
    def __init__(self, kind: str, store: Store, clock: Clock, loop: asyncio.AbstractEventLoop) -> None:
        self.kind, self.store, self.clock, self.loop = kind, store, clock, loop

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def fails(self, coro: Awaitable[Any], code: str, status: int | None = None) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            self.run(coro)
        assert info.value.code.value == code, (info.value.code, info.value.message)
        if status is not None:
            assert info.value.status == status
        return info.value

    def journaled(self, call: Callable[[], Awaitable[Any]], **row: Any) -> tuple[Any, dict[str, Any]]:
        """Run `call` with one journal row pending; returns (result, row)."""
        entry = journal_row(**row)
        pending = [entry]
        token = start_journal(pending)
        try:
            out = self.run(call())
        finally:
            reset_journal(token)
        assert pending == [], "the journal was not emptied after a successful write"
        return out, entry

    def audit(self, **kw: Any) -> list[dict[str, Any]]:
        return self.run(self.store.scan_audit(AuditScan(descending=False, limit=10_000, **kw)))

    def logged(self, log_id: str) -> dict[str, Any] | None:
        return next((r for r in self.audit() if r["log_id"] == log_id), None)


@pytest.fixture(params=STORES)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    kind = request.param
    clock = Clock()
    loop = asyncio.new_event_loop()
    if kind == "sqlite":
        from cycles.store.sqlite import SQLiteStore

        store: Store = SQLiteStore(str(tmp_path / "admin.db"), synchronous="OFF", clock=clock)
    elif kind == "redis":
        import redis as redis_py

        from cycles.store.redis import RedisStore

        url = request.getfixturevalue("redis_db")
        redis_py.Redis.from_url(url).flushdb()
        store = RedisStore(url, clock=clock)
    else:
        raise NotImplementedError(f"store kind {kind!r} has no factory in {__file__}")
    e = Env(kind, store, clock, loop)
    try:
        yield e
    finally:
        try:
            e.run(store.close())
        finally:
            loop.close()


# ---------------------------------------------------------------------------------------------
# helpers


def journal_row(**kw: Any) -> dict[str, Any]:
    row = {"journal": "audit", "log_id": "log_" + secrets.token_hex(12), "tenant_id": "__admin__",
           "operation": "test", "resource_type": "test", "status": 200, "metadata": {"empty": [], "big": INT64_MAX}}
    row.update(kw)
    return row


def tenant_record(tenant: str, **kw: Any) -> dict[str, Any]:
    rec = {"tenant_id": tenant, "name": tenant, "status": "ACTIVE", "created_at": "2026-01-01T00:00:00.000Z",
           "updated_at": "2026-01-01T00:00:00.000Z", "default_commit_overage_policy": "ALLOW_IF_AVAILABLE",
           "default_reservation_ttl_ms": 60_000, "max_reservation_ttl_ms": 120_000, "max_reservation_extensions": 2}
    rec.update(kw)
    return rec


def setup_tenant(env: Env, tenant: str = "acme", allocated: int = 1_000, **kw: Any) -> None:
    env.run(env.store.create_tenant(tenant_record(tenant, **kw)))
    if allocated is not None:
        budget(env, tenant, f"tenant:{tenant}", allocated)


def budget(env: Env, tenant: str, scope: str, allocated: int, **kw: Any) -> dict[str, Any]:
    record = {"tenant_id": tenant, "scope": scope, "unit": USD, "allocated": allocated, "overdraft_limit": 0,
              "commit_overage_policy": None, "extra": {}}
    record.update(kw)
    return env.run(env.store.create_budget(record))


_keys = iter(range(10**9))


def key() -> str:
    return f"k-{next(_keys)}"


def reserve_cmd(tenant: str, amount: int, *, subject: dict[str, str] | None = None, **kw: Any) -> ReserveCommand:
    subject = subject or {"tenant": tenant}
    path, scopes = S.derive(subject)
    k = kw.pop("idempotency_key", None) or key()
    return ReserveCommand(tenant=tenant, endpoint=kw.pop("endpoint", "reserve"), idempotency_key=k,
                          payload_hash="h-" + k, subject=subject, action={"kind": "llm", "name": "m"}, unit=USD,
                          amount=amount, scope_path=path, scopes=scopes, **kw)


def settle_cmd(rid: str, tenant: str | None = "acme", **kw: Any) -> SettleCommand:
    k = key()
    return SettleCommand(tenant=tenant, reservation_id=rid, idempotency_key=k, payload_hash="h-" + k, **kw)


def ledger(env: Env, tenant: str = "acme", scope: str | None = None) -> Any:
    rec = env.run(env.store.get_budget(tenant, scope or f"tenant:{tenant}", USD))
    return rec["ledger"]


def api_key(env: Env, tenant: str, **kw: Any) -> dict[str, Any]:
    key_id = "key_" + secrets.token_hex(8)
    rec = {"key_id": key_id, "key_prefix": "cyc_" + secrets.token_hex(6), "tenant_id": tenant, "name": key_id,
           "description": None, "permissions": ["reservations:create"], "scope_filter": [], "status": "ACTIVE",
           "created_at": "2026-01-01T00:00:00.000Z", "expires_at": "2027-01-01T00:00:00.000Z",
           "expires_at_ms": START_MS + 10**10, "metadata": {"n": INT64_MAX, "empty": []}, "secret_hash": "x"}
    rec.update(kw)
    env.run(env.store.create_api_key(rec))
    return rec


# ---------------------------------------------------------------------------------------------
# the journal


def test_journal_rides_with_a_successful_change_and_not_with_a_failed_one(env: Env) -> None:
    out, row = env.journaled(lambda: env.store.create_tenant(tenant_record("acme")), tenant_id="acme")
    assert out[1] is True
    stored = env.logged(row["log_id"])
    assert stored == {**row, "timestamp_ms": START_MS}
    assert type(stored["timestamp_ms"]) is int and type(stored["status"]) is int
    budget(env, "acme", "tenant:acme", 1_000)

    env.clock.now += 10
    res, row = env.journaled(lambda: env.store.reserve(reserve_cmd("acme", 600)), tenant_id="acme")
    rid = res.result["reservation_id"]
    assert env.logged(row["log_id"]) == {**row, "timestamp_ms": START_MS + 10, "resource_id": rid}

    # a reserve that 409s writes nothing and leaves the entry pending
    failed = journal_row(tenant_id="acme")
    pending = [failed]
    token = start_journal(pending)
    try:
        env.fails(env.store.reserve(reserve_cmd("acme", 600)), "BUDGET_EXCEEDED", 409)
        env.fails(env.store.update_tenant("nobody", {"name": "x"}, "2026"), "NOT_FOUND")
        env.fails(env.store.save_doc("policy", "acme", "p1", {"a": 1}, 7), "NOT_FOUND")
    finally:
        reset_journal(token)
    assert pending == [failed]
    assert env.logged(failed["log_id"]) is None
    assert ledger(env).reserved == 600

    # the caller writes it on its own afterwards, stamped with the store's clock
    env.clock.now += 5
    env.run(env.store.append_journal([failed]))
    assert env.logged(failed["log_id"]) == {**failed, "timestamp_ms": START_MS + 15}

    # a replay takes the journal too; its reservation fills a missing resource_id but never replaces one
    cmd = reserve_cmd("acme", 100)
    first = env.run(env.store.reserve(cmd))
    again, row = env.journaled(lambda: env.store.reserve(cmd), tenant_id="acme")
    assert again.replay and env.logged(row["log_id"])["resource_id"] == first.result["reservation_id"]
    _, row = env.journaled(lambda: env.store.reserve(reserve_cmd("acme", 1)), tenant_id="acme",
                           resource_id="mine", timestamp_ms=42)
    assert env.logged(row["log_id"]) == row


def test_every_mutation_writes_the_pending_journal(env: Env) -> None:
    st = env.store
    setup_tenant(env, "acme", 10_000)
    setup_tenant(env, "beta", 10_000)
    key_rec = api_key(env, "acme")
    rid = env.run(st.reserve(reserve_cmd("acme", 10))).result["reservation_id"]
    rid2 = env.run(st.reserve(reserve_cmd("acme", 10))).result["reservation_id"]
    rid3 = env.run(st.reserve(reserve_cmd("acme", 10))).result["reservation_id"]
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("create_tenant", lambda: st.create_tenant(tenant_record("gamma"))),
        ("update_tenant", lambda: st.update_tenant("gamma", {"name": "G"}, "2026-01-02T00:00:00.000Z")),
        ("put_setting", lambda: st.put_setting("s", "v", only_if_absent=True)),
        ("create_api_key", lambda: st.create_api_key({**key_rec, "key_id": "key_x", "key_prefix": "cyc_x"})),
        ("update_api_key", lambda: st.update_api_key(key_rec["key_id"], {"name": "n"})),
        ("touch_api_keys", lambda: st.touch_api_keys({key_rec["key_id"]: START_MS})),
        ("save_doc", lambda: st.save_doc("policy", "acme", "p1", {"policy_id": "p1"}, None)),
        ("create_budget", lambda: st.create_budget({"tenant_id": "acme", "scope": "tenant:acme/app:a", "unit": USD,
                                                     "allocated": 5, "overdraft_limit": 0, "extra": {}})),
        ("update_budget", lambda: st.update_budget("acme", "tenant:acme", USD, {"overdraft_limit": 7})),
        ("fund", lambda: st.fund(FundCommand("acme", "tenant:acme", USD, "CREDIT", 5, None, key(), "h"))),
        ("reserve", lambda: st.reserve(reserve_cmd("acme", 1))),
        ("commit", lambda: st.commit(settle_cmd(rid, actual=5, unit=USD))),
        ("release", lambda: st.release(settle_cmd(rid2))),
        ("extend", lambda: st.extend(settle_cmd(rid3, extend_by_ms=1_000))),
        ("create_event", lambda: st.create_event(EventCommand("acme", key(), "h", {"tenant": "acme"}, {"kind": "k"},
                                                              USD, 3, "tenant:acme", ["tenant:acme"]))),
        ("cascade_close", lambda: st.cascade_close("beta")),
        ("purge_audit", lambda: st.purge_audit(0)),
    ]
    for name, call in calls:
        env.clock.now += 1
        _, row = env.journaled(call, operation=name)
        got = env.logged(row["log_id"])
        assert got is not None, f"{name} did not write its journal"
        assert got["timestamp_ms"] == env.clock.now and got["operation"] == name
        if name == "extend":
            assert got["resource_id"] == rid3


# ---------------------------------------------------------------------------------------------
# the audit log


def test_scan_audit_orders_pages_windows_filters_and_purges(env: Env) -> None:
    rows = []
    for i in range(40):
        tenant = ["acme", "beta", "__admin__", "__unauth__"][i % 4]
        ts = START_MS + (i % 7) * 1_000  # many ties on the timestamp
        rows.append(journal_row(log_id=f"log_{(i * 37) % 101:03d}", tenant_id=tenant, timestamp_ms=ts))
    env.run(env.store.append_journal(rows[:25]))
    env.run(env.store.append_journal(rows[25:]))

    def expect(tenant: str | None = None, lo: int | None = None, hi: int | None = None, desc: bool = False) -> list[str]:
        out = [r for r in rows if (tenant is None or r["tenant_id"] == tenant)
               and (lo is None or r["timestamp_ms"] >= lo) and (hi is None or r["timestamp_ms"] <= hi)]
        out.sort(key=lambda r: (r["timestamp_ms"], r["log_id"]), reverse=desc)
        return [r["log_id"] for r in out]

    def pages(limit: int, **kw: Any) -> list[str]:
        scan = AuditScan(limit=limit, **kw)
        got: list[str] = []
        while True:
            batch = env.run(env.store.scan_audit(scan))
            got += [r["log_id"] for r in batch]
            if len(batch) < limit:
                return got
            scan.after = (batch[-1]["timestamp_ms"], batch[-1]["log_id"])

    for desc in (False, True):
        assert pages(500, descending=desc) == expect(desc=desc)
        for limit in (1, 3, 7):
            assert pages(limit, descending=desc) == expect(desc=desc)
        assert pages(4, descending=desc, tenant="beta") == expect("beta", desc=desc)
        assert pages(3, descending=desc, tenant="__admin__", from_ms=START_MS + 1_000, to_ms=START_MS + 4_000) == \
            expect("__admin__", START_MS + 1_000, START_MS + 4_000, desc)
        assert pages(5, descending=desc, from_ms=START_MS + 6_000) == expect(lo=START_MS + 6_000, desc=desc)
        assert pages(5, descending=desc, to_ms=START_MS) == expect(hi=START_MS, desc=desc)
    first = env.run(env.store.scan_audit(AuditScan(descending=False, limit=1)))[0]
    assert first == next(r for r in rows if r["log_id"] == expect()[0])
    assert type(first["timestamp_ms"]) is int and first["metadata"] == {"empty": [], "big": INT64_MAX}

    purged = env.run(env.store.purge_audit(START_MS + 3_000))
    assert purged == len([r for r in rows if r["timestamp_ms"] < START_MS + 3_000])
    assert pages(6, descending=False) == expect(lo=START_MS + 3_000)
    for tenant in ("acme", "beta", "__admin__", "__unauth__"):
        assert pages(6, tenant=tenant, descending=False) == expect(tenant, lo=START_MS + 3_000)
    assert env.run(env.store.purge_audit(START_MS + 3_000)) == 0


# ---------------------------------------------------------------------------------------------
# reserves governed by policies


def test_caps_make_the_decision_allow_with_caps_live_and_evaluated(env: Env) -> None:
    setup_tenant(env)
    caps = {"max_tokens": INT64_MAX, "tool_allowlist": ["search", "fetch"], "tool_denylist": [], "cooldown_ms": 5}
    live = env.run(env.store.reserve(reserve_cmd("acme", 10, caps=caps)))
    assert live.result["decision"] == "ALLOW_WITH_CAPS" and live.result["caps"] == caps
    for extra in ({"dry_run": True}, {"endpoint": "decide"}):
        out = env.run(env.store.reserve(reserve_cmd("acme", 10, caps=caps, **extra)))
        assert out.result["decision"] == "ALLOW_WITH_CAPS" and out.result["caps"] == caps
        assert "reservation_id" not in out.result
    plain = env.run(env.store.reserve(reserve_cmd("acme", 10)))
    assert plain.result["decision"] == "ALLOW" and plain.result["caps"] is None
    empty = env.run(env.store.reserve(reserve_cmd("acme", 10, caps={}, dry_run=True)))
    assert empty.result["decision"] == "ALLOW" and empty.result["caps"] == {}
    # a denial carries no caps; a replay the same caps
    denied = env.run(env.store.reserve(reserve_cmd("acme", 10**6, caps=caps, dry_run=True)))
    assert denied.result["decision"] == "DENY" and "caps" not in denied.result
    cmd = reserve_cmd("acme", 10, caps=caps)
    first = env.run(env.store.reserve(cmd))
    again = env.run(env.store.reserve(cmd))
    assert again.replay and again.result == first.result
    assert ledger(env).reserved == 30


def test_policy_settings_take_precedence_over_budget_and_tenant(env: Env) -> None:
    setup_tenant(env, allocated=None)
    budget(env, "acme", "tenant:acme", 10_000, commit_overage_policy="REJECT")

    def stored(**kw: Any) -> dict[str, Any]:
        out = env.run(env.store.reserve(reserve_cmd("acme", 1, **kw)))
        return env.run(env.store.get_reservation(out.result["reservation_id"]))

    now = START_MS
    r = stored()
    assert (r["expires_at_ms"] - now, r["max_extensions"], r["overage_policy"]) == (60_000, 2, "REJECT")
    r = stored(policy={"default_ttl_ms": 30_000, "max_extensions": 0, "overage_policy": "ALLOW_WITH_OVERDRAFT"})
    assert (r["expires_at_ms"] - now, r["max_extensions"], r["overage_policy"]) == (30_000, 0, "ALLOW_WITH_OVERDRAFT")
    env.fails(env.store.extend(settle_cmd(r["reservation_id"], extend_by_ms=1_000)), "MAX_EXTENSIONS_EXCEEDED")
    r = stored(ttl_ms=90_000, overage_policy="ALLOW_IF_AVAILABLE",
               policy={"default_ttl_ms": 30_000, "max_ttl_ms": 50_000, "overage_policy": "ALLOW_WITH_OVERDRAFT"})
    assert (r["expires_at_ms"] - now, r["overage_policy"]) == (50_000, "ALLOW_IF_AVAILABLE")
    r = stored(ttl_ms=200_000)  # the tenant's maximum
    assert r["expires_at_ms"] - now == 120_000
    r = stored(ttl_ms=200_000, policy={"max_ttl_ms": 150_000})  # the policy's maximum replaces the tenant's
    assert r["expires_at_ms"] - now == 150_000
    r = stored(policy={"max_extensions": 5}, grace_ms=0)
    assert (r["max_extensions"], r["grace_ms"], r["deadline_ms"]) == (5, 0, r["expires_at_ms"])
    env.run(env.store.update_budget("acme", "tenant:acme", USD, {"commit_overage_policy": None}))
    assert stored()["overage_policy"] == "ALLOW_IF_AVAILABLE"  # the tenant's default


def _rate_error(bucket: str, limit: int, prev: int, cur: int, now: int) -> ProtocolError:
    _, pid, scope = bucket.split("|")
    return P.rate_error(bucket, limit, pid, scope, P.retry_after_ms(prev, cur, limit, now))  # type: ignore[return-value]


def _same_error(got: ProtocolError, want: ProtocolError) -> None:
    assert (got.code, got.status, got.message, got.details, got.headers) == \
        (want.code, want.status, want.message, want.details, want.headers)


def test_reserve_rate_limit_counts_successes_in_a_sliding_window(env: Env) -> None:
    setup_tenant(env, allocated=10_000)
    bucket = "reserve|pol_1|tenant:acme"
    limits = [(bucket, 3, "pol_1", "tenant:acme")]
    env.clock.now = START_MS + 10_000
    assert env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits))).result["decision"] == "ALLOW"
    # a refused reserve is not counted; evaluations are neither checked nor counted
    env.fails(env.store.reserve(reserve_cmd("acme", 10**6, limits=limits)), "BUDGET_EXCEEDED")
    for _ in range(5):
        env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits, dry_run=True)))
    env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits)))
    env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits)))
    err = env.fails(env.store.reserve(reserve_cmd("acme", 1, limits=limits)), "LIMIT_EXCEEDED", 429)
    _same_error(err, _rate_error(bucket, 3, 0, 3, START_MS + 10_000))
    assert err.details["retry_after_ms"] == 50_000 and err.headers == {"Retry-After": "50"}
    assert ledger(env).reserved == 3
    # other buckets are separate
    other = [("reserve|pol_2|tenant:acme", 1, "pol_2", "tenant:acme")]
    env.run(env.store.reserve(reserve_cmd("acme", 1, limits=other)))

    # next minute, 30 s in: the previous minute weighs half (1.5) -> one more fits, then it is full
    env.clock.now = START_MS + 90_000
    env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits)))
    err = env.fails(env.store.reserve(reserve_cmd("acme", 1, limits=limits)), "LIMIT_EXCEEDED", 429)
    _same_error(err, _rate_error(bucket, 3, 3, 1, START_MS + 90_000))
    env.clock.now += err.details["retry_after_ms"]
    env.run(env.store.reserve(reserve_cmd("acme", 1, limits=limits)))


def test_commit_rate_limits_are_kept_on_the_reservation(env: Env) -> None:
    setup_tenant(env, allocated=10_000)
    bucket = "commit|pol_c|tenant:acme"
    limits = [(bucket, 2, "pol_c", "tenant:acme")]
    rids = [env.run(env.store.reserve(reserve_cmd("acme", 10, commit_limits=limits, overage_policy="REJECT")))
            .result["reservation_id"] for _ in range(4)]
    assert "commit_limits" not in env.run(env.store.get_reservation(rids[0]))
    env.run(env.store.commit(settle_cmd(rids[0], actual=10, unit=USD)))
    env.fails(env.store.commit(settle_cmd(rids[1], actual=11, unit=USD)), "BUDGET_EXCEEDED")  # not counted
    env.run(env.store.commit(settle_cmd(rids[1], actual=9, unit=USD)))
    err = env.fails(env.store.commit(settle_cmd(rids[2], actual=10, unit=USD)), "LIMIT_EXCEEDED", 429)
    _same_error(err, _rate_error(bucket, 2, 0, 2, START_MS))
    assert env.run(env.store.get_reservation(rids[2]))["status"] == "ACTIVE"
    led = ledger(env)
    assert (led.spent, led.reserved) == (19, 20)
    env.run(env.store.release(settle_cmd(rids[2])))  # releases are not limited
    assert ledger(env).reserved == 10


# ---------------------------------------------------------------------------------------------
# API keys


def test_api_keys_list_get_update_revoke_and_touch(env: Env) -> None:
    setup_tenant(env, "acme")
    setup_tenant(env, "beta")
    made = []
    for i, tenant in enumerate(["acme", "beta", "acme", "acme"]):
        env.clock.now = START_MS + (i // 2) * 1_000  # two keys share each creation time
        made.append(api_key(env, tenant))
    order = sorted(made, key=lambda r: ((made.index(r)) // 2, r["key_id"]))
    assert env.run(env.store.list_api_keys(None)) == order
    assert env.run(env.store.list_api_keys("acme")) == [r for r in order if r["tenant_id"] == "acme"]
    assert env.run(env.store.list_api_keys("nobody")) == []
    k = made[0]
    assert env.run(env.store.get_api_key(k["key_id"])) == k
    assert env.run(env.store.get_api_key("key_unknown")) is None
    env.fails(env.store.update_api_key("key_unknown", {"name": "x"}), "NOT_FOUND")

    changed = env.run(env.store.update_api_key(k["key_id"], {"name": "renamed", "scope_filter": ["workspace:w"],
                                                             "description": None}))
    assert changed == {**k, "name": "renamed", "scope_filter": ["workspace:w"], "description": None}
    assert env.run(env.store.get_api_key(k["key_id"])) == changed
    assert env.run(env.store.find_api_key(k["key_prefix"])) == changed

    env.run(env.store.touch_api_keys({k["key_id"]: START_MS + 500, made[1]["key_id"]: START_MS, "key_gone": 1}))
    env.run(env.store.touch_api_keys({k["key_id"]: START_MS + 100}))  # never backwards
    assert env.run(env.store.get_api_key(k["key_id"]))["last_used_at_ms"] == START_MS + 500
    env.run(env.store.touch_api_keys({k["key_id"]: START_MS + 900}))
    touched = env.run(env.store.get_api_key(k["key_id"]))
    assert touched == {**changed, "last_used_at_ms": START_MS + 900}

    revoked = env.run(env.store.update_api_key(k["key_id"], {"status": "REVOKED", "revoked_at_ms": 5,
                                                             "revoked_reason": None}, guard_tenant=False))
    assert revoked["status"] == "REVOKED"
    env.fails(env.store.update_api_key(k["key_id"], {"name": "again"}), "KEY_REVOKED", 409)

    env.run(env.store.update_tenant("beta", {"status": "CLOSED"}, "2026-01-02T00:00:00.000Z"))
    env.fails(env.store.update_api_key(made[1]["key_id"], {"name": "x"}), "TENANT_CLOSED", 409)
    out = env.run(env.store.update_api_key(made[1]["key_id"], {"status": "REVOKED"}, guard_tenant=False))
    assert out["status"] == "REVOKED" and out["last_used_at_ms"] == START_MS


# ---------------------------------------------------------------------------------------------
# versioned documents


def test_documents_are_versioned_and_guarded(env: Env) -> None:
    setup_tenant(env, "acme")
    setup_tenant(env, "beta")
    st = env.store
    doc = {"policy_id": "p1", "tenant_id": "acme", "caps": {"max_tokens": INT64_MAX}, "tags": []}
    created = env.run(st.save_doc("policy", "acme", "p1", doc, None))
    assert created == {**doc, "version": 1}
    assert env.run(st.get_doc("policy", "p1")) == created
    err = env.fails(st.save_doc("policy", "acme", "p1", doc, None), "DUPLICATE_RESOURCE", 409)
    assert not isinstance(err, VersionConflict)
    replaced = env.run(st.save_doc("policy", "acme", "p1", {**created, "name": "x"}, 1))
    assert replaced == {**doc, "name": "x", "version": 2}
    with pytest.raises(VersionConflict) as info:
        env.run(st.save_doc("policy", "acme", "p1", {**doc, "name": "stale"}, 1))
    assert info.value.status == 409
    with pytest.raises(VersionConflict):
        env.run(st.save_doc("policy", "acme", "p1", None, 1))
    assert env.run(st.get_doc("policy", "p1")) == replaced
    env.fails(st.save_doc("policy", "acme", "p9", doc, 1), "NOT_FOUND")
    env.fails(st.save_doc("policy", "acme", "p9", None, 3), "NOT_FOUND")

    for doc_id, tenant in [("p0", "beta"), ("p2", "acme"), ("a1", "acme")]:
        env.run(st.save_doc("policy", tenant, doc_id, {"policy_id": doc_id}, None))
    env.run(st.save_doc("webhook", "acme", "w1", {"subscription_id": "w1"}, None))
    assert [d["policy_id"] for d in env.run(st.list_docs("policy", None))] == ["a1", "p0", "p1", "p2"]
    assert [d["policy_id"] for d in env.run(st.list_docs("policy", "acme"))] == ["a1", "p1", "p2"]
    assert [d["subscription_id"] for d in env.run(st.list_docs("webhook", None))] == ["w1"]

    assert env.run(st.save_doc("policy", "acme", "p1", None, 2)) is None
    assert env.run(st.get_doc("policy", "p1")) is None
    assert [d["policy_id"] for d in env.run(st.list_docs("policy", "acme"))] == ["a1", "p2"]
    assert env.run(st.save_doc("policy", "acme", "p1", doc, None))["version"] == 1  # a new life

    env.fails(st.save_doc("policy", "nobody", "px", doc, None), "NOT_FOUND")
    env.run(st.update_tenant("beta", {"status": "CLOSED"}, "2026-01-02T00:00:00.000Z"))
    env.fails(st.save_doc("policy", "beta", "p0", {"policy_id": "p0"}, 1), "TENANT_CLOSED", 409)
    assert env.run(st.save_doc("policy", "beta", "p0", {"policy_id": "p0", "status": "DISABLED"}, 1,
                               guard_tenant=False))["version"] == 2


# ---------------------------------------------------------------------------------------------
# budget updates


def test_update_budget_status_settings_and_overdraft_flag(env: Env) -> None:
    setup_tenant(env, allocated=None)
    budget(env, "acme", "tenant:acme", 100, overdraft_limit=50, extra={"metadata": {"a": 1}, "gone": None})
    st = env.store
    frozen = env.run(st.update_budget("acme", "tenant:acme", USD, {"status": "FROZEN", "from_status": ["ACTIVE"]}))
    assert frozen["ledger"].status == "FROZEN"
    env.fails(st.reserve(reserve_cmd("acme", 1)), "BUDGET_FROZEN")
    env.fails(st.update_budget("acme", "tenant:acme", USD, {"status": "FROZEN"}), "BUDGET_FROZEN", 409)
    env.fails(st.update_budget("acme", "tenant:acme", USD, {"status": "ACTIVE", "from_status": ["CLOSED"]}),
              "INVALID_REQUEST", 409)
    env.run(st.update_budget("acme", "tenant:acme", USD, {"status": "ACTIVE", "from_status": ["FROZEN"]}))
    env.fails(st.update_budget("acme", "tenant:acme", USD, {"status": "ACTIVE"}), "INVALID_REQUEST", 409)

    rid = env.run(st.reserve(reserve_cmd("acme", 100, overage_policy="ALLOW_WITH_OVERDRAFT"))).result["reservation_id"]
    env.run(st.commit(settle_cmd(rid, actual=140, unit=USD)))  # 40 goes into debt under the overdraft
    env.clock.now += 7
    led = ledger(env)
    assert (led.spent, led.debt, led.is_over_limit) == (100, 40, False)
    row = env.run(st.update_budget("acme", "tenant:acme", USD, {"overdraft_limit": 30}))
    assert (row["ledger"].overdraft_limit, row["ledger"].is_over_limit) == (30, True)
    assert row["updated_at_ms"] == START_MS + 7
    row = env.run(st.update_budget("acme", "tenant:acme", USD, {
        "overdraft_limit": 40, "allocated": INT64_MAX, "commit_overage_policy": "REJECT",
        "extra": {"metadata": {"b": 2}, "rollover_policy": "NONE", "nothing": None}}))
    led = row["ledger"]
    assert (led.allocated, led.overdraft_limit, led.is_over_limit, led.spent, led.debt) == (INT64_MAX, 40, False, 100, 40)
    assert row["commit_overage_policy"] == "REJECT"
    assert row["extra"] == {"metadata": {"b": 2}, "rollover_policy": "NONE"}
    assert env.run(st.get_budget("acme", "tenant:acme", USD)) == row
    row = env.run(st.update_budget("acme", "tenant:acme", USD, {"commit_overage_policy": None, "allocated": 500}))
    assert row["commit_overage_policy"] is None and row["extra"] == {"metadata": {"b": 2}, "rollover_policy": "NONE"}
    env.fails(st.update_budget("acme", "tenant:acme", USD, {"allocated": -INT64_MAX}), "INVALID_REQUEST")

    env.fails(st.update_budget("acme", "tenant:acme/app:x", USD, {"allocated": 1}), "NOT_FOUND")
    env.fails(st.update_budget("nobody", "tenant:nobody", USD, {"allocated": 1}), "NOT_FOUND")
    closed = env.run(st.update_budget("acme", "tenant:acme", USD, {"status": "CLOSED"}))
    assert closed["ledger"].status == "CLOSED"
    env.fails(st.update_budget("acme", "tenant:acme", USD, {"allocated": 1}), "BUDGET_CLOSED")
    env.fails(st.reserve(reserve_cmd("acme", 1)), "BUDGET_CLOSED")
    assert env.run(st.get_budget("acme", "tenant:acme", "TOKENS")) is None


def test_update_budget_racing_reserves_loses_no_update(env: Env) -> None:
    setup_tenant(env, allocated=10**12)
    st = env.store

    async def race() -> None:
        reserves = [st.reserve(reserve_cmd("acme", 7 + i % 3)) for i in range(200)]
        patches = [st.update_budget("acme", "tenant:acme", USD, {"overdraft_limit": 1_000 + i}) for i in range(50)]
        calls: list[Awaitable[Any]] = []
        for i, r in enumerate(reserves):
            calls.append(r)
            if i % 4 == 0:
                calls.append(patches[i // 4])
        await asyncio.gather(*calls)

    env.run(race())
    led = ledger(env)
    assert led.reserved == sum(7 + i % 3 for i in range(200))
    assert led.allocated == 10**12 and led.spent == 0 and 1_000 <= led.overdraft_limit < 1_050


# ---------------------------------------------------------------------------------------------
# the close cascade


def test_cascade_close_releases_in_batches_then_closes_everything(env: Env) -> None:
    setup_tenant(env, "acme", allocated=10_000)
    setup_tenant(env, "beta", allocated=10_000)
    budget(env, "acme", "tenant:acme/workspace:w", 5_000)
    st = env.store
    amounts = [11, 22, 33, 44, 55]
    rids = [env.run(st.reserve(reserve_cmd("acme", a, subject={"tenant": "acme", "workspace": "w"})))
            .result["reservation_id"] for a in amounts]
    done = env.run(st.reserve(reserve_cmd("acme", 100))).result["reservation_id"]
    env.run(st.commit(settle_cmd(done, actual=60, unit=USD)))
    beta_rid = env.run(st.reserve(reserve_cmd("beta", 5))).result["reservation_id"]
    keys = [api_key(env, "acme"), api_key(env, "acme", status="REVOKED", revoked_reason="old", revoked_at_ms=1),
            api_key(env, "beta")]
    env.run(st.save_doc("webhook", "acme", "w1", {"subscription_id": "w1", "status": "ACTIVE", "events": []}, None))
    env.run(st.save_doc("webhook", "acme", "w2", {"subscription_id": "w2", "status": "DISABLED"}, None))
    env.run(st.save_doc("webhook", "beta", "w3", {"subscription_id": "w3", "status": "ACTIVE"}, None))
    env.run(st.save_doc("policy", "acme", "p1", {"policy_id": "p1", "status": "ACTIVE"}, None))

    assert env.run(st.pending_cascades()) == []
    assert env.run(st.cascade_close("acme", 2)) is True  # not closed: nothing to do
    assert env.run(st.get_reservation(rids[0]))["status"] == "ACTIVE"
    env.run(st.update_tenant("acme", {"status": "CLOSED"}, "2026-01-02T00:00:00.000Z"))
    rec = env.run(st.get_tenant("acme"))
    assert (rec["status"], rec["cascade"], rec["closed_at"]) == ("CLOSED", "PENDING", "2026-01-02T00:00:00.000Z")
    assert env.run(st.pending_cascades()) == ["acme"]

    def held() -> tuple[int, int]:
        return ledger(env, "acme").reserved, ledger(env, "acme", "tenant:acme/workspace:w").reserved

    assert held() == (sum(amounts), sum(amounts))
    env.clock.now += 1_000
    assert env.run(st.cascade_close("acme", 2)) is False
    released = [r for r in rids if env.run(st.get_reservation(r))["status"] == "RELEASED"]
    assert len(released) == 2
    left = sum(a for r, a in zip(rids, amounts) if r not in released)
    assert held() == (left, left)
    assert env.run(st.get_budget("acme", "tenant:acme", USD))["ledger"].status == "ACTIVE"
    assert env.run(st.cascade_close("acme", 2)) is False
    assert env.run(st.pending_cascades()) == ["acme"]
    assert env.run(st.cascade_close("acme", 2)) is True
    assert held() == (0, 0)
    for rid in rids:
        r = env.run(st.get_reservation(rid))
        assert (r["status"], r["finalized_at_ms"]) == ("RELEASED", START_MS + 1_000)
    assert env.run(st.get_reservation(done))["status"] == "COMMITTED"
    assert ledger(env, "acme").spent == 60
    for scope in ("tenant:acme", "tenant:acme/workspace:w"):
        assert ledger(env, "acme", scope).status == "CLOSED"
    assert env.run(st.get_api_key(keys[0]["key_id"])) == {
        **keys[0], "status": "REVOKED", "revoked_at_ms": START_MS + 1_000, "revoked_reason": "tenant closed"}
    assert env.run(st.get_api_key(keys[1]["key_id"])) == keys[1]
    assert env.run(st.get_doc("webhook", "w1")) == {"subscription_id": "w1", "status": "DISABLED", "events": [],
                                                    "version": 2}
    assert env.run(st.get_doc("webhook", "w2"))["version"] == 1
    assert env.run(st.get_doc("policy", "p1"))["status"] == "ACTIVE"
    assert env.run(st.get_tenant("acme"))["cascade"] == "DONE"
    assert env.run(st.pending_cascades()) == []
    assert env.run(st.cascade_close("acme", 2)) is True  # safe to repeat

    # the other tenant is untouched
    assert env.run(st.get_reservation(beta_rid))["status"] == "ACTIVE"
    assert env.run(st.get_api_key(keys[2]["key_id"]))["status"] == "ACTIVE"
    assert env.run(st.get_doc("webhook", "w3"))["status"] == "ACTIVE"
    assert ledger(env, "beta").reserved == 5


def test_cascade_close_with_an_exact_batch_finishes_on_the_next_step(env: Env) -> None:
    setup_tenant(env, "acme", allocated=10_000)
    for _ in range(3):
        env.run(env.store.reserve(reserve_cmd("acme", 10)))
    env.run(env.store.update_tenant("acme", {"status": "CLOSED"}, "2026-01-02T00:00:00.000Z"))
    assert env.run(env.store.cascade_close("acme", 3)) is False
    assert ledger(env).status == "ACTIVE" and ledger(env).reserved == 0
    assert env.run(env.store.cascade_close("acme", 3)) is True
    assert ledger(env).status == "CLOSED"


# ---------------------------------------------------------------------------------------------
# overview counters


def test_counters_follow_every_change(env: Env) -> None:
    st = env.store
    setup_tenant(env, "acme", allocated=100)
    setup_tenant(env, "beta", allocated=100)
    budget(env, "acme", "tenant:acme/app:a", 100, overdraft_limit=10)
    env.run(st.update_tenant("beta", {"status": "SUSPENDED"}, "2026-01-02T00:00:00.000Z"))
    rid = env.run(st.reserve(reserve_cmd("acme", 50, subject={"tenant": "acme", "app": "a"}))).result["reservation_id"]
    env.run(st.commit(settle_cmd(rid, actual=160, unit=USD)))  # ALLOW_IF_AVAILABLE: both scopes over limit
    env.run(st.update_budget("acme", "tenant:acme/app:a", USD, {"status": "FROZEN"}))
    counts = env.run(st.counters())
    want = {"tenants.ACTIVE": 1, "tenants.SUSPENDED": 1, "budgets.ACTIVE": 2, "budgets.FROZEN": 1,
            f"budgets.unit.{USD}": 3, "budgets.over_limit": 2, "budgets.with_debt": 0}
    assert {k: v for k, v in counts.items() if v} == {k: v for k, v in want.items() if v}
    top = env.run(st.top_budgets("over_limit"))
    assert sorted(r["ledger"].scope for r in top) == ["tenant:acme", "tenant:acme/app:a"]
    assert env.run(st.top_budgets("debt")) == []
