"""Reservation leases: ttl_ms / grace_period_ms bounds, expiry, extend, grace-window settlement and the sweeper.

Uses the shortest legal TTL (1000 ms) and small grace windows; the session server sweeps every 100 ms.
"""

from __future__ import annotations

import time

import pytest

from support import USD, Server, Tenant
from test_runtime_semantics import (
    all_balances, bal, commit, expect_error, extend, get_reservation, make_tenant, ok, release, reserve,
    reserve_ok,
)


SLACK = 5  # ms: clock granularity between the test process and the server (same host clock)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_until_past(ms: int, margin_ms: int = 60) -> None:
    """Sleep until wall-clock time is past `ms` (epoch ms) by a margin (server and tests share the clock)."""
    delay = (ms + margin_ms) / 1000 - time.time()
    if delay > 0:
        time.sleep(delay)


@pytest.mark.parametrize("field,value", [
    ("ttl_ms", 999), ("ttl_ms", 86_400_001), ("ttl_ms", 0), ("ttl_ms", -1),
    ("grace_period_ms", -1), ("grace_period_ms", 60_001),
])
def test_ttl_and_grace_bounds_rejected(tenant: Tenant, field: str, value: int) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        expect_error(reserve(c, tenant, 1, **{field: value}), 400, "INVALID_REQUEST")
        expect_error(reserve(c, tenant, 1, dry_run=True, **{field: value}), 400, "INVALID_REQUEST")
    assert bal(tenant)["reserved"] == 0


def test_ttl_and_grace_bounds_accepted(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        for extra in ({"ttl_ms": 1_000}, {"ttl_ms": 86_400_000}, {"grace_period_ms": 0},
                      {"grace_period_ms": 60_000}):
            body = reserve_ok(c, tenant, 1, **extra)
            detail = ok(get_reservation(c, body["reservation_id"]))
            lease = detail["expires_at_ms"] - detail["created_at_ms"]
            assert 0 < lease <= extra.get("ttl_ms", 60_000)  # a server may clamp, never lengthen


def test_expiry_is_created_plus_ttl_and_remaining_ttl_is_reported(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        t0 = now_ms()
        body = reserve_ok(c, tenant, 1, ttl_ms=5_000)
        t1 = now_ms()
        assert t0 + 5_000 - SLACK <= body["expires_at_ms"] <= t1 + 5_000 + SLACK
        assert 0 < body["remaining_ttl_ms"] <= 5_000
        # remaining_ttl_ms = expires_at_ms - server time while the response was built
        assert body["expires_at_ms"] - t1 - SLACK <= body["remaining_ttl_ms"] <= body["expires_at_ms"] - t0 + SLACK
        detail = ok(get_reservation(c, body["reservation_id"]))
        assert detail["expires_at_ms"] == body["expires_at_ms"]
        assert detail["expires_at_ms"] - detail["created_at_ms"] == 5_000

        default = reserve_ok(c, tenant, 1)  # ttl_ms defaults to 60 s
        detail = ok(get_reservation(c, default["reservation_id"]))
        assert detail["expires_at_ms"] - detail["created_at_ms"] == 60_000


def test_remaining_ttl_absent_on_dry_run_and_deny(tenant: Tenant) -> None:
    tenant.budget("", 10)
    with tenant.client() as c:
        allow = ok(reserve(c, tenant, 1, dry_run=True, ttl_ms=5_000))
        deny = ok(reserve(c, tenant, 11, dry_run=True, ttl_ms=5_000))
        assert allow["decision"] == "ALLOW" and deny["decision"] == "DENY"
        for body in (allow, deny):
            assert "remaining_ttl_ms" not in body and "expires_at_ms" not in body and "reservation_id" not in body


def test_extend_is_relative_to_current_expiry(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 10, ttl_ms=5_000)
        rid, e0 = body["reservation_id"], body["expires_at_ms"]
        t0 = now_ms()
        first = ok(extend(c, rid, 1_000))
        t1 = now_ms()
        assert first == {"status": "ACTIVE", "expires_at_ms": e0 + 1_000,
                         "remaining_ttl_ms": first["remaining_ttl_ms"]}
        assert e0 + 1_000 - t1 - SLACK <= first["remaining_ttl_ms"] <= e0 + 1_000 - t0 + SLACK
        second = ok(extend(c, rid, 2_500))
        assert second["expires_at_ms"] == e0 + 3_500
        assert second["remaining_ttl_ms"] > first["remaining_ttl_ms"]
        detail = ok(get_reservation(c, rid))
        assert detail["expires_at_ms"] == e0 + 3_500
        assert detail["reserved"] == {"unit": USD, "amount": 10}  # extend changes only the expiry
    assert bal(tenant)["reserved"] == 10


def test_extend_after_expiry_is_410_but_commit_within_grace_succeeds(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        a = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=5_000)
        b = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=5_000)
        wait_until_past(max(a["expires_at_ms"], b["expires_at_ms"]))
        err = expect_error(extend(c, a["reservation_id"], 10_000), 410, "RESERVATION_EXPIRED")
        assert err["details"]["expires_at_ms"] == a["expires_at_ms"]
        body = ok(commit(c, a["reservation_id"], 60))
        assert body["charged"]["amount"] == 60 and body["released"]["amount"] == 40
        rel = ok(release(c, b["reservation_id"]))
        assert rel["released"]["amount"] == 100
    assert bal(tenant) == {"allocated": 1_000, "spent": 60, "reserved": 0, "debt": 0, "remaining": 940,
                           "overdraft_limit": 0, "is_over_limit": False}


def test_commit_and_release_after_grace_are_410(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        a = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=200)
        b = reserve_ok(c, tenant, 100, ttl_ms=1_000, grace_period_ms=0)
        wait_until_past(a["expires_at_ms"] + 200)
        for body in (a, b):
            expect_error(commit(c, body["reservation_id"], 10), 410, "RESERVATION_EXPIRED")
            expect_error(release(c, body["reservation_id"]), 410, "RESERVATION_EXPIRED")
            expect_error(extend(c, body["reservation_id"], 1_000), 410, "RESERVATION_EXPIRED")
    got = bal(tenant)
    assert got["spent"] == 0 and got["debt"] == 0


def test_sweeper_expires_leases_and_returns_budget(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 500)
    ws = tenant.subject(workspace="w")
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 300, subject=ws, ttl_ms=1_000, grace_period_ms=0)
        rid = body["reservation_id"]
        keep = reserve_ok(c, tenant, 50, subject=ws, ttl_ms=60_000)["reservation_id"]
        assert bal(tenant, "workspace:w")["reserved"] == 350
        deadline = time.monotonic() + 10
        while True:
            rows = ok(c.get("/v1/reservations", params={"status": "EXPIRED"}))["reservations"]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [r["reservation_id"] for r in rows] == [rid]
        assert rows[0]["status"] == "EXPIRED" and "finalized_at_ms" not in rows[0] and "committed" not in rows[0]
        err = expect_error(get_reservation(c, rid), 410, "RESERVATION_EXPIRED")
        assert err["details"]["expires_at_ms"] == body["expires_at_ms"]
        for got in (bal(tenant), bal(tenant, "workspace:w")):
            assert got["reserved"] == 50 and got["spent"] == 0
        assert bal(tenant, "workspace:w")["remaining"] == 450
        expect_error(commit(c, rid, 1), 410, "RESERVATION_EXPIRED")
        expect_error(release(c, rid), 410, "RESERVATION_EXPIRED")
        assert ok(get_reservation(c, keep))["status"] == "ACTIVE"
        # EXPIRED rows have no finalized_at_ms, so a finalized window excludes them; an expiry window finds them.
        assert ok(c.get("/v1/reservations", params={"finalized_from": "1970-01-01T00:00:00Z"}))["reservations"] == []
        rows = ok(c.get("/v1/reservations", params={"expires_to": "2100-01-01T00:00:00Z",
                                                     "status": "EXPIRED"}))["reservations"]
        assert [r["reservation_id"] for r in rows] == [rid]


