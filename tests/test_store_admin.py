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
    elif kind == "redis-cluster":
        from redis_support import flush_cluster

        from cycles.store.redis_cluster import RedisClusterStore

        url = request.getfixturevalue("store_cluster_url")
        flush_cluster(url)
        store = RedisClusterStore(url, clock=clock)
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


# ---------------------------------------------------------------------------------------------
# governance events the store itself produces, compared across every store kind


BIG = 9_007_199_254_740_993  # 2**53 + 1: a double cannot hold it


def _open_env(kind: str, request: pytest.FixtureRequest, path: Path, clock: Clock) -> Env:
    loop = asyncio.new_event_loop()
    if kind == "sqlite":
        from cycles.store.sqlite import SQLiteStore

        return Env(kind, SQLiteStore(str(path / "events.db"), synchronous="OFF", clock=clock), clock, loop)
    if kind == "redis":
        import redis as redis_py

        from cycles.store.redis import RedisStore

        url = request.getfixturevalue("redis_db")
        redis_py.Redis.from_url(url).flushdb()
        return Env(kind, RedisStore(url, clock=clock), clock, loop)
    if kind == "redis-cluster":
        from redis_support import flush_cluster

        from cycles.store.redis_cluster import RedisClusterStore

        url = request.getfixturevalue("store_cluster_url")
        flush_cluster(url)
        return Env(kind, RedisClusterStore(url, clock=clock), clock, loop)
    raise NotImplementedError(f"store kind {kind!r} has no factory in {__file__}")


@pytest.fixture
def every_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Env]]:
    """One store of every kind, each with its own clock; a scenario runs on each and their events compare."""
    envs: dict[str, Env] = {}
    try:
        for kind in STORES:
            envs[kind] = _open_env(kind, request, tmp_path, Clock())
        yield envs
    finally:
        for e in envs.values():
            try:
                e.run(e.store.close())
            finally:
                e.loop.close()


def stored_events(env: Env, tenant: str | None = None) -> list[dict[str, Any]]:
    return env.run(env.store.scan_events(AuditScan(tenant=tenant, descending=False, limit=10_000)))


def _request_row(tenant: str, n: int) -> dict[str, Any]:
    return journal_row(tenant_id=tenant, request_id=f"req_{n}", trace_id=f"{n:032x}", key_id="key_caller",
                       source_ip="10.0.0.1")


def with_request(env: Env, call: Callable[[], Awaitable[Any]], tenant: str, n: int,
                 *extra: dict[str, Any]) -> Any:
    """Run `call` with the request's audit row (and `extra` queued entries) pending, as the server does."""
    pending = [_request_row(tenant, n), *extra]
    token = start_journal(pending)
    try:
        return env.run(call())
    finally:
        reset_journal(token)


def _labelled(events: list[dict[str, Any]], ids: dict[str, str]) -> list[dict[str, Any]]:
    """Events without their event_id, with store-made ids (reservations, ledgers) replaced by labels."""
    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return ids.get(v, v) if isinstance(v, str) else v

    def own(e: dict[str, Any]) -> dict[str, Any]:
        # an event without a request correlates to itself: compare that fact, not the random id
        if e.get("correlation_id") == f"event:{e['event_id']}":
            e = {**e, "correlation_id": "event:<self>"}
        return {k: v for k, v in e.items() if k != "event_id"}

    return [walk(own(e)) for e in events]


def _check_ids(events: list[dict[str, Any]]) -> None:
    """evt_<ms, 12 hex><sequence, 8 hex><random, 8 hex>, unique, in the order of the scan."""
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    for e in events:
        eid = e["event_id"]
        assert len(eid) == 4 + 12 + 8 + 8 and eid.startswith("evt_"), eid
        assert int(eid[4:16], 16) == e["timestamp_ms"], eid
        int(eid[16:], 16)
    assert [(e["timestamp_ms"], e["event_id"]) for e in events] == sorted((e["timestamp_ms"], e["event_id"])
                                                                            for e in events)


def _same_on_every_store(every_store: dict[str, Env], scenario: Callable[[Env], dict[str, str]],
                         tenant: str | None = None) -> list[dict[str, Any]]:
    got = {}
    for kind, env in every_store.items():
        ids = scenario(env)
        events = stored_events(env, tenant)
        _check_ids(events)
        got[kind] = _labelled(events, ids)
    first, *others = got.values()
    for kind, events in got.items():
        assert events == first, (kind, [e["event_type"] for e in events], [e["event_type"] for e in first])
    for events in got.values():
        for e in events:
            for v in _ints(e):
                assert type(v) is int
    return first


