"""Governance events end to end on every store: emitted with the change that causes them (and
never for a change that did not happen), queried through the admin and tenant planes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from support import ALL_TENANT_PERMISSIONS, Server, Tenant, new_tenant, reserve_body

TOK = "TOKENS"


def events(server: Server, **params: Any) -> list[dict[str, Any]]:
    with server.admin() as c:
        r = c.get("/v1/admin/events", params={"limit": 100, **params})
    assert r.status_code == 200, r.text
    return r.json()["events"]


def types(server: Server, tenant: str, **params: Any) -> list[str]:
    return [e["event_type"] for e in reversed(events(server, tenant_id=tenant, **params))]


def reserve(t: Tenant, amount: int, **extra: Any) -> httpx.Response:
    with t.client() as c:
        return c.post("/v1/reservations", json=reserve_body(t, amount, unit=TOK, **extra))


def test_tenant_lifecycle_events(server: Server) -> None:
    tid = "ev-" + uuid.uuid4().hex[:10]
    with server.admin() as c:
        assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": "n"}).status_code == 201
        assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": "n"}).status_code == 200
        c.patch(f"/v1/admin/tenants/{tid}", json={"status": "SUSPENDED"})
        c.patch(f"/v1/admin/tenants/{tid}", json={"status": "ACTIVE", "default_reservation_ttl_ms": 5000})
        c.patch(f"/v1/admin/tenants/{tid}", json={"name": "renamed"})
    assert types(server, tid) == ["tenant.created", "tenant.suspended", "tenant.reactivated",
                                  "tenant.settings_changed", "tenant.updated"]
    ev = events(server, tenant_id=tid, event_type="tenant.suspended")[0]
    assert ev["category"] == "tenant" and ev["actor"]["type"] == "admin"
    assert ev["data"] == {"tenant_id": tid, "previous_status": "ACTIVE", "new_status": "SUSPENDED"}
    assert len(ev["trace_id"]) == 32 and ev["request_id"].startswith("req_")


def test_budget_and_runtime_events_and_no_event_without_its_change(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK, overdraft_limit=10)
    scope = {"scope": f"tenant:{tenant.tenant_id}", "unit": TOK}
    with server.admin() as c:
        assert c.post("/v1/admin/budgets/freeze", params=scope).status_code == 200
        assert c.post("/v1/admin/budgets/freeze", params=scope).status_code == 409  # no second event
        assert c.post("/v1/admin/budgets/unfreeze", params=scope).status_code == 200
    assert tenant.fund("", "CREDIT", 50, unit=TOK).status_code == 200
    # a live denial and a decide DENY are observed; a denied reserve changed nothing else
    assert reserve(tenant, 10_000).status_code == 409
    rid = reserve(tenant, 100).json()["reservation_id"]
    with tenant.client() as c:
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c1", "actual": {"unit": TOK, "amount": 100}})
        assert r.status_code == 200
    # remaining 50 → reserve 40, commit 58 with overdraft: 10 covered, 8 of debt, remaining -8 (exhausted)
    rid = reserve(tenant, 40, overage_policy="ALLOW_WITH_OVERDRAFT").json()["reservation_id"]
    with tenant.client() as c:
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c2", "actual": {"unit": TOK, "amount": 58}})
        assert r.status_code == 200, r.text
    with server.admin() as c:  # a lower limit puts the budget over it
        assert c.patch("/v1/admin/budgets", params=scope,
                       json={"overdraft_limit": {"unit": TOK, "amount": 5}}).json()["is_over_limit"] is True
    assert tenant.fund("", "REPAY_DEBT", 8, unit=TOK).status_code == 200
    got = types(server, tenant.tenant_id)
    assert got[:5] == ["tenant.created", "api_key.created", "budget.created", "budget.frozen", "budget.unfrozen"]
    assert got.count("budget.frozen") == 1
    assert "budget.funded" in got and "reservation.denied" in got
    for expected in ("reservation.commit_overage", "budget.debt_incurred", "budget.over_limit_entered",
                     "budget.exhausted", "budget.debt_repaid", "budget.over_limit_exited"):
        assert expected in got, (expected, got)
    denied = events(server, tenant_id=tenant.tenant_id, event_type="reservation.denied")[0]
    assert denied["data"]["reason_code"] == "BUDGET_EXCEEDED" and denied["data"]["requested_amount"] == 10_000
    assert denied["actor"]["type"] == "api_key" and denied["actor"]["key_id"].startswith("key_")
    funded = events(server, tenant_id=tenant.tenant_id, event_type="budget.funded")[0]
    assert funded["data"]["operation"] == "CREDIT" and funded["data"]["new"][0] == 150
    debt = events(server, tenant_id=tenant.tenant_id, event_type="budget.debt_incurred")[0]
    assert debt["data"]["debt_incurred"] == 8 and debt["data"]["reservation_id"] == rid
    # the request that caused an event is named on it (a tenant key's runtime request has no audit row)
    assert debt["request_id"].startswith("req_") and debt["correlation_id"] == f"request:{debt['request_id']}"
    assert debt["actor"]["type"] == "api_key" and len(debt["trace_id"]) == 32
    rows = server.admin().get("/v1/admin/audit/logs", params={"trace_id": debt["trace_id"]}).json()["logs"]
    assert rows == []


def test_expiry_event(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK)
    rid = reserve(tenant, 5, ttl_ms=1000, grace_period_ms=0).json()["reservation_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = events(server, tenant_id=tenant.tenant_id, event_type="reservation.expired")
        if found:
            break
        time.sleep(0.2)
    assert found and found[0]["data"]["reservation_id"] == rid and found[0]["actor"]["type"] == "system"


def test_cascade_events_share_a_correlation_id(server: Server) -> None:
    t = new_tenant(server)
    t.budget(amount=100, unit=TOK)
    reserve(t, 30)
    with server.admin() as c:
        c.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "CLOSED"})
    closed = events(server, tenant_id=t.tenant_id, event_type="tenant.closed")[0]
    corr = closed["correlation_id"]
    assert corr.startswith(f"tenant_close_cascade:{t.tenant_id}:")
    cascade = {e["event_type"]: e for e in events(server, tenant_id=t.tenant_id) if "via_tenant_cascade" in e["event_type"]}
    assert set(cascade) == {"reservation.released_via_tenant_cascade", "budget.closed_via_tenant_cascade",
                            "api_key.revoked_via_tenant_cascade"}
    assert cascade["reservation.released_via_tenant_cascade"]["data"]["released_amount"] == 30
    assert {e["correlation_id"] for e in cascade.values()} == {corr}  # the close and its cascade


def test_policy_key_and_auth_failure_events(server: Server, tenant: Tenant) -> None:
    with server.admin() as c:
        p = c.post("/v1/admin/policies", json={"tenant_id": tenant.tenant_id, "name": "p", "scope_pattern": "*"}).json()
        c.patch(f"/v1/admin/policies/{p['policy_id']}", json={"priority": 4})
        c.delete(f"/v1/admin/policies/{p['policy_id']}")
        key_id = c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id}).json()["keys"][0]["key_id"]
        c.patch(f"/v1/admin/api-keys/{key_id}", json={"permissions": ["balances:read"]})
        c.delete(f"/v1/admin/api-keys/{key_id}")
    got = types(server, tenant.tenant_id)
    assert [t for t in got if t.startswith(("policy.", "api_key."))] == [
        "api_key.created", "policy.created", "policy.updated", "policy.deleted", "api_key.permissions_changed",
        "api_key.revoked"]
    upd = events(server, tenant_id=tenant.tenant_id, event_type="policy.updated")[0]
    assert upd["data"]["changed_fields"] == ["priority"]
    trace = uuid.uuid4().hex
    httpx.get(server.base_url + "/v1/balances", headers={"X-Cycles-API-Key": "cyc_live_unknownkey000",
                                                         "X-Cycles-Trace-Id": trace})
    failed = events(server, trace_id=trace)
    assert [e["event_type"] for e in failed] == ["api_key.auth_failed"]
    assert failed[0]["data"]["key_prefix"] == "cyc_live_unkno" and failed[0]["category"] == "api_key"


def test_tenant_event_feed_is_scoped_and_paged(server: Server) -> None:
    t = new_tenant(server, ALL_TENANT_PERMISSIONS + ["events:read"])
    other = new_tenant(server, ALL_TENANT_PERMISSIONS + ["events:read"])
    t.budget(amount=10, unit=TOK)
    other.budget(amount=10, unit=TOK)
    for _ in range(3):
        reserve(t, 100)  # three denials
    with t.client() as c:
        seen, cursor = [], None
        while True:
            r = c.get("/v1/events", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            seen += r.json()["events"]
            if not r.json()["has_more"]:
                break
            cursor = r.json()["next_cursor"]
        assert {e["tenant_id"] for e in seen} == {t.tenant_id}
        assert {e["category"] for e in seen} <= {"budget", "reservation", "tenant"}  # no api_key.created
        assert sum(e["event_type"] == "reservation.denied" for e in seen) == 3
        only = c.get("/v1/events", params={"event_type": "budget.created"}).json()["events"]
        assert len(only) == 1 and only[0]["scope"] == f"tenant:{t.tenant_id}"
        assert c.get("/v1/events", params={"event_type": "nope"}).status_code == 400
    no_perm = new_tenant(server)
    with no_perm.client() as c:
        assert c.get("/v1/events").status_code == 403
    with server.admin() as c:
        assert c.get("/v1/events").status_code == 401  # tenant plane only
        r = c.get("/v1/admin/events/evt_missing")
        assert r.status_code == 404 and r.json()["error"] == "EVENT_NOT_FOUND"
        eid = seen[0]["event_id"]
        assert c.get(f"/v1/admin/events/{eid}").json()["event_id"] == eid


def test_every_event_carries_a_correlation_id(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK)
    rid = reserve(tenant, 10, ttl_ms=1000, grace_period_ms=0).json()["reservation_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not events(server, tenant_id=tenant.tenant_id, event_type="reservation.expired"):
        time.sleep(0.2)
    got = events(server, tenant_id=tenant.tenant_id)
    assert got and all(e.get("correlation_id") for e in got)
    created = events(server, tenant_id=tenant.tenant_id, event_type="budget.created")[0]
    assert created["correlation_id"] == f"request:{created['request_id']}"
    expired = events(server, tenant_id=tenant.tenant_id, event_type="reservation.expired")[0]
    assert expired["data"]["reservation_id"] == rid and expired["correlation_id"] == f"event:{expired['event_id']}"