def test_max_extensions_from_tenant_setting(server: Server) -> None:
    tenant = make_tenant(server, max_reservation_extensions=2)
    tenant.budget("", 1_000)
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 10, ttl_ms=5_000)
        rid = body["reservation_id"]
        ok(extend(c, rid, 100))
        last = ok(extend(c, rid, 100))
        expect_error(extend(c, rid, 100), 409, "MAX_EXTENSIONS_EXCEEDED")
        assert ok(get_reservation(c, rid))["expires_at_ms"] == last["expires_at_ms"] == body["expires_at_ms"] + 200
        assert ok(commit(c, rid, 10))["charged"]["amount"] == 10  # still a live reservation

    none_allowed = make_tenant(server, max_reservation_extensions=0)
    none_allowed.budget("", 1_000)
    with none_allowed.client() as c:
        rid = reserve_ok(c, none_allowed, 10)["reservation_id"]
        expect_error(extend(c, rid, 100), 409, "MAX_EXTENSIONS_EXCEEDED")


def test_default_max_extensions_is_ten(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 10, ttl_ms=5_000)
        rid = body["reservation_id"]
        for i in range(10):
            assert ok(extend(c, rid, 10))["expires_at_ms"] == body["expires_at_ms"] + 10 * (i + 1)
        expect_error(extend(c, rid, 10), 409, "MAX_EXTENSIONS_EXCEEDED")
        before = all_balances(tenant)
        assert ok(get_reservation(c, rid))["expires_at_ms"] == body["expires_at_ms"] + 100
        assert all_balances(tenant) == before