def _ints(v: Any) -> list[Any]:
    if isinstance(v, dict):
        return [x for y in v.values() for x in _ints(y)]
    if isinstance(v, list):
        return [x for y in v for x in _ints(y)]
    return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else []


def _ledger_state(allocated: int, spent: int, reserved: int, debt: int, limit: int, over: bool,
                  status: str = "ACTIVE") -> dict[str, Any]:
    return {"allocated": allocated, "remaining": allocated - spent - reserved - debt, "reserved": reserved,
            "spent": spent, "debt": debt, "overdraft_limit": limit, "is_over_limit": over, "status": status}


def test_ledger_transition_events_are_the_same_on_every_store(every_store: dict[str, Env]) -> None:
    """exhausted, over limit entered / exited, debt incurred (int64 amounts beyond 2**53) from reserve,
    commit (with its overage event), update_budget, fund and POST /v1/events, with the request's fields."""
    D = BIG  # the debt a commit incurs
    root, ws = "tenant:acme", "tenant:acme/workspace:w"
    queued = {"journal": "event", "event_type": "budget.updated", "tenant_id": "acme", "scope": root,
              "data": {"big": INT64_MAX}}

    def scenario(env: Env) -> dict[str, str]:
        st = env.store
        setup_tenant(env, "acme", allocated=None)
        root_row = budget(env, "acme", root, BIG, overdraft_limit=BIG + 2)
        ws_row = budget(env, "acme", ws, 3 * BIG, overdraft_limit=INT64_MAX)
        sub = {"tenant": "acme", "workspace": "w"}
        env.clock.now += 1
        # a hold of all that remains: the root is exhausted (the workspace is not)
        rid = with_request(env, lambda: st.reserve(reserve_cmd("acme", BIG, subject=sub,
                                                               overage_policy="ALLOW_WITH_OVERDRAFT")),
                           "acme", 1).result["reservation_id"]
        env.clock.now += 1
        # commit BIG + D: the root takes D of debt, the workspace covers it; a queued event rides with it
        # (same instant: the journal's rows before the store's own events)
        out = with_request(env, lambda: st.commit(settle_cmd(rid, actual=BIG + D, unit=USD)), "acme", 2, queued)
        assert out.result["charged"] == BIG + D
        env.clock.now += 1
        # a lower overdraft limit puts the root over it
        with_request(env, lambda: st.update_budget("acme", root, USD, {"overdraft_limit": D - 1}), "acme", 3)
        # repaying the debt takes it out again (same millisecond: the order still follows the commits)
        with_request(env, lambda: st.fund(FundCommand("acme", root, USD, "REPAY_DEBT", D, None, key(), "h")),
                     "acme", 4)
        with_request(env, lambda: st.fund(FundCommand("acme", root, USD, "CREDIT", 5, None, key(), "h")), "acme", 5)
        env.clock.now += 1
        # an event of 7 with 5 left and overdraft: exhausted again, 2 of debt with no reservation
        k = key()
        ev = EventCommand(tenant="acme", idempotency_key=k, payload_hash="h-" + k, subject={"tenant": "acme"},
                          action={"kind": "llm", "name": "m"}, unit=USD, amount=7, scope_path=root, scopes=[root],
                          overage_policy="ALLOW_WITH_OVERDRAFT")
        assert with_request(env, lambda: st.create_event(ev), "acme", 6).result["charged"] == 7
        # a lower allocation exhausts the workspace (update_budget transitions without a request journal)
        env.run(st.update_budget("acme", ws, USD, {"allocated": 2 * BIG - 1}))
        return {rid: "rid", root_row["ledger_id"]: "ldg_root", ws_row["ledger_id"]: "ldg_ws"}

    events = _same_on_every_store(every_store, scenario, "acme")
    t0 = START_MS

    def req(n: int) -> dict[str, Any]:
        return {"request_id": f"req_{n}", "trace_id": f"{n:032x}", "source": "cycles-server",
                "actor": {"type": "api_key", "key_id": "key_caller", "source_ip": "10.0.0.1"},
                "correlation_id": f"request:req_{n}"}

    def ev(event_type: str, scope: str, data: dict[str, Any], ts: int, n: int | None) -> dict[str, Any]:
        e = {"journal": "event", "event_type": event_type, "tenant_id": "acme", "scope": scope, "data": data,
             "timestamp_ms": ts, "category": event_type.split(".")[0], "source": "cycles-server",
             "correlation_id": "event:<self>"}
        return {**e, **(req(n) if n else {})}

    over = lambda scope, debt, limit, flag: {"scope": scope, "unit": USD, "debt": debt, "overdraft_limit": limit,  # noqa: E731
                                             "is_over_limit": flag}
    want = [
        ev("budget.exhausted", root, {"scope": root, "unit": USD, **_ledger_state(BIG, 0, BIG, 0, BIG + 2, False)},
           t0 + 1, 1),
        ev("budget.updated", root, {"big": INT64_MAX}, t0 + 2, 2),  # queued by the request, written first
        ev("budget.debt_incurred", root, {"scope": root, "unit": USD, "reservation_id": "rid", "debt_incurred": D,
                                         "total_debt": D, "overdraft_limit": BIG + 2,
                                         "overage_policy": "ALLOW_WITH_OVERDRAFT"}, t0 + 2, 2),
        ev("reservation.commit_overage", "tenant:acme/workspace:w",
           {"reservation_id": "rid", "scope": "tenant:acme/workspace:w", "unit": USD, "estimated_amount": BIG,
            "actual_amount": BIG + D, "overage": D, "overage_policy": "ALLOW_WITH_OVERDRAFT", "debt_incurred": D},
           t0 + 2, 2),
        ev("budget.over_limit_entered", root, over(root, D, D - 1, True), t0 + 3, 3),
        ev("budget.over_limit_exited", root, over(root, 0, D - 1, False), t0 + 3, 4),
        ev("budget.exhausted", root, {"scope": root, "unit": USD,
                                      **_ledger_state(BIG + D + 5, BIG + D + 5, 0, 2, D - 1, False)}, t0 + 4, 6),
        ev("budget.debt_incurred", root, {"scope": root, "unit": USD, "reservation_id": None, "debt_incurred": 2,
                                         "total_debt": 2, "overdraft_limit": D - 1,
                                         "overage_policy": "ALLOW_WITH_OVERDRAFT"}, t0 + 4, 6),
        ev("budget.exhausted", ws, {"scope": ws, "unit": USD,
                                    **_ledger_state(2 * BIG - 1, 2 * BIG, 0, 0, INT64_MAX, False)}, t0 + 4, None),
    ]
    assert events == want


