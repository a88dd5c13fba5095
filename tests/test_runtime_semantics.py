"""Black-box HTTP tests of the normative runtime rules of cycles-protocol-v0.

Covers scope derivation, atomicity, commit overage policies, debt / over-limit states, funding math,
decide and dry_run, tenant isolation, the closed-tenant guard, permissions and events. Leases
(TTL / grace / extend / sweeper) live in test_runtime_leases.py, listing and balances in
test_runtime_listing.py and idempotency in test_idempotency.py; they import the helpers below.
"""

from __future__ import annotations

import atexit
import sqlite3
import uuid
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from support import ALL_TENANT_PERMISSIONS, USD, Server, Tenant, new_tenant, reserve_body

TOKENS = "TOKENS"
BALANCE_FIELDS = ("allocated", "spent", "reserved", "debt", "remaining", "overdraft_limit")


# ---------------------------------------------------------------------------------------------
# helpers (imported by the other runtime test modules)
# ---------------------------------------------------------------------------------------------


_clients: dict[tuple[str, str, str], httpx.Client] = {}


def shared_client(server: Server, header: str, secret: str) -> httpx.Client:
    """A client kept for the whole session (building an httpx.Client costs tens of ms)."""
    k = (server.base_url, header, secret)
    c = _clients.get(k)
    if c is None or c.is_closed:
        c = _clients[k] = httpx.Client(base_url=server.base_url, headers={header: secret}, timeout=30)
    return c


@atexit.register
def _close_clients() -> None:
    for c in _clients.values():
        c.close()


def new_key() -> str:
    return uuid.uuid4().hex


def ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    return r.json()


def expect_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code}: {r.text}"
    body = r.json()
    assert body["error"] == code, r.text
    assert body["request_id"] and body["message"]
    return body


def reserve(c: httpx.Client, tenant: Tenant, amount: int, **extra: Any) -> httpx.Response:
    return c.post("/v1/reservations", json=reserve_body(tenant, amount, **extra))


def reserve_ok(c: httpx.Client, tenant: Tenant, amount: int, **extra: Any) -> dict[str, Any]:
    body = ok(reserve(c, tenant, amount, **extra))
    assert body["decision"] == "ALLOW", body
    return body


def commit(c: httpx.Client, rid: str, amount: int, *, key: str | None = None, unit: str = USD,
           **extra: Any) -> httpx.Response:
    body = {"idempotency_key": key or new_key(), "actual": {"unit": unit, "amount": amount}, **extra}
    return c.post(f"/v1/reservations/{rid}/commit", json=body)


def release(c: httpx.Client, rid: str, *, key: str | None = None, **extra: Any) -> httpx.Response:
    return c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": key or new_key(), **extra})


def extend(c: httpx.Client, rid: str, by_ms: int, *, key: str | None = None, **extra: Any) -> httpx.Response:
    return c.post(f"/v1/reservations/{rid}/extend",
                  json={"idempotency_key": key or new_key(), "extend_by_ms": by_ms, **extra})


def decide(c: httpx.Client, tenant: Tenant, amount: int, *, key: str | None = None, unit: str = USD,
           subject: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"idempotency_key": key or new_key(), "subject": subject or tenant.subject(),
            "action": {"kind": "llm.completion", "name": "test-model"},
            "estimate": {"unit": unit, "amount": amount}, **extra}
    return c.post("/v1/decide", json=body)


def event(c: httpx.Client, tenant: Tenant, amount: int, *, key: str | None = None, unit: str = USD,
          subject: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"idempotency_key": key or new_key(), "subject": subject or tenant.subject(),
            "action": {"kind": "tool.search", "name": "web"},
            "actual": {"unit": unit, "amount": amount}, **extra}
    return c.post("/v1/events", json=body)


def get_reservation(c: httpx.Client, rid: str) -> httpx.Response:
    return c.get(f"/v1/reservations/{rid}")


def scope_of(tenant: Tenant, suffix: str = "") -> str:
    return f"tenant:{tenant.tenant_id}" + (f"/{suffix}" if suffix else "")


def check_balances(balances: list[dict[str, Any]]) -> None:
    """The Balance invariants every response must satisfy: one unit, remaining derived from the counters."""
    for b in balances:
        units = {b[f]["unit"] for f in BALANCE_FIELDS if f in b}
        assert len(units) == 1, b
        if all(f in b for f in ("allocated", "spent", "reserved", "debt")):
            assert b["remaining"]["amount"] == (b["allocated"]["amount"] - b["spent"]["amount"]
                                                - b["reserved"]["amount"] - b["debt"]["amount"]), b
        assert b["scope"] == b["scope_path"], b


