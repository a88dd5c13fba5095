"""Budget periods: calendar arithmetic, the rollover policies, exactly-once rollover by the
scheduler with an injected clock on every store, and catch-up through a real server."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cycles.core import periods
from cycles.core.ledger import Ledger, rollover
from cycles.server.params import iso, parse_iso
from cycles.server.scheduler import roll_due
from cycles.store.base import AuditScan, FundCommand, ReserveCommand, reset_journal, start_journal

from support import Server, Tenant

TOK = "TOKENS"
DAY = 86_400_000


def ms(text: str) -> int:
    return parse_iso(text, "t")


# ---- calendar ----

def test_monthly_periods_follow_the_local_calendar_across_dst_and_short_months() -> None:
    anchor = ms("2026-01-31T00:00:00+01:00")  # midnight, Paris
    first_end = periods.boundary(anchor, anchor, 1, "MONTHLY", "Europe/Paris")
    assert first_end == ms("2026-02-28T00:00:00+01:00")
    # the 31st comes back when the month has one, and local midnight survives the DST switch
    assert periods.boundary(anchor, first_end, 2, "MONTHLY", "Europe/Paris") == ms("2026-03-31T00:00:00+02:00")
    assert periods.boundary(anchor, first_end, 12, "MONTHLY", "Europe/Paris") == ms("2027-01-31T00:00:00+01:00")


def test_fixed_length_periods_and_validation() -> None:
    start = ms("2026-05-01T00:00:00Z")
    assert periods.boundary(start, start + 3 * DAY, 4, None, None) == start + 12 * DAY
    assert periods.boundary(start, start, 1, "WEEKLY", "UTC") == start + 7 * DAY
    with pytest.raises(periods.PeriodError):
        periods.validate(start, start, None, None)
    with pytest.raises(periods.PeriodError):
        periods.validate(start, start + DAY, None, "Mars/Olympus")
    with pytest.raises(periods.PeriodError):
        periods.validate(start, start + 2 * DAY, "DAILY", "UTC")


@pytest.mark.parametrize("policy,expected", [("NONE", 100), ("CARRY_FORWARD", 160), ("CAP_AT_ALLOCATED", 160)])
def test_rollover_policies(policy: str, expected: int) -> None:
    # allocated 100 (+60 credited during the period), spent 70, reserved 20, debt 10 → unused 60
    led = Ledger("tenant:t", TOK, 160, 70, 20, 10, 50, False, "ACTIVE")
    after = rollover(led, policy, base=100)
    assert (after.allocated, after.spent, after.reserved, after.debt) == (expected, 0, 20, 10)
    capped = rollover(Ledger("tenant:t", TOK, 500, 0, 0, 0, 0, False, "ACTIVE"), "CAP_AT_ALLOCATED", base=100)
    assert capped.allocated == 200  # at most one period's allocation carries over


# ---- the scheduler on every store, with an injected clock ----

class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
def clocked_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    clock = Clock(ms("2026-03-30T12:00:00Z"))
    if request.param == "sqlite":
        from cycles.store.sqlite import SQLiteStore

        store = SQLiteStore(str(tmp_path / "p.db"), clock=clock)
    else:
        from cycles.store.redis import RedisStore

        store = RedisStore(request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/14", clock=clock)
    yield store, clock
    asyncio.run(store.close())


def test_scheduler_rolls_each_boundary_exactly_once(clocked_store: Any) -> None:
    store, clock = clocked_store
    tenant = "per-" + uuid.uuid4().hex[:8]
    start = ms("2026-03-01T00:00:00Z")

    async def run() -> None:
        await store.create_tenant({"tenant_id": tenant, "name": tenant, "status": "ACTIVE"})
        end = periods.boundary(start, start, 1, "MONTHLY", "UTC")
        extra = {"rollover_policy": "CARRY_FORWARD", "period_start": iso(start), "period_end": iso(end),
                 "period_interval": "MONTHLY", "period_timezone": "UTC", "period_anchor_ms": start,
                 "period_first_end_ms": end, "period_end_ms": end, "period_index": 0, "period_allocation": 1000}
        await store.create_budget({"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": TOK, "allocated": 1000,
                                   "overdraft_limit": 0, "commit_overage_policy": None, "extra": extra})
        out = await store.reserve(ReserveCommand(
            tenant=tenant, endpoint="reserve", idempotency_key="r1", payload_hash="h", subject={"tenant": tenant},
            action={"kind": "x", "name": "y"}, unit=TOK, amount=300, scope_path=f"tenant:{tenant}",
            scopes=[f"tenant:{tenant}"], ttl_ms=10 * DAY))
        assert out.result["decision"] == "ALLOW"
        assert await roll_due(store) == 0  # not yet
        # three processes race at the boundary: exactly one rollover
        clock.now = ms("2026-04-01T00:00:01Z")
        counts = await asyncio.gather(roll_due(store), roll_due(store), roll_due(store))
        assert sum(counts) == 1
        # and one audit row: the losers' rows ride with no write, so they are not recorded
        rows = await store.scan_audit(AuditScan(tenant=tenant, descending=False, limit=100))
        assert [r["operation"] for r in rows if r["operation"] == "rolloverBudget"] == ["rolloverBudget"]
        # a process that read the budget before the winner's write comes second with the old end
        token = start_journal([{"journal": "audit", "log_id": "log_late", "tenant_id": tenant, "key_id": "scheduler",
                                "operation": "rolloverBudget", "status": 200, "metadata": {}}])
        try:
            assert await store.rollover_budget(tenant, f"tenant:{tenant}", TOK, end, {"period_end_ms": end + DAY}) is None
        finally:
            reset_journal(token)
        rows = await store.scan_audit(AuditScan(tenant=tenant, descending=False, limit=100))
        assert [r["operation"] for r in rows if r["operation"] == "rolloverBudget"] == ["rolloverBudget"]
        rec = await store.get_budget(tenant, f"tenant:{tenant}", TOK)
        led = rec["ledger"]
        # unused = 1000 - 0 - 300 reserved → carried: 1000 + 700
        assert (led.allocated, led.spent, led.reserved) == (1700, 0, 300)
        assert rec["extra"]["period_start"] == "2026-04-01T00:00:00.000Z"
        assert rec["extra"]["period_end"] == "2026-05-01T00:00:00.000Z"
        # a RESET during a period changes the per-period allocation that later periods start from
        await store.fund(FundCommand(tenant=tenant, scope=f"tenant:{tenant}", unit=TOK, operation="RESET",
                                     amount=500, spent=None, idempotency_key="f1", payload_hash="p"))
        # down for two months: both boundaries are applied, one at a time
        clock.now = ms("2026-06-15T00:00:00Z")
        assert await roll_due(store) == 2
        rec = await store.get_budget(tenant, f"tenant:{tenant}", TOK)
        assert rec["extra"]["period_end"] == "2026-07-01T00:00:00.000Z" and rec["extra"]["period_index"] == 3
        # May 1: 500 + (500 - 300 reserved) = 700; June 1: 500 + (700 - 300) = 900 (carry compounds)
        assert rec["ledger"].allocated == 900 and rec["ledger"].reserved == 300
        assert await roll_due(store) == 0

    asyncio.run(run())


# ---- through a real server ----

def test_server_rolls_over_a_budget_whose_period_ended(server: Server, tenant: Tenant) -> None:
    now = int(time.time() * 1000)
    start = now - 2 * DAY - 3_600_000
    with server.admin() as c:
        r = c.post("/v1/admin/budgets", json={
            "tenant_id": tenant.tenant_id, "scope": f"tenant:{tenant.tenant_id}", "unit": TOK,
            "allocated": {"unit": TOK, "amount": 100}, "rollover_policy": "NONE", "period_start": iso(start),
            "period_interval": "DAILY", "period_timezone": "UTC"})
        assert r.status_code == 201, r.text
        assert r.json()["period_end"] == iso(start + DAY)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = c.get("/v1/admin/budgets/lookup", params={"scope": f"tenant:{tenant.tenant_id}", "unit": TOK}).json()
            if got["period_end"] == iso(start + 3 * DAY):
                break
            time.sleep(0.2)
        assert got["period_start"] == iso(start + 2 * DAY) and got["period_end"] == iso(start + 3 * DAY)
        rows = c.get("/v1/admin/audit/logs", params={"operation": "rolloverBudget", "key_id": "scheduler",
                                                    "resource_id": got["ledger_id"]}).json()["logs"]
        assert len(rows) == 2 and rows[0]["metadata"]["actor_type"] == "scheduler"


@pytest.mark.parametrize("body,fragment", [
    ({"period_end": "2026-01-02T00:00:00Z"}, "period_start is required"),
    ({"period_start": "2026-01-02T00:00:00Z"}, "period_end or period_interval"),
    ({"period_start": "2026-01-02T00:00:00Z", "period_end": "2026-01-01T00:00:00Z"}, "after period_start"),
    ({"period_start": "2026-01-01T00:00:00Z", "period_interval": "DAILY", "period_timezone": "No/Where"}, "time zone"),
    ({"period_start": "2026-01-01T00:00:00Z", "period_end": "2026-01-05T00:00:00Z", "period_interval": "DAILY"}, "daily"),
    ({"rollover_policy": "CARRY_FORWARD"}, "period_start is required"),
    ({"period_start": "yesterday", "period_interval": "DAILY"}, "ISO 8601"),
    ({"period_start": "2026-01-01T00:00:00Z", "period_interval": "HOURLY"}, "Invalid"),
])
def test_bad_period_settings_are_refused(server: Server, tenant: Tenant, body: dict[str, Any], fragment: str) -> None:
    with server.admin() as c:
        r = c.post("/v1/admin/budgets", json={"tenant_id": tenant.tenant_id, "scope": f"tenant:{tenant.tenant_id}",
                                              "unit": TOK, "allocated": {"unit": TOK, "amount": 1}, **body})
    assert r.status_code == 400 and fragment in r.json()["message"], r.text