def test_expiry_events_with_an_injected_clock(every_store: dict[str, Env]) -> None:
    """The sweeper's expiries and those a denied reserve does first (kept although the reserve fails,
    without the failed request's fields) each have a reservation.expired from the system."""
    def scenario(env: Env) -> dict[str, str]:
        st = env.store
        setup_tenant(env, "acme", allocated=100)
        a = env.run(st.reserve(reserve_cmd("acme", 60, ttl_ms=1_000, grace_ms=0))).result["reservation_id"]
        env.clock.now += 500
        b = env.run(st.reserve(reserve_cmd("acme", 40, ttl_ms=1_000, grace_ms=500))).result["reservation_id"]
        env.run(st.extend(settle_cmd(b, extend_by_ms=1_000)))
        env.clock.now += 1_000
        assert env.run(st.expire_due(100)) == 1  # a; b is extended
        env.clock.now += 2_000
        with pytest.raises(ProtocolError) as info:
            with_request(env, lambda: st.reserve(reserve_cmd("acme", 101)), "acme", 9)
        assert info.value.code is ErrorCode.BUDGET_EXCEEDED
        assert env.run(st.get_reservation(b))["status"] == "EXPIRED"
        assert ledger(env).reserved == 0
        return {a: "a", b: "b"}

    events = _same_on_every_store(every_store, scenario, "acme")
    assert [e["event_type"] for e in events] == ["budget.exhausted", "reservation.expired", "reservation.expired"]
    assert events[0]["timestamp_ms"] == START_MS + 500  # b took what a left
    events = events[1:]
    system = {"actor": {"type": "system"}, "source": "expiry-sweeper", "category": "reservation",
              "correlation_id": "event:<self>"}
    base = {"journal": "event", "event_type": "reservation.expired", "tenant_id": "acme", "scope": "tenant:acme"}
    assert events == [
        {**base, "data": {"reservation_id": "a", "scope": "tenant:acme", "unit": USD, "estimated_amount": 60,
                          "created_at_ms": START_MS, "expired_at_ms": START_MS + 1_500, "ttl_ms": 1_000,
                          "extensions_used": 0}, **system, "timestamp_ms": START_MS + 1_500},
        {**base, "data": {"reservation_id": "b", "scope": "tenant:acme", "unit": USD, "estimated_amount": 40,
                          "created_at_ms": START_MS + 500, "expired_at_ms": START_MS + 3_500, "ttl_ms": 2_000,
                          "extensions_used": 1}, **system, "timestamp_ms": START_MS + 3_500},
    ]