def all_balances(tenant: Tenant) -> dict[tuple[str, str], dict[str, Any]]:
    """Every balance of the tenant keyed by (scope, unit), following cursors."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    params: dict[str, Any] = {"tenant": tenant.tenant_id, "include_children": "true", "limit": 200}
    c = shared_client(tenant.server, "X-Cycles-API-Key", tenant.key)
    while True:
        body = ok(c.get("/v1/balances", params=params))
        check_balances(body["balances"])
        for b in body["balances"]:
            key = (b["scope"], b["remaining"]["unit"])
            assert key not in out, f"duplicate balance {key}"
            out[key] = b
        if not body.get("has_more"):
            return out
        params["cursor"] = body["next_cursor"]


def nums(b: dict[str, Any]) -> dict[str, Any]:
    """The counters of a Balance as plain numbers (and the over-limit flag)."""
    out: dict[str, Any] = {f: b[f]["amount"] for f in BALANCE_FIELDS}
    out["is_over_limit"] = b.get("is_over_limit", False)
    return out


def bal(tenant: Tenant, suffix: str = "", unit: str = USD) -> dict[str, Any]:
    """The counters of one (scope, unit) balance of the tenant."""
    found = all_balances(tenant).get((scope_of(tenant, suffix), unit))
    assert found is not None, f"no balance for {scope_of(tenant, suffix)} in {unit}"
    return nums(found)


def fund(tenant: Tenant, suffix: str, operation: str, amount: int, unit: str = USD, **extra: Any) -> httpx.Response:
    """POST /v1/admin/budgets/fund with the admin key (same request as Tenant.fund, on a shared client)."""
    body = {"operation": operation, "amount": {"unit": unit, "amount": amount}, **extra}
    c = shared_client(tenant.server, "X-Admin-API-Key", tenant.server.admin_key)
    return c.post("/v1/admin/budgets/fund", params={"tenant_id": tenant.tenant_id, "scope": scope_of(tenant, suffix),
                                                    "unit": unit}, json=body)


def by_scope(balances: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    check_balances(balances)
    return {b["scope"]: nums(b) for b in balances}


def make_tenant(server: Server, *, permissions: list[str] | None = None, **settings: Any) -> Tenant:
    """A fresh tenant created with governance settings (e.g. max_reservation_extensions) and one API key."""
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    with server.admin() as c:
        ok(c.post("/v1/admin/tenants", json={"tenant_id": tenant_id, "name": tenant_id, **settings}), 201)
        r = ok(c.post("/v1/admin/api-keys", json={"tenant_id": tenant_id, "name": "k",
                                                  "permissions": permissions or ALL_TENANT_PERMISSIONS}), 201)
    return Tenant(server, tenant_id, r["key_secret"])


def add_key(tenant: Tenant, permissions: list[str]) -> Tenant:
    """Another API key of the same tenant with the given permissions."""
    with tenant.server.admin() as c:
        r = ok(c.post("/v1/admin/api-keys", json={"tenant_id": tenant.tenant_id, "name": "limited",
                                                  "permissions": permissions}), 201)
    return Tenant(tenant.server, tenant.tenant_id, r["key_secret"])


def close_tenant(tenant: Tenant) -> None:
    with tenant.server.admin() as c:
        body = ok(c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"status": "CLOSED"}))
    assert body["status"] == "CLOSED"


def force_overdraft_limit(server: Server, tenant: Tenant, suffix: str, limit: int, unit: str = USD) -> None:
    """Lower a budget's overdraft_limit directly in the store.

    The server exposes no budget-update operation (overdraft_limit is fixed at creation), and debt can
    only accrue while overdraft_limit > 0, so the spec's DEBT_OUTSTANDING state (debt > 0 and
    overdraft_limit == 0) is unreachable through the API. This plays the part of an operator lowering
    the limit through an admin plane; everything else in the tests goes through HTTP.
    """
    url = urlparse(server.store_url)
    scope = scope_of(tenant, suffix)
    if url.scheme == "sqlite":
        conn = sqlite3.connect(url.path, timeout=10)
        try:
            with conn:
                n = conn.execute("UPDATE budgets SET overdraft_limit=? WHERE tenant_id=? AND scope=? AND unit=?",
                                 (limit, tenant.tenant_id, scope, unit)).rowcount
            assert n == 1
        finally:
            conn.close()
    elif url.scheme in ("redis", "rediss"):
        import redis  # the Redis store's key layout: docs/redis.md

        r = redis.Redis.from_url(server.store_url)
        try:
            key = f"cy:{{{tenant.tenant_id}}}:b:{scope}|{unit}"
            assert r.exists(key) == 1
            r.hset(key, "overdraft_limit", str(limit))
        finally:
            r.close()
    elif url.scheme == "redis-cluster":
        from redis.cluster import ClusterNode, RedisCluster

        from cycles.store.redis_cluster import cluster_nodes

        rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(server.store_url)])
        try:
            key = f"cy:{{{tenant.tenant_id}}}:b:{scope}|{unit}"
            assert rc.exists(key) == 1
            rc.hset(key, "overdraft_limit", str(limit))
        finally:
            rc.close()
    else:
        pytest.skip(f"no direct access to a {url.scheme} store to lower overdraft_limit")


# ---------------------------------------------------------------------------------------------
# scope derivation
# ---------------------------------------------------------------------------------------------


def test_scope_derivation_canonical_order_lowercase_and_unbudgeted_scopes_skipped(tenant: Tenant) -> None:
    tenant.budget("", 10_000)
    tenant.budget("workspace:prod/agent:bot", 500)  # the workspace scope in between has no budget
    subject = {"agent": "BOT", "workspace": "Prod", "tenant": tenant.tenant_id}  # non-canonical key order
    t = scope_of(tenant)
    expected = [t, f"{t}/workspace:prod", f"{t}/workspace:prod/agent:bot"]
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 100, subject=subject)
        assert body["affected_scopes"] == expected
        assert body["scope_path"] == expected[-1]
        assert [b["scope"] for b in body["balances"]] == [expected[0], expected[2]]
        got = by_scope(body["balances"])
        assert got[expected[0]]["reserved"] == 100 and got[expected[0]]["remaining"] == 9_900
        assert got[expected[2]]["reserved"] == 100 and got[expected[2]]["remaining"] == 400

        detail = ok(get_reservation(c, body["reservation_id"]))
        assert detail["affected_scopes"] == expected and detail["scope_path"] == expected[-1]
        assert detail["subject"]["workspace"] == "Prod"  # the subject itself round-trips as sent

        d = ok(decide(c, tenant, 1, subject=subject))
        assert d["decision"] == "ALLOW" and d["affected_scopes"] == expected
        dry = ok(reserve(c, tenant, 1, subject=subject, dry_run=True))
        assert dry["affected_scopes"] == expected and dry["scope_path"] == expected[-1]

    assert set(all_balances(tenant)) == {(expected[0], USD), (expected[2], USD)}  # nothing created at the gap


def test_scope_gaps_are_skipped_not_filled(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    t = scope_of(tenant)
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 10, subject=tenant.subject(agent="y"))
        assert body["affected_scopes"] == [t, f"{t}/agent:y"]
        assert body["scope_path"] == f"{t}/agent:y"
        body = reserve_ok(c, tenant, 10, subject=tenant.subject(app="a", toolset="ts"))
        assert body["affected_scopes"] == [t, f"{t}/app:a", f"{t}/app:a/toolset:ts"]
        body = reserve_ok(c, tenant, 10)
        assert body["affected_scopes"] == [t] and body["scope_path"] == t


def test_budget_only_at_deepest_scope_is_enforced(tenant: Tenant) -> None:
    deep = "workspace:w/app:a/workflow:f/agent:g/toolset:t"
    tenant.budget(deep, 100)
    full = tenant.subject(workspace="w", app="a", workflow="f", agent="g", toolset="t")
    with tenant.client() as c:
        r = reserve(c, tenant, 101, subject=full)
        err = expect_error(r, 409, "BUDGET_EXCEEDED")
        assert err["details"]["scope"] == scope_of(tenant, deep)
        body = reserve_ok(c, tenant, 100, subject=full)
        assert len(body["affected_scopes"]) == 6 and [b["scope"] for b in body["balances"]] == [scope_of(tenant, deep)]
        assert bal(tenant, deep)["remaining"] == 0
        # Without the toolset level no derived scope has a budget.
        expect_error(reserve(c, tenant, 1, subject=tenant.subject(workspace="w", app="a", workflow="f", agent="g")),
                     404, "NOT_FOUND")


def test_no_budget_anywhere(tenant: Tenant) -> None:
    with tenant.client() as c:
        err = expect_error(reserve(c, tenant, 1), 404, "NOT_FOUND")
        assert "Budget not found" in err["message"]
        expect_error(event(c, tenant, 1), 404, "NOT_FOUND")
        d = ok(decide(c, tenant, 1))
        assert d["decision"] == "DENY" and d["reason_code"] == "BUDGET_NOT_FOUND"
        assert d["affected_scopes"] == [scope_of(tenant)]
        dry = ok(reserve(c, tenant, 1, dry_run=True))
        assert dry["decision"] == "DENY" and dry["reason_code"] == "BUDGET_NOT_FOUND"
        assert dry["affected_scopes"] == [scope_of(tenant)]
        assert "reservation_id" not in dry and "remaining_ttl_ms" not in dry
        # A budget in another unit at a scope that is not derived from the subject does not count.
        tenant.budget("workspace:elsewhere", 100)
        expect_error(reserve(c, tenant, 1, unit=TOKENS), 404, "NOT_FOUND")
        expect_error(reserve(c, tenant, 1), 404, "NOT_FOUND")


def test_unit_mismatch_on_reserve_decide_event_and_commit(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 1_000)
    subject = tenant.subject(workspace="w")
    with tenant.client() as c:
        for r in (reserve(c, tenant, 1, unit=TOKENS, subject=subject),
                  reserve(c, tenant, 1, unit=TOKENS, subject=subject, dry_run=True),
                  decide(c, tenant, 1, unit=TOKENS, subject=subject),
                  event(c, tenant, 1, unit=TOKENS, subject=subject)):
            err = expect_error(r, 400, "UNIT_MISMATCH")
            assert err["details"]["scope"] in (scope_of(tenant), scope_of(tenant, "workspace:w"))
            assert err["details"]["requested_unit"] == TOKENS
            assert err["details"]["expected_units"] == [USD]

        rid = reserve_ok(c, tenant, 100, subject=subject)["reservation_id"]
        before = all_balances(tenant)
        err = expect_error(commit(c, rid, 50, unit=TOKENS), 400, "UNIT_MISMATCH")
        assert err["details"]["requested_unit"] == TOKENS and err["details"]["expected_units"] == [USD]
        assert "scope" in err["details"]
        assert all_balances(tenant) == before
        assert ok(get_reservation(c, rid))["status"] == "ACTIVE"
        assert ok(commit(c, rid, 50))["charged"] == {"unit": USD, "amount": 50}


def test_unit_matching_budget_at_any_derived_scope_is_enough(tenant: Tenant) -> None:
    tenant.budget("", 1_000)  # USD at the tenant
    tenant.budget("workspace:w", 300, unit=TOKENS)  # TOKENS one level down
    with tenant.client() as c:
        body = reserve_ok(c, tenant, 200, unit=TOKENS, subject=tenant.subject(workspace="w"))
        assert [b["scope"] for b in body["balances"]] == [scope_of(tenant, "workspace:w")]
        expect_error(reserve(c, tenant, 101, unit=TOKENS, subject=tenant.subject(workspace="w")),
                     409, "BUDGET_EXCEEDED")
    assert bal(tenant, "", USD)["reserved"] == 0
    assert bal(tenant, "workspace:w", TOKENS)["reserved"] == 200


def test_zero_allocation_denies_positive_and_allows_zero_estimate(tenant: Tenant) -> None:
    tenant.budget("", 0)
    with tenant.client() as c:
        expect_error(reserve(c, tenant, 1), 409, "BUDGET_EXCEEDED")
        assert ok(decide(c, tenant, 1))["reason_code"] == "BUDGET_EXCEEDED"
        body = reserve_ok(c, tenant, 0)
        assert body["reserved"] == {"unit": USD, "amount": 0}
        assert ok(commit(c, body["reservation_id"], 0))["charged"]["amount"] == 0


# ---------------------------------------------------------------------------------------------
# atomicity
# ---------------------------------------------------------------------------------------------


def test_denied_reservation_changes_no_scope(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 1_000)
    tenant.budget("workspace:w/agent:a", 100)
    subject = tenant.subject(workspace="w", agent="a")
    with tenant.client() as c:
        reserve_ok(c, tenant, 40, subject=subject)
        before = all_balances(tenant)
        err = expect_error(reserve(c, tenant, 61, subject=subject), 409, "BUDGET_EXCEEDED")
        assert err["details"]["scope"] == scope_of(tenant, "workspace:w/agent:a")
        assert all_balances(tenant) == before
        listed = ok(c.get("/v1/reservations", params={"limit": 200}))["reservations"]
        assert len(listed) == 1
        reserve_ok(c, tenant, 60, subject=subject)  # exactly the rest fits
    assert bal(tenant)["reserved"] == 100 and bal(tenant, "workspace:w")["reserved"] == 100


# ---------------------------------------------------------------------------------------------
# commit overage policies
# ---------------------------------------------------------------------------------------------


def test_commit_reject_policy(tenant: Tenant) -> None:
    tenant.budget("", 10_000)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="REJECT")["reservation_id"]
        before = all_balances(tenant)
        err = expect_error(commit(c, rid, 101), 409, "BUDGET_EXCEEDED")
        assert err["details"]["scope"] == scope_of(tenant)
        assert all_balances(tenant) == before
        assert ok(get_reservation(c, rid))["status"] == "ACTIVE"
        body = ok(commit(c, rid, 80))
        assert body["status"] == "COMMITTED" and body["charged"]["amount"] == 80
        assert body["released"] == {"unit": USD, "amount": 20}
        check_balances(body["balances"])
        assert by_scope(body["balances"])[scope_of(tenant)] == {
            "allocated": 10_000, "spent": 80, "reserved": 0, "debt": 0, "remaining": 9_920,
            "overdraft_limit": 0, "is_over_limit": False}
        detail = ok(get_reservation(c, rid))
        assert detail["status"] == "COMMITTED" and detail["committed"] == {"unit": USD, "amount": 80}


def test_commit_exact_estimate_has_no_released(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="REJECT")["reservation_id"]
        body = ok(commit(c, rid, 100))
        assert body["charged"]["amount"] == 100 and "released" not in body


def test_allow_if_available_charges_delta_when_covered(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 500)
    subject = tenant.subject(workspace="w")
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, subject=subject, overage_policy="ALLOW_IF_AVAILABLE")["reservation_id"]
        body = ok(commit(c, rid, 300))
        assert body["charged"] == {"unit": USD, "amount": 300} and "released" not in body
        got = by_scope(body["balances"])
        assert got[scope_of(tenant)] == {"allocated": 1_000, "spent": 300, "reserved": 0, "debt": 0,
                                         "remaining": 700, "overdraft_limit": 0, "is_over_limit": False}
        assert got[scope_of(tenant, "workspace:w")]["remaining"] == 200
        assert not got[scope_of(tenant, "workspace:w")]["is_over_limit"]


def test_allow_if_available_caps_to_min_remaining_and_marks_over_limit(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 200)
    t, w = scope_of(tenant), scope_of(tenant, "workspace:w")
    subject = tenant.subject(workspace="w")
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 150, subject=subject, overage_policy="ALLOW_IF_AVAILABLE")["reservation_id"]
        # delta 250: the tenant (850 left) covers it, the workspace (50 left) does not -> capped to 50.
        body = ok(commit(c, rid, 400))
        assert body["charged"] == {"unit": USD, "amount": 200}  # estimate + capped delta
        assert "released" not in body
        got = by_scope(body["balances"])
        assert got[t] == {"allocated": 1_000, "spent": 200, "reserved": 0, "debt": 0, "remaining": 800,
                          "overdraft_limit": 0, "is_over_limit": False}
        assert got[w] == {"allocated": 200, "spent": 200, "reserved": 0, "debt": 0, "remaining": 0,
                          "overdraft_limit": 0, "is_over_limit": True}
        assert ok(get_reservation(c, rid))["committed"]["amount"] == 200
        # The over-limit scope blocks every new reservation, even of 0; the tenant alone is fine.
        err = expect_error(reserve(c, tenant, 0, subject=subject), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        assert err["details"]["scope"] == w
        d = ok(decide(c, tenant, 0, subject=subject))
        assert d["decision"] == "DENY" and d["reason_code"] == "OVERDRAFT_LIMIT_EXCEEDED"
        dry = ok(reserve(c, tenant, 0, subject=subject, dry_run=True))
        assert dry["decision"] == "DENY" and dry["reason_code"] == "OVERDRAFT_LIMIT_EXCEEDED"
        reserve_ok(c, tenant, 10)


def test_allow_if_available_with_nothing_left_charges_only_the_estimate(tenant: Tenant) -> None:
    tenant.budget("", 100)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]  # default policy is ALLOW_IF_AVAILABLE
        body = ok(commit(c, rid, 250))
        assert body["charged"]["amount"] == 100
        got = by_scope(body["balances"])[scope_of(tenant)]
        assert got["debt"] == 0 and got["remaining"] == 0 and got["is_over_limit"] is True


def test_allow_if_available_floor_is_zero_when_a_scope_is_in_debt(tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=100)
    with tenant.client() as c:
        capped = reserve_ok(c, tenant, 50, overage_policy="ALLOW_IF_AVAILABLE")["reservation_id"]
        indebted = reserve_ok(c, tenant, 50, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        ok(commit(c, indebted, 80))  # remaining 0 -> 30 of debt, remaining -30
        body = ok(commit(c, capped, 70))  # no positive remaining anywhere: the delta is capped to 0
        assert body["charged"] == {"unit": USD, "amount": 50}
        got = by_scope(body["balances"])[scope_of(tenant)]
        assert got == {"allocated": 100, "spent": 100, "reserved": 0, "debt": 30, "remaining": -30,
                       "overdraft_limit": 100, "is_over_limit": True}  # never adds debt itself
        expect_error(reserve(c, tenant, 0), 409, "OVERDRAFT_LIMIT_EXCEEDED")


def test_allow_with_overdraft_accrues_debt_within_limit(tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=50)
    t = scope_of(tenant)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 80, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        body = ok(commit(c, rid, 120))  # remaining 20 covers part of the 40 delta, 20 becomes debt
        assert body["charged"] == {"unit": USD, "amount": 120}
        got = by_scope(body["balances"])[t]
        assert got == {"allocated": 100, "spent": 100, "reserved": 0, "debt": 20, "remaining": -20,
                       "overdraft_limit": 50, "is_over_limit": False}
        assert bal(tenant) == got
        # Negative remaining: a new positive reservation does not fit.
        expect_error(reserve(c, tenant, 1), 409, "BUDGET_EXCEEDED")


def test_allow_with_overdraft_over_limit_rejects_and_changes_nothing(tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=50)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        before = all_balances(tenant)
        err = expect_error(commit(c, rid, 151), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        assert err["details"]["scope"] == scope_of(tenant)
        assert all_balances(tenant) == before
        assert ok(get_reservation(c, rid))["status"] == "ACTIVE"
        body = ok(commit(c, rid, 150))  # debt exactly at the limit is allowed
        assert by_scope(body["balances"])[scope_of(tenant)]["debt"] == 50


def test_allow_with_overdraft_debt_only_on_the_scope_that_is_short(tenant: Tenant) -> None:
    tenant.budget("", 1_000)  # no overdraft, but enough remaining
    tenant.budget("workspace:w", 100, overdraft_limit=50)
    t, w = scope_of(tenant), scope_of(tenant, "workspace:w")
    subject = tenant.subject(workspace="w")
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, subject=subject, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        body = ok(commit(c, rid, 130))
        got = by_scope(body["balances"])
        assert got[t] == {"allocated": 1_000, "spent": 130, "reserved": 0, "debt": 0, "remaining": 870,
                          "overdraft_limit": 0, "is_over_limit": False}
        assert got[w] == {"allocated": 100, "spent": 100, "reserved": 0, "debt": 30, "remaining": -30,
                          "overdraft_limit": 50, "is_over_limit": False}
        # The tenant scope cannot go into debt (limit 0): a shortfall there is refused as a whole.
        rid2 = reserve_ok(c, tenant, 800, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        before = all_balances(tenant)
        expect_error(commit(c, rid2, 900), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        assert all_balances(tenant) == before


def test_debt_with_overdraft_allowance_does_not_block_reservations(tenant: Tenant) -> None:
    """DEBT_OUTSTANDING applies when no policy permits debt (overdraft_limit == 0); with a limit, debt
    alone does not block a reservation that fits the remaining budget."""
    tenant.budget("", 100, overdraft_limit=50)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        ok(commit(c, rid, 120))
        # RESET resizes the allocation and preserves debt (governance BudgetFundingRequest).
        assert ok(fund(tenant, "", "RESET", 1_100))["new_remaining"]["amount"] == 980
        assert bal(tenant)["debt"] == 20
        reserve_ok(c, tenant, 10)


def test_debt_outstanding_blocks_reservations_until_repaid(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=50)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        ok(commit(c, rid, 130))
        ok(fund(tenant, "", "RESET", 1_100))  # room again; RESET preserves the debt
        force_overdraft_limit(server, tenant, "", 0)
        got = bal(tenant)
        assert got["debt"] == 30 and got["overdraft_limit"] == 0 and got["remaining"] == 970
        before = all_balances(tenant)
        err = expect_error(reserve(c, tenant, 1), 409, "DEBT_OUTSTANDING")
        assert err["details"]["scope"] == scope_of(tenant)
        d = ok(decide(c, tenant, 1))
        assert d["decision"] == "DENY" and d["reason_code"] == "DEBT_OUTSTANDING"
        dry = ok(reserve(c, tenant, 1, dry_run=True))
        assert dry["decision"] == "DENY" and dry["reason_code"] == "DEBT_OUTSTANDING"
        assert all_balances(tenant) == before
        repaid = ok(fund(tenant, "", "REPAY_DEBT", 30))
        assert repaid["previous_debt"]["amount"] == 30 and repaid["new_debt"]["amount"] == 0
        reserve_ok(c, tenant, 1)


def test_over_limit_takes_precedence_over_debt_outstanding(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 1_000, overdraft_limit=100)
    tenant.budget("workspace:w", 100)
    t, w = scope_of(tenant), scope_of(tenant, "workspace:w")
    ws = tenant.subject(workspace="w")
    with tenant.client() as c:
        # workspace: over-limit through a capped ALLOW_IF_AVAILABLE commit
        rid = reserve_ok(c, tenant, 100, subject=ws)["reservation_id"]
        ok(commit(c, rid, 150))
        # tenant: debt through an overdraft commit, then the limit drops to 0
        rid = reserve_ok(c, tenant, 900, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        ok(commit(c, rid, 950))
        force_overdraft_limit(server, tenant, "", 0)
        state = {s: nums(b) for (s, _), b in all_balances(tenant).items()}
        assert state[t]["debt"] == 50 and state[t]["overdraft_limit"] == 0 and not state[t]["is_over_limit"]
        assert state[w]["is_over_limit"] and state[w]["debt"] == 0

        # The debt scope comes first in canonical order, yet over-limit wins.
        err = expect_error(reserve(c, tenant, 0, subject=ws), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        assert err["details"]["scope"] == w
        assert ok(decide(c, tenant, 0, subject=ws))["reason_code"] == "OVERDRAFT_LIMIT_EXCEEDED"
        err = expect_error(reserve(c, tenant, 0), 409, "DEBT_OUTSTANDING")
        assert err["details"]["scope"] == t
        assert ok(decide(c, tenant, 0))["reason_code"] == "DEBT_OUTSTANDING"


def test_budget_level_commit_overage_policy_applies_when_reservation_has_none(tenant: Tenant) -> None:
    tenant.budget("", 1_000, commit_overage_policy="REJECT")
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        expect_error(commit(c, rid, 101), 409, "BUDGET_EXCEEDED")
        # An explicit reservation policy wins over the budget's.
        rid2 = reserve_ok(c, tenant, 100, overage_policy="ALLOW_IF_AVAILABLE")["reservation_id"]
        assert ok(commit(c, rid2, 150))["charged"]["amount"] == 150
        # Events follow the budget policy too: REJECT when the amount exceeds remaining (1000-100-150).
        expect_error(event(c, tenant, 751), 409, "BUDGET_EXCEEDED")


def test_budget_level_overdraft_policy_applies_when_reservation_has_none(tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=100, commit_overage_policy="ALLOW_WITH_OVERDRAFT")
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        body = ok(commit(c, rid, 160))
        assert body["charged"]["amount"] == 160
        assert by_scope(body["balances"])[scope_of(tenant)]["debt"] == 60


# ---------------------------------------------------------------------------------------------
# funding
# ---------------------------------------------------------------------------------------------


def test_funding_operations_math(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        ok(commit(c, rid, 300))
        reserve_ok(c, tenant, 50)  # stays active: reserved must be preserved by every operation
    assert bal(tenant) == {"allocated": 1_000, "spent": 300, "reserved": 50, "debt": 0, "remaining": 650,
                           "overdraft_limit": 0, "is_over_limit": False}

    r = ok(fund(tenant, "", "CREDIT", 500))
    assert r["operation"] == "CREDIT"
    assert (r["previous_allocated"]["amount"], r["new_allocated"]["amount"]) == (1_000, 1_500)
    assert (r["previous_remaining"]["amount"], r["new_remaining"]["amount"]) == (650, 1_150)
    assert bal(tenant) == {"allocated": 1_500, "spent": 300, "reserved": 50, "debt": 0, "remaining": 1_150,
                           "overdraft_limit": 0, "is_over_limit": False}

    r = ok(fund(tenant, "", "DEBIT", 200))
    assert (r["new_allocated"]["amount"], r["new_remaining"]["amount"]) == (1_300, 950)
    before = all_balances(tenant)
    expect_error(fund(tenant, "", "DEBIT", 951), 409, "BUDGET_EXCEEDED")  # remaining would go negative
    assert all_balances(tenant) == before

    r = ok(fund(tenant, "", "RESET", 800))
    assert (r["new_allocated"]["amount"], r["new_remaining"]["amount"]) == (800, 450)
    assert bal(tenant) == {"allocated": 800, "spent": 300, "reserved": 50, "debt": 0, "remaining": 450,
                           "overdraft_limit": 0, "is_over_limit": False}

    r = ok(fund(tenant, "", "RESET_SPENT", 1_000, spent={"unit": USD, "amount": 100}))
    assert (r["previous_spent"]["amount"], r["new_spent"]["amount"]) == (300, 100)
    assert (r["new_allocated"]["amount"], r["new_remaining"]["amount"]) == (1_000, 850)
    r = ok(fund(tenant, "", "RESET_SPENT", 2_000))  # spent defaults to 0
    assert r["new_spent"]["amount"] == 0 and r["new_remaining"]["amount"] == 1_950
    assert bal(tenant) == {"allocated": 2_000, "spent": 0, "reserved": 50, "debt": 0, "remaining": 1_950,
                           "overdraft_limit": 0, "is_over_limit": False}


def test_funding_repay_debt_math(tenant: Tenant) -> None:
    tenant.budget("", 100, overdraft_limit=100)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100, overage_policy="ALLOW_WITH_OVERDRAFT")["reservation_id"]
        ok(commit(c, rid, 160))
    assert bal(tenant)["debt"] == 60 and bal(tenant)["remaining"] == -60

    r = ok(fund(tenant, "", "REPAY_DEBT", 40))
    assert (r["previous_debt"]["amount"], r["new_debt"]["amount"]) == (60, 20)
    assert (r["previous_remaining"]["amount"], r["new_remaining"]["amount"]) == (-60, -20)
    got = bal(tenant)
    assert got["debt"] == 20 and got["remaining"] == -20

    # More than the debt: the debt is cleared first and the rest becomes available.
    r = ok(fund(tenant, "", "REPAY_DEBT", 50))
    assert (r["previous_debt"]["amount"], r["new_debt"]["amount"]) == (20, 0)
    assert r["new_remaining"]["amount"] == 30
    got = bal(tenant)
    assert got["debt"] == 0 and got["remaining"] == 30


def test_repay_debt_clears_over_limit(tenant: Tenant) -> None:
    tenant.budget("", 100)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
        ok(commit(c, rid, 200))  # capped: scope over-limit, no debt
        assert bal(tenant)["is_over_limit"] is True
        expect_error(reserve(c, tenant, 1), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        ok(fund(tenant, "", "REPAY_DEBT", 10))
        got = bal(tenant)
        assert got["is_over_limit"] is False and got["debt"] == 0 and got["remaining"] == 10
        reserve_ok(c, tenant, 10)


def test_funding_unknown_budget_and_unit_mismatch(tenant: Tenant) -> None:
    tenant.budget("", 100)
    for r in (fund(tenant, "workspace:nope", "CREDIT", 1), fund(tenant, "", "CREDIT", 1, unit=TOKENS)):
        assert r.status_code == 404, r.text
        assert r.json()["error"] in ("NOT_FOUND", "BUDGET_NOT_FOUND")  # admin plane may use its own code
    with tenant.server.admin() as c:
        r = c.post("/v1/admin/budgets/fund",
                   params={"tenant_id": tenant.tenant_id, "scope": scope_of(tenant), "unit": USD},
                   json={"operation": "CREDIT", "amount": {"unit": TOKENS, "amount": 1}})
    expect_error(r, 400, "UNIT_MISMATCH")
    assert bal(tenant)["allocated"] == 100


# ---------------------------------------------------------------------------------------------
# decide and dry_run
# ---------------------------------------------------------------------------------------------


def test_decide_evaluates_and_changes_nothing(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 100)
    ws = tenant.subject(workspace="w")
    expected = [scope_of(tenant), scope_of(tenant, "workspace:w")]
    before = all_balances(tenant)
    with tenant.client() as c:
        d = ok(decide(c, tenant, 100, subject=ws))
        assert d["decision"] == "ALLOW" and d["affected_scopes"] == expected
        assert set(d) <= {"decision", "caps", "reason_code", "retry_after_ms", "affected_scopes"}
        assert "caps" not in d and "reason_code" not in d
        d = ok(decide(c, tenant, 101, subject=ws))
        assert d == {"decision": "DENY", "reason_code": "BUDGET_EXCEEDED", "affected_scopes": expected}
        assert all_balances(tenant) == before
        assert ok(c.get("/v1/reservations"))["reservations"] == []


def test_dry_run_evaluates_and_changes_nothing(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 100)
    ws = tenant.subject(workspace="w")
    expected = [scope_of(tenant), scope_of(tenant, "workspace:w")]
    before = all_balances(tenant)
    with tenant.client() as c:
        dry = ok(reserve(c, tenant, 100, subject=ws, dry_run=True))
        assert dry["decision"] == "ALLOW" and dry["affected_scopes"] == expected
        assert dry["scope_path"] == expected[-1]
        for absent in ("reservation_id", "expires_at_ms", "remaining_ttl_ms", "caps", "reason_code"):
            assert absent not in dry, dry
        if "balances" in dry:  # optional; must reflect the non-mutating evaluation
            check_balances(dry["balances"])
            assert all(b["reserved"]["amount"] == 0 for b in dry["balances"])
        deny = ok(reserve(c, tenant, 101, subject=ws, dry_run=True))
        assert deny["decision"] == "DENY" and deny["reason_code"] == "BUDGET_EXCEEDED"
        assert deny["affected_scopes"] == expected
        for absent in ("reservation_id", "expires_at_ms", "remaining_ttl_ms"):
            assert absent not in deny, deny
        assert all_balances(tenant) == before
        assert ok(c.get("/v1/reservations"))["reservations"] == []
        # A live reservation of the same amount still succeeds afterwards.
        reserve_ok(c, tenant, 100, subject=ws)


def test_live_reserve_never_answers_deny(tenant: Tenant) -> None:
    tenant.budget("", 10)
    with tenant.client() as c:
        r = reserve(c, tenant, 11)
        expect_error(r, 409, "BUDGET_EXCEEDED")


# ---------------------------------------------------------------------------------------------
# tenant isolation
# ---------------------------------------------------------------------------------------------


def test_other_tenant_is_forbidden_on_reservations(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    other = new_tenant(server)
    other.budget("", 1_000)
    with tenant.client() as a:
        rid = reserve_ok(a, tenant, 100)["reservation_id"]
    before = all_balances(tenant)
    with other.client() as b:
        expect_error(get_reservation(b, rid), 403, "FORBIDDEN")
        expect_error(commit(b, rid, 10), 403, "FORBIDDEN")
        expect_error(release(b, rid), 403, "FORBIDDEN")
        expect_error(extend(b, rid, 1_000), 403, "FORBIDDEN")
        assert ok(b.get("/v1/reservations"))["reservations"] == []
    assert all_balances(tenant) == before
    with tenant.client() as a:
        assert ok(get_reservation(a, rid))["status"] == "ACTIVE"


def test_other_tenant_cannot_replay_the_owners_commit(server: Server, tenant: Tenant) -> None:
    """Idempotency is per effective tenant: a foreign key reusing the owner's commit key and body must
    get 403, not the owner's stored response."""
    tenant.budget("", 1_000)
    other = new_tenant(server)
    key = new_key()
    with tenant.client() as a:
        rid = reserve_ok(a, tenant, 100)["reservation_id"]
        ok(commit(a, rid, 60, key=key))
        rid2 = reserve_ok(a, tenant, 100)["reservation_id"]
        ok(release(a, rid2, key=key))
    with other.client() as b:
        expect_error(commit(b, rid, 60, key=key), 403, "FORBIDDEN")
        expect_error(commit(b, rid, 61, key=key), 403, "FORBIDDEN")
        expect_error(release(b, rid2, key=key), 403, "FORBIDDEN")


