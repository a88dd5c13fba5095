"""Derived events (cycles.events): threshold crossings with hysteresis and per-subscription thresholds,
burn-rate anomalies, rate spikes, expired keys, high latency and store outages, on every store with an
injected clock; each condition is emitted exactly once when several processes race."""

from __future__ import annotations

import asyncio
import secrets
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import STORES
from cycles.core import scopes as S
from cycles.events import Analyzer, StoreHealthWatcher, parse_config, run_analyzers, subscription_wants
from cycles.events.analyzer import value_at
from cycles.store.base import AuditScan, EventCommand, FundCommand, ReserveCommand, SettleCommand, Store

TOK = "TOKENS"
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary
MIN = 60_000
ANALYZER_TYPES = ("budget.threshold_crossed", "budget.burn_rate_anomaly", "reservation.denial_rate_spike",
                  "reservation.expiry_rate_spike", "api_key.auth_failure_rate_spike", "api_key.expired",
                  "system.high_latency", "system.store_connection_lost", "system.store_connection_restored")


class Clock:
    def __init__(self) -> None:
        self.now = START_MS

    def __call__(self) -> int:
        return self.now


class Env:
    def __init__(self, kind: str, store: Store, clock: Clock) -> None:
        self.kind, self.store, self.clock = kind, store, clock
        self.loop = asyncio.new_event_loop()
        self._keys = iter(range(10**9))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def gather(self, *coros: Any) -> list[Any]:
        async def all_of() -> list[Any]:
            return list(await asyncio.gather(*coros))

        return self.run(all_of())

    def advance(self, ms: int) -> None:
        self.clock.now += ms

    # ---- setup ----

    def tenant(self, name: str | None = None) -> str:
        tid = name or "an-" + secrets.token_hex(4)
        self.run(self.store.create_tenant({"tenant_id": tid, "name": tid, "status": "ACTIVE",
                                           "default_commit_overage_policy": "ALLOW_IF_AVAILABLE"}))
        return tid

    def budget(self, tenant: str, allocated: int, scope: str | None = None) -> str:
        scope = scope or f"tenant:{tenant}"
        self.run(self.store.create_budget({"tenant_id": tenant, "scope": scope, "unit": TOK, "allocated": allocated,
                                           "overdraft_limit": 0, "commit_overage_policy": None, "extra": {}}))
        return scope

    def key(self) -> str:
        return f"k-{next(self._keys)}"

    def spend(self, tenant: str, amount: int, subject: dict[str, str] | None = None) -> None:
        """Spend directly (an event: no reservation)."""
        subject = subject or {"tenant": tenant}
        path, scopes = S.derive(subject)
        k = self.key()
        out = self.run(self.store.create_event(EventCommand(tenant, k, "h-" + k, subject, {"kind": "llm", "name": "m"},
                                                            TOK, amount, path, scopes)))
        assert out.result.get("status") in (None, "APPLIED"), out.result

    def spend_reserved(self, tenant: str, amount: int) -> None:
        """Spend through reserve + commit."""
        path, scopes = S.derive({"tenant": tenant})
        k = self.key()
        out = self.run(self.store.reserve(ReserveCommand(
            tenant=tenant, endpoint="reserve", idempotency_key=k, payload_hash="h-" + k, subject={"tenant": tenant},
            action={"kind": "llm", "name": "m"}, unit=TOK, amount=amount, scope_path=path, scopes=scopes,
            ttl_ms=60_000)))
        assert out.result["decision"] == "ALLOW", out.result
        k = self.key()
        self.run(self.store.commit(SettleCommand(tenant=tenant, reservation_id=out.result["reservation_id"],
                                                 idempotency_key=k, payload_hash="h-" + k, actual=amount, unit=TOK)))

    def fund(self, tenant: str, operation: str, amount: int, spent: int | None = None) -> None:
        k = self.key()
        self.run(self.store.fund(FundCommand(tenant, f"tenant:{tenant}", TOK, operation, amount, spent, k, "h-" + k)))

    def ledger(self, tenant: str) -> Any:
        return self.run(self.store.get_budget(tenant, f"tenant:{tenant}", TOK))["ledger"]

    def config(self, **fields: Any) -> None:
        doc = self.run(self.store.get_doc("config", "analyzer"))
        self.run(self.store.save_doc("config", "__system__", "analyzer", {**(doc or {}), **fields},
                                     doc["version"] if doc else None, guard_tenant=False))

    def webhook(self, owner: str, event_types: list[str], thresholds: dict[str, Any] | None = None,
                scope_filter: str | None = None, **kw: Any) -> dict[str, Any]:
        sid = "whsub_" + secrets.token_hex(12)
        rec = {"subscription_id": sid, "tenant_id": owner, "url": "https://example.com/hook",
               "event_types": event_types, "event_categories": [], "scope_filter": scope_filter,
               "thresholds": thresholds, "status": "ACTIVE", **kw}
        return self.run(self.store.save_doc("webhook", owner, sid, rec, None, guard_tenant=False))

    # ---- running and reading ----

    def analyze(self, *analyzers: Analyzer, **kw: Any) -> int:
        """One sweep: each given Analyzer stands for one server process, racing the others."""
        procs = analyzers or (Analyzer(),)
        return sum(self.gather(*(a.run(self.store, **kw) for a in procs)))

    def events(self, event_type: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        rows = self.run(self.store.scan_events(AuditScan(tenant=tenant, descending=False, limit=100_000)))
        return [e for e in rows if (event_type is None and e["event_type"] in ANALYZER_TYPES)
                or e["event_type"] == event_type]

    def crossings(self, tenant: str) -> list[tuple[float, str]]:
        rows = self.events("budget.threshold_crossed", tenant)
        return [(e["data"]["threshold"], e["data"]["direction"]) for e in rows]


@pytest.fixture(params=STORES)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    clock = Clock()
    if request.param == "sqlite":
        from cycles.store.sqlite import SQLiteStore

        store: Store = SQLiteStore(str(tmp_path / "analyzer.db"), synchronous="OFF", clock=clock)
    elif request.param == "redis-cluster":
        from redis_support import flush_cluster

        from cycles.store.redis_cluster import RedisClusterStore

        url = request.getfixturevalue("store_cluster_url")
        flush_cluster(url)
        store = RedisClusterStore(url, clock=clock)
    else:
        import redis as redis_py

        from cycles.store.redis import RedisStore

        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/12"
        redis_py.Redis.from_url(url).flushdb()
        store = RedisStore(url, clock=clock)
    e = Env(request.param, store, clock)
    try:
        yield e
    finally:
        try:
            e.run(store.close())
        finally:
            e.loop.close()


class Racing:
    """A store seen by one of several racing processes: every document write waits until each
    process reached its own write, so all of them read the same state first (a real race, every
    time). A process that has no write to make lets the others go after a short wait."""

    def __init__(self, store: Store, barrier: asyncio.Barrier) -> None:
        self._store, self._barrier = store, barrier

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def save_doc(self, *args: Any, **kw: Any) -> Any:
        try:
            await asyncio.wait_for(self._barrier.wait(), 1.0)
        except (asyncio.TimeoutError, asyncio.BrokenBarrierError):
            pass
        return await self._store.save_doc(*args, **kw)


def racing(env: Env, n: int) -> list[Any]:
    async def make() -> asyncio.Barrier:
        return asyncio.Barrier(n)

    barrier = env.run(make())
    return [Racing(env.store, barrier) for _ in range(n)]


def race(env: Env, n: int = 3, **kw: Any) -> int:
    """n processes (own pacing, own view of the store) run one sweep at once."""
    stores = racing(env, n)
    return sum(env.gather(*(Analyzer().run(s, **kw) for s in stores)))  # type: ignore[arg-type]


# ---- budget.threshold_crossed ----

def test_thresholds_cross_once_and_rearm_after_a_reset(env: Env) -> None:
    t = env.tenant()
    env.budget(t, 1000)
    proc = Analyzer()
    env.spend(t, 790)
    assert env.analyze(proc) == 0
    env.spend(t, 10)  # exactly 0.8
    env.advance(5_000)
    assert env.analyze(proc) == 1
    ev = env.events("budget.threshold_crossed", t)[0]
    assert ev["tenant_id"] == t and ev["scope"] == f"tenant:{t}" and ev["category"] == "budget"
    assert ev["actor"] == {"type": "system"} and ev["source"] == "anomaly-detector" and ev["correlation_id"]
    assert ev["data"] == {"scope": f"tenant:{t}", "unit": TOK, "threshold": 0.8, "direction": "rising",
                          "utilization": 0.8, "allocated": 1000, "remaining": 200, "spent": 800, "reserved": 0}
    for _ in range(3):  # still above: nothing more
        env.advance(5_000)
        assert env.analyze(proc) == 0
    env.advance(1_000)
    assert env.analyze(proc) == 0  # paced: not due yet (and nothing to emit anyway)
    # through reserve + commit: 0.95 and 1.0 at once, one event each
    env.spend_reserved(t, 200)
    env.advance(5_000)
    assert env.analyze(proc) == 2
    assert env.crossings(t) == [(0.8, "rising"), (0.95, "rising"), (1.0, "rising")]
    # RESET to 1040: utilization 1000/1040 = 0.9615 — still within 5 points of 1.0: nothing re-arms
    env.fund(t, "RESET", 1040)
    env.advance(5_000)
    assert env.analyze(proc) == 0
    # RESET to 1100: 0.909 < 0.95 (1.0 re-arms, falling) but not below 0.90 (0.95 stays fired)
    env.fund(t, "RESET", 1100)
    env.advance(5_000)
    assert env.analyze(proc) == 1
    assert env.crossings(t)[-1] == (1.0, "falling")
    # a new period: spent back to 0, everything still fired re-arms (falling, highest first)
    env.fund(t, "RESET_SPENT", 1000, spent=0)
    env.advance(5_000)
    assert env.analyze(proc) == 2
    assert env.crossings(t)[-2:] == [(0.95, "falling"), (0.8, "falling")]
    env.spend(t, 850)
    env.advance(5_000)
    assert env.analyze(proc) == 1
    assert env.crossings(t)[-1] == (0.8, "rising")
    assert len(env.crossings(t)) == 7


def test_per_subscription_thresholds_and_scope_filters(env: Env) -> None:
    t, other = env.tenant(), env.tenant()
    env.budget(t, 1000)
    team = env.budget(t, 100, scope=f"tenant:{t}/workspace:ops")
    env.budget(other, 1000)
    half = env.webhook(t, ["budget.threshold_crossed"], {"budget_utilization": [0.5]})
    scoped = env.webhook(t, ["budget.threshold_crossed"], {"budget_utilization": [0.3]}, scope_filter=team)
    system = env.webhook("__system__", [], {"budget_utilization": [0.6]}, event_categories=["budget"])
    plain = env.webhook(t, ["budget.threshold_crossed"])
    env.webhook(t, ["budget.threshold_crossed"], {"budget_utilization": [0.4]}, status="DISABLED")
    env.webhook(t, ["budget.exhausted"], {"budget_utilization": [0.2]})  # does not select the event
    env.spend(t, 650)  # tenant scope 0.65 (the workspace budget is untouched)
    env.spend(other, 450)  # 0.45: another tenant's subscriptions do not apply
    assert env.analyze() == 2
    assert env.crossings(t) == [(0.5, "rising"), (0.6, "rising")]
    assert env.crossings(other) == []
    env.spend(t, 35, subject={"tenant": t, "workspace": "ops"})  # ops 0.35, tenant 0.685
    assert env.analyze() == 1
    ev = env.events("budget.threshold_crossed", t)[-1]
    assert ev["scope"] == team and ev["data"]["threshold"] == 0.3
    # the dispatcher's filter: each subscription gets the thresholds it asked for
    rising = env.events("budget.threshold_crossed", t)
    assert [subscription_wants(half, e) for e in rising] == [True, False, False]
    assert [subscription_wants(system, e) for e in rising] == [False, True, False]
    assert [subscription_wants(scoped, e) for e in rising] == [False, False, True]
    assert [subscription_wants(plain, e) for e in rising] == [False, False, False]
    # the server's default set still applies without any subscription asking
    env.spend(t, 150)
    assert env.analyze() == 1 and env.crossings(t)[-1] == (0.8, "rising")
    assert subscription_wants(plain, env.events("budget.threshold_crossed", t)[-1])


def test_the_utilization_basis_can_count_reservations(env: Env) -> None:
    t = env.tenant()
    env.budget(t, 100)
    path, scopes = S.derive({"tenant": t})
    env.run(env.store.reserve(ReserveCommand(
        tenant=t, endpoint="reserve", idempotency_key="r", payload_hash="h", subject={"tenant": t},
        action={"kind": "k", "name": "n"}, unit=TOK, amount=85, scope_path=path, scopes=scopes, ttl_ms=600_000)))
    assert env.analyze() == 0  # spent / allocated = 0 (the default basis)
    env.config(utilization_basis="spent_plus_reserved")
    assert env.analyze() == 1
    assert env.events("budget.threshold_crossed", t)[0]["data"]["utilization"] == 0.85


def test_every_budget_is_read_page_by_page(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from cycles.events import analyzer

    monkeypatch.setattr(analyzer, "BUDGET_PAGE", 2)
    tenants = [env.tenant(), env.tenant()]
    for t in tenants:
        env.budget(t, 100)
        for ws in ("a", "b"):
            env.budget(t, 100, scope=f"tenant:{t}/workspace:{ws}")
            env.spend(t, 40, subject={"tenant": t, "workspace": ws})  # 0.4 per workspace, 0.8 for the tenant
    assert env.analyze() == 2
    assert sorted(e["scope"] for e in env.events("budget.threshold_crossed")) == sorted(f"tenant:{t}" for t in tenants)


# ---- budget.burn_rate_anomaly ----

def test_burn_rate_anomaly_with_projected_exhaustion(env: Env) -> None:
    t = env.tenant()
    env.budget(t, 100_000)
    proc = Analyzer()
    t0 = env.clock.now
    for minute in range(30):  # 30 minutes at 100 per minute: the baseline (minute m's sample: 100 * (m + 1))
        env.spend(t, 100)
        env.clock.now = t0 + minute * MIN
        assert env.analyze(proc) == 0
    # minute 30: 4000; window [25, 30]: 4000 - 2600 = 1400 → 280/min, not yet 3 × 100/min
    env.spend(t, 1000)
    env.clock.now = t0 + 30 * MIN
    assert env.analyze(proc) == 0
    # minute 31: 5000; window [26, 31]: 5000 - 2700 = 2300 → 460/min; baseline [0, 26]: (2700 - 100) / 26 = 100/min
    env.spend(t, 1000)
    env.clock.now = t0 + 31 * MIN
    assert env.analyze(proc) == 1
    (ev,) = env.events("budget.burn_rate_anomaly", t)
    d = ev["data"]
    assert d["current_rate"] == 460.0 and d["baseline_rate"] == 100.0 and d["multiplier"] == 4.6
    assert d["window_seconds"] == 300 and d["scope"] == f"tenant:{t}" and d["unit"] == TOK
    led = env.ledger(t)
    assert led.remaining == 95_000
    assert d["projected_exhaustion_minutes"] == 95_000 * 5 // 2300 == 206  # remaining / rate, integer math
    assert ev["actor"] == {"type": "system"} and ev["source"] == "anomaly-detector"
    # it goes on: one anomaly per budget per hour
    for minute in range(32, 60):
        env.spend(t, 1000)
        env.clock.now = t0 + minute * MIN
        assert env.analyze(proc) == 0
    assert len(env.events("budget.burn_rate_anomaly", t)) == 1


def test_burn_rate_baseline_restarts_after_a_reset_and_small_spend_is_ignored(env: Env) -> None:
    t = env.tenant()
    env.budget(t, 1_000_000)
    proc = Analyzer()
    t0 = env.clock.now
    for minute in range(40):
        env.spend(t, 10 if minute < 30 else 400)  # a 40× jump, but 2000 per window is < 1% of the allocation
        env.clock.now = t0 + minute * MIN
        assert env.analyze(proc) == 0
    env.fund(t, "RESET_SPENT", 1_000_000, spent=0)
    for minute in range(40, 50):  # a big jump right after the reset: no history yet, no anomaly
        env.spend(t, 10 if minute < 45 else 50_000)
        env.clock.now = t0 + minute * MIN
        assert env.analyze(proc) == 0
    doc = env.run(env.store.get_doc("analyzer-burn", f"burn|{t}|tenant:{t}|{TOK}"))
    assert doc["samples"][0] == [t0 + 40 * MIN, 10]  # the ring started over at the reset


def test_value_at_interpolates_between_samples() -> None:
    samples = [[0, 0], [60, 600], [120, 600]]
    assert value_at(samples, -1) is None
    assert value_at(samples, 30) == 300 and value_at(samples, 60) == 600 and value_at(samples, 500) == 600
    assert value_at([[0, 0], [90, 10]], 30) == Fraction(10, 3)


# ---- rate spikes ----

def journal_events(env: Env, event_type: str, tenant: str, n: int) -> None:
    env.run(env.store.append_journal([{"journal": "event", "event_type": event_type, "tenant_id": tenant,
                                       "scope": f"tenant:{tenant}", "data": {"n": i}} for i in range(n)]))


def test_rate_spikes_per_tenant_and_system_wide(env: Env) -> None:
    a, b = env.tenant(), env.tenant()
    proc = Analyzer()
    journal_events(env, "reservation.denied", a, 50)
    journal_events(env, "reservation.denied", b, 49)
    journal_events(env, "reservation.expired", a, 30)
    journal_events(env, "api_key.auth_failed", "__system__", 12)
    journal_events(env, "api_key.auth_failed", a, 8)  # auth failures count system-wide
    env.advance(1_000)
    assert env.analyze(proc) == 2
    (spike,) = env.events("reservation.denial_rate_spike")
    assert spike["tenant_id"] == a and spike["category"] == "reservation" and spike["source"] == "anomaly-detector"
    assert spike["data"] == {"metric": "denial_rate", "current_rate": 10.0, "threshold_rate": 10.0,
                             "window_seconds": 300, "sample_count": 50}
    (auth,) = env.events("api_key.auth_failure_rate_spike")
    assert auth["tenant_id"] == "__system__" and auth["data"]["sample_count"] == 20
    assert env.events("reservation.expiry_rate_spike") == []
    # one spike event per window, however long it lasts
    journal_events(env, "reservation.denied", a, 10)
    env.advance(15_000)
    assert env.analyze(proc) == 0
    # configurable thresholds and window (config document)
    env.config(expiry_spike_threshold=25, denial_spike_threshold=60)
    env.advance(15_000)
    assert env.analyze(Analyzer()) == 1
    assert env.events("reservation.expiry_rate_spike")[0]["data"]["threshold_rate"] == 5.0
    # the window rolls on: what was counted falls out of it
    env.advance(5 * MIN)
    assert env.analyze(proc) == 0
    journal_events(env, "reservation.denied", b, 60)
    env.advance(15_000)
    assert env.analyze(proc) == 1 and env.events("reservation.denial_rate_spike")[-1]["tenant_id"] == b


def test_rate_counts_read_incrementally_count_each_event_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from cycles.events import analyzer

    monkeypatch.setattr(analyzer, "EVENT_PAGE", 3)  # the event log is read page by page
    a = env.tenant()
    env.config(denial_spike_threshold=15)
    proc = Analyzer()
    journal_events(env, "reservation.denied", a, 10)
    assert env.analyze(proc) == 0
    journal_events(env, "reservation.denied", a, 4)  # the same millisecond as the last read
    for _ in range(3):  # read again and again through the look-back: still 14
        env.advance(15_000)
        assert env.analyze(proc) == 0
    journal_events(env, "reservation.denied", a, 1)
    env.advance(15_000)
    assert env.analyze(proc) == 1
    assert env.events("reservation.denial_rate_spike")[0]["data"]["sample_count"] == 15
    # the first 14 left the window: 15 counted again, but one spike per window
    env.advance(5 * MIN - 44_000)
    journal_events(env, "reservation.denied", a, 14)
    env.advance(15_000)
    assert env.analyze(proc) == 0
    assert proc.rolling.rows and len(proc.rolling.rows) == 15


# ---- api_key.expired ----

def api_key(env: Env, tenant: str, expires_at_ms: int, status: str = "ACTIVE") -> str:
    key_id = "key_" + secrets.token_hex(8)
    env.run(env.store.create_api_key({
        "key_id": key_id, "key_prefix": "cyc_" + secrets.token_hex(6), "tenant_id": tenant, "name": "ci " + key_id,
        "description": None, "permissions": ["reservations:create"], "scope_filter": [], "status": status,
        "created_at": "2026-01-01T00:00:00.000Z", "expires_at": "x", "expires_at_ms": expires_at_ms,
        "metadata": None, "secret_hash": "x"}))
    return key_id


def test_api_key_expired_once(env: Env) -> None:
    t = env.tenant()
    proc = Analyzer()
    soon = api_key(env, t, env.clock.now + 10_000)
    api_key(env, t, env.clock.now + 10_000, status="REVOKED")
    api_key(env, t, env.clock.now - 30 * 86_400_000)  # expired long before: outside the look-back
    api_key(env, t, env.clock.now + 86_400_000)
    assert env.analyze(proc) == 0
    env.advance(31_000)
    assert env.analyze(proc) == 1
    (ev,) = env.events("api_key.expired")
    assert ev["tenant_id"] == t and ev["category"] == "api_key" and "scope" not in ev
    assert ev["data"] == {"key_id": soon, "key_name": f"ci {soon}", "previous_status": "ACTIVE",
                          "new_status": "EXPIRED", "permissions": ["reservations:create"]}
    for _ in range(3):
        env.advance(31_000)
        assert env.analyze(proc) + env.analyze(Analyzer()) == 0


# ---- system.high_latency ----

def test_high_latency_once_per_ten_minutes(env: Env) -> None:
    a, b = Analyzer(), Analyzer()  # two processes, each measuring its own p99
    assert env.analyze(a, latency=800.0) == 0
    assert env.analyze(a, latency=1500.0) == 1
    env.advance(MIN)
    assert env.analyze(b, latency=6000.0) == 0  # the other process: within the cooldown too
    (ev,) = env.events("system.high_latency")
    assert ev["tenant_id"] == "__system__" and ev["category"] == "system"
    assert ev["data"]["severity"] == "warning" and ev["data"]["details"]["p99_ms"] == 1500.0
    assert ev["data"]["component"] == "server" and "1500" in ev["data"]["message"]
    env.advance(10 * MIN)
    assert env.analyze(b, latency=6000.0) == 1
    assert env.events("system.high_latency")[-1]["data"]["severity"] == "critical"
    env.advance(11 * MIN)
    assert env.analyze(a, latency=None) == 0 and env.analyze(a, latency=999.0) == 0


# ---- exactly once across processes ----

def test_exactly_once_when_processes_race(env: Env) -> None:
    t, u = env.tenant(), env.tenant()
    env.budget(t, 1000)
    env.budget(u, 1000)
    env.spend(t, 960)
    env.spend(u, 500)
    api_key(env, t, env.clock.now - 1000)
    journal_events(env, "reservation.denied", u, 55)
    env.advance(1000)
    emitted = race(env, 3, latency=2000.0)
    # 0.8 and 0.95 for t, one key, one denial spike, one latency alert
    assert emitted == 5
    assert len(env.events()) == 5
    assert env.crossings(t) == [(0.8, "rising"), (0.95, "rising")]
    # the same sweep from every process in turn changes nothing
    env.advance(60_000)
    assert race(env, 3, latency=2000.0) == 0
    # the default pacing of one process: two sweeps gathered run once
    env.spend(u, 460)
    env.advance(60_000)
    assert sum(env.gather(run_analyzers(env.store), run_analyzers(env.store))) == 2
    assert env.crossings(u) == [(0.8, "rising"), (0.95, "rising")]
    assert len(env.events()) == 7


def test_exactly_once_burn_rate_when_processes_race(env: Env) -> None:
    t = env.tenant()
    env.budget(t, 100_000)
    t0 = env.clock.now
    procs = [Analyzer(), Analyzer()]
    for minute in range(40):
        env.spend(t, 100 if minute < 35 else 3000)
        env.clock.now = t0 + minute * MIN
        stores = racing(env, 2)
        env.gather(*(p.run(s) for p, s in zip(procs, stores)))  # type: ignore[arg-type]
    assert len(env.events("budget.burn_rate_anomaly", t)) == 1
    doc = env.run(env.store.get_doc("analyzer-burn", f"burn|{t}|tenant:{t}|{TOK}"))
    assert len(doc["samples"]) == 40  # one sample per minute, not one per process


# ---- store health ----

def test_store_outage_reported_once_by_the_processes_that_saw_it(env: Env) -> None:
    a, b = StoreHealthWatcher(), StoreHealthWatcher()
    t0 = START_MS
    assert env.run(a.observe(env.store, True, t0)) == 0
    assert env.run(a.observe(env.store, False, t0 + 1000)) == 0
    assert env.run(b.observe(env.store, False, t0 + 1500)) == 0
    assert env.run(a.observe(env.store, False, t0 + 2000)) == 0  # still down: the start stays
    stores = racing(env, 2)
    counts = env.gather(a.observe(stores[0], True, t0 + 31_000),  # type: ignore[arg-type]
                                    b.observe(stores[1], True, t0 + 31_200))  # type: ignore[arg-type]
    assert sorted(counts) == [0, 2]
    lost, restored = env.events()
    assert (lost["event_type"], restored["event_type"]) == ("system.store_connection_lost",
                                                            "system.store_connection_restored")
    assert lost["tenant_id"] == restored["tenant_id"] == "__system__"
    assert lost["correlation_id"] == restored["correlation_id"]
    assert lost["data"]["severity"] == "critical" and restored["data"]["severity"] == "info"
    assert lost["data"]["component"] == "store"
    winner_lost = lost["data"]["details"]["lost_at_ms"]
    assert winner_lost in (t0 + 1000, t0 + 1500)
    details = restored["data"]["details"]
    assert details["outage_duration_ms"] == details["restored_at_ms"] - winner_lost
    assert lost["data"]["details"]["lost_at"].startswith("2026-01-01T00:00:0")
    # a process that saw the same outage later (its health check ran later) adds nothing
    assert env.run(b.observe(env.store, True, t0 + 40_000)) == 0
    # the next outage is a new one
    assert env.run(b.observe(env.store, False, t0 + 100_000)) == 0
    assert env.run(b.observe(env.store, True, t0 + 105_000)) == 2
    assert env.events()[-1]["data"]["details"]["outage_duration_ms"] == 5000
    assert len(env.events()) == 4


def test_store_outage_reported_after_a_failed_write(env: Env) -> None:
    from cycles.protocol.errors import StoreUnavailable

    class Down:
        async def get_doc(self, *a: Any) -> Any:
            raise StoreUnavailable("down")

    w = StoreHealthWatcher()
    env.run(w.observe(env.store, False, START_MS))
    assert env.run(w.observe(Down(), True, START_MS + 500)) == 0  # type: ignore[arg-type]
    assert env.run(w.observe(env.store, True, START_MS + 900)) == 2
    assert env.events()[-1]["data"]["details"]["outage_duration_ms"] == 900


# ---- configuration ----

def test_config_document_values_are_checked() -> None:
    cfg = parse_config({"default_thresholds": [0.5, 0.9, 0.5], "burn_rate_multiplier": 1.2, "rate_window_seconds": 600,
                        "denial_spike_threshold": "many", "threshold_hysteresis": "1/10", "version": 3,
                        "utilization_basis": "spent_plus_reserved", "latency_threshold_ms": True})
    assert cfg.default_thresholds == (Fraction(1, 2), Fraction(9, 10))
    assert cfg.burn_rate_multiplier == 3  # below the spec's minimum 1.5: default kept
    assert cfg.rate_window_ms == 600_000 and cfg.threshold_hysteresis == Fraction(1, 10)
    assert cfg.denial_spike_threshold == 50 and cfg.latency_threshold_ms == 1000
    assert cfg.utilization_basis == "spent_plus_reserved"
    assert sorted(cfg.ignored) == ["burn_rate_multiplier", "denial_spike_threshold", "latency_threshold_ms"]


def test_subscription_wants_burn_rate_by_multiplier() -> None:
    ev = {"event_type": "budget.burn_rate_anomaly", "data": {"multiplier": 4.6}}
    assert subscription_wants({"thresholds": None}, ev)
    assert subscription_wants({"thresholds": {"burn_rate_multiplier": 4.5}}, ev)
    assert not subscription_wants({"thresholds": {"burn_rate_multiplier": 5.0}}, ev)
    assert subscription_wants({"thresholds": {"burn_rate_multiplier": 5.0}},
                              {"event_type": "budget.burn_rate_anomaly", "data": {}})  # from a zero baseline
    assert subscription_wants({"thresholds": {"budget_utilization": [0.5]}}, {"event_type": "budget.exhausted"})