def test_expiry_in_a_request_takes_its_request_fields_but_stays_from_the_system(every_store: dict[str, Env]) -> None:
    def scenario(env: Env) -> dict[str, str]:
        st = env.store
        setup_tenant(env, "acme", allocated=100)
        a = env.run(st.reserve(reserve_cmd("acme", 100, ttl_ms=1_000, grace_ms=0))).result["reservation_id"]
        env.clock.now += 2_000
        # a decide that would be denied expires the overdue lease first, then allows
        out = with_request(env, lambda: st.reserve(reserve_cmd("acme", 50, endpoint="decide")), "acme", 3)
        assert out.result["decision"] == "ALLOW"
        return {a: "a"}

    events = _same_on_every_store(every_store, scenario, "acme")
    assert [e["event_type"] for e in events] == ["budget.exhausted", "reservation.expired"]
    expired = events[1]
    assert expired["actor"] == {"type": "system"} and expired["source"] == "expiry-sweeper"
    assert (expired["request_id"], expired["trace_id"]) == ("req_3", f"{3:032x}")
    assert "request_id" not in events[0] and "actor" not in events[0]


def test_rollover_event_is_the_same_on_every_store(every_store: dict[str, Env]) -> None:
    end = START_MS + 1_000

    def scenario(env: Env) -> dict[str, str]:
        st = env.store
        setup_tenant(env, "acme", allocated=None)
        extra = {"rollover_policy": "CARRY_FORWARD", "period_start": "2026-01-01T00:00:00Z",
                 "period_end": "2026-01-01T00:00:01Z", "period_end_ms": end, "period_allocation": BIG}
        row = budget(env, "acme", "tenant:acme", BIG, overdraft_limit=10, extra=extra)
        rid = env.run(st.reserve(reserve_cmd("acme", 3))).result["reservation_id"]
        env.run(st.commit(settle_cmd(rid, actual=BIG - 7, unit=USD)))  # 4 over the 3 held, 7 left... remaining 7
        env.clock.now = end
        period = {"period_start": "2026-01-01T00:00:01Z", "period_end": "2026-01-01T00:00:02Z",
                  "period_end_ms": end + 1_000, "period_index": 1}
        out = env.run(st.rollover_budget("acme", "tenant:acme", USD, end, period))
        assert out is not None and out["after"].allocated == BIG + 7
        assert env.run(st.rollover_budget("acme", "tenant:acme", USD, end, period)) is None  # exactly once
        return {rid: "rid", row["ledger_id"]: "ldg"}

    events = _same_on_every_store(every_store, scenario, "acme")
    assert [e["event_type"] for e in events] == ["reservation.commit_overage", "budget.reset_spent"]
    reset = events[1]
    assert reset["data"] == {
        "ledger_id": "ldg", "scope": "tenant:acme", "unit": USD, "operation": "ROLLOVER",
        "rollover_policy": "CARRY_FORWARD", "previous_state": _ledger_state(BIG, BIG - 7, 0, 0, 10, False),
        "new_state": _ledger_state(BIG + 7, 0, 0, 0, 10, False), "period_start": "2026-01-01T00:00:01Z",
        "period_end": "2026-01-01T00:00:02Z"}
    assert reset["timestamp_ms"] == end and "actor" not in reset