def test_subject_tenant_must_match_the_key(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    other = new_tenant(server)
    foreign = {"tenant": tenant.tenant_id}
    with other.client() as b:
        expect_error(reserve(b, other, 1, subject=foreign), 403, "FORBIDDEN")
        expect_error(reserve(b, other, 1, subject=foreign, dry_run=True), 403, "FORBIDDEN")
        expect_error(decide(b, other, 1, subject=foreign), 403, "FORBIDDEN")
        expect_error(event(b, other, 1, subject=foreign), 403, "FORBIDDEN")
        expect_error(b.get("/v1/balances", params={"tenant": tenant.tenant_id}), 403, "FORBIDDEN")
        expect_error(b.get("/v1/reservations", params={"tenant": tenant.tenant_id}), 403, "FORBIDDEN")
    assert bal(tenant) == {"allocated": 1_000, "spent": 0, "reserved": 0, "debt": 0, "remaining": 1_000,
                           "overdraft_limit": 0, "is_over_limit": False}


def test_admin_key_reads_lists_and_releases_any_reservation(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as a:
        body = reserve_ok(a, tenant, 100)
    rid = body["reservation_id"]
    with server.admin() as admin:
        detail = ok(get_reservation(admin, rid))
        assert detail["reservation_id"] == rid and detail["status"] == "ACTIVE"
        listed = ok(admin.get("/v1/reservations", params={"tenant": tenant.tenant_id}))["reservations"]
        assert [r["reservation_id"] for r in listed] == [rid]
        err = expect_error(admin.get("/v1/reservations"), 400, "INVALID_REQUEST")
        assert "tenant" in err["message"]
        rel = ok(release(admin, rid, reason="[INCIDENT_FORCE_RELEASE]"))
        assert rel["status"] == "RELEASED" and rel["released"] == {"unit": USD, "amount": 100}
    assert bal(tenant)["reserved"] == 0
    with tenant.client() as a:
        assert ok(get_reservation(a, rid))["status"] == "RELEASED"


# ---------------------------------------------------------------------------------------------
# closed tenant
# ---------------------------------------------------------------------------------------------


def test_closed_tenant_guard(tenant: Tenant) -> None:
    tenant.budget("", 10_000)
    commit_key, reserve_key, event_key, decide_key, dry_key, extend_key = (new_key() for _ in range(6))
    with tenant.client() as c:
        reserved = reserve_ok(c, tenant, 100, key=reserve_key)
        committed_rid = reserved["reservation_id"]
        committed = ok(commit(c, committed_rid, 70, key=commit_key))
        evt = ok(event(c, tenant, 5, key=event_key), 201)
        active_rid = reserve_ok(c, tenant, 200)["reservation_id"]
        extended = ok(extend(c, active_rid, 1_000, key=extend_key))
        decided = ok(decide(c, tenant, 1, key=decide_key))
        dry = ok(reserve(c, tenant, 1, key=dry_key, dry_run=True))
        assert decided["decision"] == dry["decision"] == "ALLOW"

        close_tenant(tenant)
        op = tenant.server.admin()
        ledgers = lambda: ok(op.get("/v1/admin/budgets", params={"tenant_id": tenant.tenant_id}))["ledgers"]  # noqa: E731
        before = ledgers()
        # the close cascade released the open reservation and closed the budget
        assert [(l["status"], l["reserved"]["amount"]) for l in before] == [("CLOSED", 0)]

        expect_error(reserve(c, tenant, 1), 409, "TENANT_CLOSED")
        expect_error(commit(c, active_rid, 10), 409, "TENANT_CLOSED")
        expect_error(release(c, active_rid), 409, "TENANT_CLOSED")
        expect_error(extend(c, active_rid, 1_000), 409, "TENANT_CLOSED")
        expect_error(event(c, tenant, 1), 409, "TENANT_CLOSED")
        # TENANT_CLOSED beats RESERVATION_FINALIZED for a fresh key on a finalized reservation.
        expect_error(commit(c, committed_rid, 70), 409, "TENANT_CLOSED")
        expect_error(extend(c, committed_rid, 1_000), 409, "TENANT_CLOSED")
        with tenant.server.admin() as admin:
            expect_error(release(admin, active_rid), 409, "TENANT_CLOSED")

        for r in (reserve(c, tenant, 1, dry_run=True), decide(c, tenant, 1)):
            body = ok(r)
            assert body["decision"] == "DENY" and body["reason_code"] == "TENANT_CLOSED"
            assert body["affected_scopes"] == [scope_of(tenant)]
            assert "reservation_id" not in body and "remaining_ttl_ms" not in body

        # Same-key replays of pre-close successes keep their original responses.
        assert ok(commit(c, committed_rid, 70, key=commit_key)) == committed
        assert ok(event(c, tenant, 5, key=event_key), 201) == evt
        replay = ok(reserve(c, tenant, 100, key=reserve_key))
        assert replay["reservation_id"] == committed_rid and replay["remaining_ttl_ms"] == 0
        assert {k: v for k, v in replay.items() if k != "remaining_ttl_ms"} == {
            k: v for k, v in reserved.items() if k != "remaining_ttl_ms"}
        assert ok(extend(c, active_rid, 1_000, key=extend_key))["expires_at_ms"] == extended["expires_at_ms"]
        assert ok(decide(c, tenant, 1, key=decide_key)) == decided  # pre-close evaluations replay too
        assert ok(reserve(c, tenant, 1, key=dry_key, dry_run=True)) == dry

        # Reads stay available to operators; the tenant's own keys were revoked by the cascade.
        assert ok(get_reservation(op, active_rid))["status"] == "RELEASED"
        assert ok(get_reservation(op, committed_rid))["status"] == "COMMITTED"
        listed = {r["reservation_id"] for r in ok(op.get("/v1/reservations", params={"tenant": tenant.tenant_id}))["reservations"]}
        assert listed == {committed_rid, active_rid}
        assert ledgers() == before  # none of the refused mutations changed anything
        expect_error(c.get("/v1/balances", params={"tenant": tenant.tenant_id}), 401, "UNAUTHORIZED")
        op.close()


# ---------------------------------------------------------------------------------------------
# permissions
# ---------------------------------------------------------------------------------------------


def test_permissions_are_enforced(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        rid = reserve_ok(c, tenant, 100)["reservation_id"]
    read_only = add_key(tenant, ["balances:read"])
    no_balances = add_key(tenant, [p for p in ALL_TENANT_PERMISSIONS if p != "balances:read"])
    with read_only.client() as c:
        expect_error(reserve(c, tenant, 1), 403, "FORBIDDEN")
        expect_error(reserve(c, tenant, 1, dry_run=True), 403, "FORBIDDEN")
        expect_error(decide(c, tenant, 1), 403, "FORBIDDEN")
        expect_error(commit(c, rid, 1), 403, "FORBIDDEN")
        expect_error(release(c, rid), 403, "FORBIDDEN")
        expect_error(extend(c, rid, 1_000), 403, "FORBIDDEN")
        expect_error(c.get("/v1/reservations"), 403, "FORBIDDEN")
        expect_error(get_reservation(c, rid), 403, "FORBIDDEN")
        ok(c.get("/v1/balances", params={"tenant": tenant.tenant_id}))
    with no_balances.client() as c:
        expect_error(c.get("/v1/balances", params={"tenant": tenant.tenant_id}), 403, "FORBIDDEN")
        reserve_ok(c, tenant, 1)
    assert bal(tenant)["reserved"] == 101


def test_missing_or_bad_api_key_is_401(server: Server, tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with httpx.Client(base_url=server.base_url, timeout=30) as anon:
        expect_error(anon.post("/v1/reservations", json=reserve_body(tenant, 1)), 401, "UNAUTHORIZED")
    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": tenant.key + "x"}, timeout=30) as bad:
        expect_error(bad.post("/v1/reservations", json=reserve_body(tenant, 1)), 401, "UNAUTHORIZED")
    assert bal(tenant)["reserved"] == 0


# ---------------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------------


def test_event_applied_in_full(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 500)
    with tenant.client() as c:
        body = ok(event(c, tenant, 120, subject=tenant.subject(workspace="w")), 201)
        assert body["status"] == "APPLIED" and body["event_id"]
        assert "charged" not in body
        got = by_scope(body["balances"])
        assert got[scope_of(tenant)]["spent"] == 120 and got[scope_of(tenant, "workspace:w")]["spent"] == 120
        other = ok(event(c, tenant, 1), 201)
        assert other["event_id"] != body["event_id"]
    assert bal(tenant)["spent"] == 121 and bal(tenant, "workspace:w")["spent"] == 120


def test_event_capped_under_allow_if_available(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 100)
    with tenant.client() as c:
        body = ok(event(c, tenant, 150, subject=tenant.subject(workspace="w")), 201)
        assert body["charged"] == {"unit": USD, "amount": 100}
        got = by_scope(body["balances"])
        assert got[scope_of(tenant)] == {"allocated": 1_000, "spent": 100, "reserved": 0, "debt": 0,
                                         "remaining": 900, "overdraft_limit": 0, "is_over_limit": False}
        assert got[scope_of(tenant, "workspace:w")] == {"allocated": 100, "spent": 100, "reserved": 0, "debt": 0,
                                                        "remaining": 0, "overdraft_limit": 0, "is_over_limit": True}


def test_event_reject_policy(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    tenant.budget("workspace:w", 100)
    ws = tenant.subject(workspace="w")
    with tenant.client() as c:
        before = all_balances(tenant)
        err = expect_error(event(c, tenant, 101, subject=ws, overage_policy="REJECT"), 409, "BUDGET_EXCEEDED")
        assert err["details"]["scope"] == scope_of(tenant, "workspace:w")
        assert all_balances(tenant) == before  # the tenant scope, which could cover it, is untouched too
        body = ok(event(c, tenant, 100, subject=ws, overage_policy="REJECT"), 201)
        assert "charged" not in body


def test_event_allow_with_overdraft(tenant: Tenant) -> None:
    # The allocation is used up first, so "shortfall" and "whole amount" readings of the rule agree.
    tenant.budget("", 100, overdraft_limit=100)
    with tenant.client() as c:
        ok(event(c, tenant, 100, overage_policy="ALLOW_WITH_OVERDRAFT"), 201)
        body = ok(event(c, tenant, 60, overage_policy="ALLOW_WITH_OVERDRAFT"), 201)
        assert "charged" not in body  # applied in full
        got = by_scope(body["balances"])[scope_of(tenant)]
        assert (got["debt"], got["remaining"], got["reserved"], got["is_over_limit"]) == (60, -60, 0, False)
        assert got["spent"] + got["debt"] == 160  # all consumption is accounted for
        before = all_balances(tenant)
        expect_error(event(c, tenant, 41, overage_policy="ALLOW_WITH_OVERDRAFT"), 409, "OVERDRAFT_LIMIT_EXCEEDED")
        assert all_balances(tenant) == before
        ok(event(c, tenant, 40, overage_policy="ALLOW_WITH_OVERDRAFT"), 201)
    assert bal(tenant)["debt"] == 100 and bal(tenant)["remaining"] == -100


# ---------------------------------------------------------------------------------------------
# lifecycle basics
# ---------------------------------------------------------------------------------------------


def test_unknown_reservation_is_404(tenant: Tenant) -> None:
    with tenant.client() as c:
        for r in (get_reservation(c, "rsv_nope"), commit(c, "rsv_nope", 1), release(c, "rsv_nope"),
                  extend(c, "rsv_nope", 1_000)):
            expect_error(r, 404, "NOT_FOUND")


def test_finalized_reservation_refuses_further_mutations(tenant: Tenant) -> None:
    tenant.budget("", 1_000)
    with tenant.client() as c:
        committed = reserve_ok(c, tenant, 100)["reservation_id"]
        ok(commit(c, committed, 50))
        released = reserve_ok(c, tenant, 100)["reservation_id"]
        rel = ok(release(c, released))
        assert rel["status"] == "RELEASED" and rel["released"] == {"unit": USD, "amount": 100}
        assert by_scope(rel["balances"])[scope_of(tenant)]["reserved"] == 0
        before = all_balances(tenant)
        for rid in (committed, released):
            for r in (commit(c, rid, 1), release(c, rid), extend(c, rid, 1_000)):
                expect_error(r, 409, "RESERVATION_FINALIZED")
        assert all_balances(tenant) == before
    assert bal(tenant) == {"allocated": 1_000, "spent": 50, "reserved": 0, "debt": 0, "remaining": 950,
                           "overdraft_limit": 0, "is_over_limit": False}