def test_cascade_events_are_the_same_on_every_store(every_store: dict[str, Env]) -> None:
    closed_at = "2026-01-02T00:00:00.000Z"
    corr = f"tenant_close_cascade:acme:{closed_at}"
    keys = [{"key_id": "key_b", "key_prefix": "cyc_pb", "name": "b"},
            {"key_id": "key_a", "key_prefix": "cyc_pa", "name": None},
            {"key_id": "key_c", "key_prefix": "cyc_pc", "name": "c", "status": "REVOKED"}]

    def scenario(env: Env) -> dict[str, str]:
        st = env.store
        setup_tenant(env, "acme", allocated=BIG)
        rows = [env.run(st.get_budget("acme", "tenant:acme", USD)),
                budget(env, "acme", "tenant:acme/workspace:w", BIG),
                budget(env, "acme", "tenant:acme/app:x", 100, unit="TOKENS")]
        env.run(st.update_budget("acme", "tenant:acme/app:x", "TOKENS", {"status": "FROZEN"}))
        sub = {"tenant": "acme", "workspace": "w"}
        for amount in (BIG // 2, BIG // 2 - 1, 1):  # released in this order (by deadline on Redis)
            env.run(st.reserve(reserve_cmd("acme", amount, subject=sub)))
            env.clock.now += 1
        for k in keys:
            api_key(env, "acme", **k)
        env.run(st.save_doc("webhook", "acme", "w2", {"subscription_id": "w2", "status": "ACTIVE"}, None))
        env.run(st.save_doc("webhook", "acme", "w1", {"subscription_id": "w1", "status": "PAUSED"}, None))
        env.run(st.save_doc("webhook", "acme", "w3", {"subscription_id": "w3", "status": "DISABLED"}, None))
        env.run(st.update_tenant("acme", {"status": "CLOSED"}, closed_at))
        env.clock.now += 1_000
        assert env.run(st.cascade_close("acme", 2)) is False
        env.clock.now += 1_000
        assert env.run(st.cascade_close("acme", 2)) is True
        return {r["ledger_id"]: f"ldg{i}" for i, r in enumerate(rows)}

    events = _same_on_every_store(every_store, scenario, "acme")
    cascade = [e for e in events if e.get("correlation_id")]
    assert all(e["correlation_id"] == corr and e["data"]["cascade_reason"] == "tenant_closed" for e in cascade)
    assert [(e["event_type"], e["scope"]) for e in cascade] == [
        ("reservation.released_via_tenant_cascade", "tenant:acme"),
        ("reservation.released_via_tenant_cascade", "tenant:acme/workspace:w"),
        ("reservation.released_via_tenant_cascade", "tenant:acme"),
        ("reservation.released_via_tenant_cascade", "tenant:acme/workspace:w"),
        ("budget.closed_via_tenant_cascade", "tenant:acme"),
        ("budget.closed_via_tenant_cascade", "tenant:acme/app:x"),
        ("budget.closed_via_tenant_cascade", "tenant:acme/workspace:w"),
        ("api_key.revoked_via_tenant_cascade", None),
        ("api_key.revoked_via_tenant_cascade", None),
        ("webhook.disabled_via_tenant_cascade", None),
        ("webhook.disabled_via_tenant_cascade", None),
    ]
    assert [e["data"]["released_amount"] for e in cascade[:4]] == [BIG - 2, BIG - 2, 1, 1]
    assert cascade[0]["timestamp_ms"] == START_MS + 1_003 and cascade[2]["timestamp_ms"] == START_MS + 2_003
    assert [e["data"] for e in cascade[4:]] == [
        {"ledger_id": "ldg0", "scope": "tenant:acme", "unit": USD, "prior_status": "ACTIVE", "new_status": "CLOSED",
         "cascade_reason": "tenant_closed"},
        {"ledger_id": "ldg2", "scope": "tenant:acme/app:x", "unit": "TOKENS", "prior_status": "FROZEN",
         "new_status": "CLOSED", "cascade_reason": "tenant_closed"},
        {"ledger_id": "ldg1", "scope": "tenant:acme/workspace:w", "unit": USD, "prior_status": "ACTIVE",
         "new_status": "CLOSED", "cascade_reason": "tenant_closed"},
        {"key_id": "key_a", "name": None, "prior_status": "ACTIVE", "new_status": "REVOKED",
         "cascade_reason": "tenant_closed"},
        {"key_id": "key_b", "name": "b", "prior_status": "ACTIVE", "new_status": "REVOKED",
         "cascade_reason": "tenant_closed"},
        {"subscription_id": "w1", "prior_status": "PAUSED", "new_status": "DISABLED", "cascade_reason": "tenant_closed"},
        {"subscription_id": "w2", "prior_status": "ACTIVE", "new_status": "DISABLED", "cascade_reason": "tenant_closed"},
    ]
    for kind, env in every_store.items():  # readable one by one, and through the correlation filter's source
        for e in stored_events(env, "acme"):
            assert env.run(env.store.get_event(e["event_id"])) == e
