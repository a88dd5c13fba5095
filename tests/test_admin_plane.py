"""The admin plane end to end through a real server, on every store: policies enforced at reserve
time, key management, budget changes, the audit log, the close cascade."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from support import ALL_TENANT_PERMISSIONS, Server, Tenant, new_tenant, reserve_body

TOK = "TOKENS"


def policy(server: Server, tenant: Tenant, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "p-" + uuid.uuid4().hex[:6])
    with server.admin() as c:
        r = c.post("/v1/admin/policies", json={"tenant_id": tenant.tenant_id, **body})
    assert r.status_code == 201, r.text
    return r.json()


def reserve(tenant: Tenant, amount: int = 10, **extra: Any) -> httpx.Response:
    with tenant.client() as c:
        return c.post("/v1/reservations", json=reserve_body(tenant, amount, unit=TOK, **extra))


def audit(server: Server, **params: Any) -> list[dict[str, Any]]:
    with server.admin() as c:
        r = c.get("/v1/admin/audit/logs", params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    return r.json()["logs"]


# ---- policies ----

def test_caps_reach_the_response_and_follow_priority(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10_000, unit=TOK)
    policy(server, tenant, scope_pattern=f"tenant:{tenant.tenant_id}/*", priority=1,
           caps={"max_tokens": 100, "tool_denylist": ["shell"]})
    policy(server, tenant, scope_pattern="agent:special", priority=5, caps={"max_tokens": 9000})
    r = reserve(tenant, subject=tenant.subject(agent="plain"))
    assert r.status_code == 200, r.text
    assert r.json()["decision"] == "ALLOW_WITH_CAPS"
    assert r.json()["caps"] == {"max_tokens": 100, "tool_denylist": ["shell"]}
    r = reserve(tenant, subject=tenant.subject(agent="special"))
    assert r.json()["caps"] == {"max_tokens": 9000, "tool_denylist": ["shell"]}  # priority wins per field
    # The tenant scope itself is not a descendant of tenant:X/*: no caps there.
    r = reserve(tenant)
    assert r.json()["decision"] == "ALLOW" and "caps" not in r.json()
    with tenant.client() as c:
        d = c.post("/v1/decide", json={"idempotency_key": uuid.uuid4().hex, "subject": tenant.subject(agent="x"),
                                       "action": {"kind": "llm", "name": "m"}, "estimate": {"unit": TOK, "amount": 1}})
    assert d.json()["decision"] == "ALLOW_WITH_CAPS" and d.json()["caps"]["max_tokens"] == 100


def test_disabled_and_not_yet_effective_policies_do_not_apply(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10_000, unit=TOK)
    p = policy(server, tenant, scope_pattern=f"tenant:{tenant.tenant_id}", caps={"max_tokens": 5})
    future = policy(server, tenant, scope_pattern=f"tenant:{tenant.tenant_id}", caps={"max_steps_remaining": 1},
                    effective_from="2999-01-01T00:00:00Z")
    assert reserve(tenant).json()["caps"] == {"max_tokens": 5}
    with server.admin() as c:
        r = c.patch(f"/v1/admin/policies/{p['policy_id']}", json={"status": "DISABLED"})
        assert r.status_code == 200 and r.json()["status"] == "DISABLED"
    assert "caps" not in reserve(tenant).json()
    with server.admin() as c:
        assert c.patch(f"/v1/admin/policies/{future['policy_id']}",
                       json={"effective_from": "2000-01-01T00:00:00Z"}).status_code == 200
    assert reserve(tenant).json()["caps"] == {"max_steps_remaining": 1}
    with server.admin() as c:
        assert c.delete(f"/v1/admin/policies/{future['policy_id']}").status_code == 204
        assert c.get(f"/v1/admin/policies/{future['policy_id']}").status_code == 404
    assert "caps" not in reserve(tenant).json()


def test_rate_limit_answers_429_with_retry_after_per_scope(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10_000, unit=TOK)
    p = policy(server, tenant, scope_pattern="agent:*", rate_limits={"max_reservations_per_minute": 3})
    for _ in range(3):
        assert reserve(tenant, subject=tenant.subject(agent="a")).status_code == 200
    r = reserve(tenant, subject=tenant.subject(agent="a"))
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "LIMIT_EXCEEDED"
    assert r.json()["details"]["policy_id"] == p["policy_id"]
    assert r.json()["details"]["scope"] == f"tenant:{tenant.tenant_id}/agent:a"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # another agent has its own bucket; reservations outside the pattern are not limited
    assert reserve(tenant, subject=tenant.subject(agent="b")).status_code == 200
    assert reserve(tenant).status_code == 200
    # a denied reservation held nothing
    assert tenant.balance(unit=TOK)["reserved"]["amount"] == 50


def test_commit_rate_limit(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10_000, unit=TOK)
    policy(server, tenant, scope_pattern=f"tenant:{tenant.tenant_id}", rate_limits={"max_commits_per_minute": 1})
    ids = [reserve(tenant).json()["reservation_id"] for _ in range(2)]
    with tenant.client() as c:
        body = {"idempotency_key": uuid.uuid4().hex, "actual": {"unit": TOK, "amount": 5}}
        assert c.post(f"/v1/reservations/{ids[0]}/commit", json=body).status_code == 200
        r = c.post(f"/v1/reservations/{ids[1]}/commit", json={**body, "idempotency_key": uuid.uuid4().hex})
        assert r.status_code == 429 and "Retry-After" in r.headers
        # the refused commit changed nothing: the reservation is still open and can be released
        assert c.post(f"/v1/reservations/{ids[1]}/release", json={"idempotency_key": uuid.uuid4().hex}).status_code == 200


def test_ttl_override_and_overage_precedence(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=1000, unit=TOK, commit_overage_policy="ALLOW_IF_AVAILABLE")
    policy(server, tenant, scope_pattern=f"tenant:{tenant.tenant_id}",
           reservation_ttl_override={"default_ttl_ms": 5000, "max_ttl_ms": 7000, "max_extensions": 1},
           commit_overage_policy="REJECT")
    r = reserve(tenant, 10)
    assert r.json()["remaining_ttl_ms"] <= 5000 and r.json()["expires_at_ms"] > 0
    r2 = reserve(tenant, 10, ttl_ms=60_000)
    assert r2.json()["remaining_ttl_ms"] <= 7000  # capped by the policy, not the tenant's 1 h
    with tenant.client() as c:
        rid = r.json()["reservation_id"]
        ext = {"idempotency_key": uuid.uuid4().hex, "extend_by_ms": 1000}
        assert c.post(f"/v1/reservations/{rid}/extend", json=ext).status_code == 200
        r = c.post(f"/v1/reservations/{rid}/extend", json={**ext, "idempotency_key": uuid.uuid4().hex})
        assert r.json()["error"] == "MAX_EXTENSIONS_EXCEEDED"
        # the policy's REJECT beats the budget's ALLOW_IF_AVAILABLE ...
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": uuid.uuid4().hex,
                                                           "actual": {"unit": TOK, "amount": 20}})
        assert r.status_code == 409 and r.json()["error"] == "BUDGET_EXCEEDED"
    # ... and the reservation's own policy beats the policy's
    r = reserve(tenant, 10, overage_policy="ALLOW_IF_AVAILABLE")
    with tenant.client() as c:
        r = c.post(f"/v1/reservations/{r.json()['reservation_id']}/commit",
                   json={"idempotency_key": uuid.uuid4().hex, "actual": {"unit": TOK, "amount": 20}})
        assert r.status_code == 200 and r.json()["charged"]["amount"] == 20


def test_tenant_key_manages_its_own_policies_only(server: Server) -> None:
    a = new_tenant(server, ALL_TENANT_PERMISSIONS + ["policies:read", "policies:write"])
    b = new_tenant(server, ALL_TENANT_PERMISSIONS + ["policies:read", "policies:write"])
    with a.client() as c:
        r = c.post("/v1/admin/policies", json={"name": "mine", "scope_pattern": f"tenant:{a.tenant_id}/*"})
        assert r.status_code == 201, r.text
        pid = r.json()["policy_id"]
        assert c.post("/v1/admin/policies", json={"name": "x", "scope_pattern": f"tenant:{b.tenant_id}"}).status_code == 400
        assert c.post("/v1/admin/policies", json={"name": "x", "scope_pattern": "*", "tenant_id": b.tenant_id}).status_code == 400
        assert [p["policy_id"] for p in c.get("/v1/admin/policies").json()["policies"]] == [pid]
    with b.client() as c:
        assert c.get(f"/v1/admin/policies/{pid}").status_code == 404
        assert c.patch(f"/v1/admin/policies/{pid}", json={"priority": 3}).status_code == 404
        assert c.delete(f"/v1/admin/policies/{pid}").status_code == 404
        assert c.get("/v1/admin/policies").json()["policies"] == []


# ---- keys ----

def test_key_patch_and_revoke_take_effect_at_once(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10_000, unit=TOK)
    with server.admin() as c:
        keys = c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id}).json()["keys"]
        assert len(keys) == 1 and keys[0]["status"] == "ACTIVE" and "secret_hash" not in keys[0]
        key_id = keys[0]["key_id"]
        r = c.patch(f"/v1/admin/api-keys/{key_id}", json={"permissions": ["balances:read"]})
        assert r.status_code == 200 and r.json()["permissions"] == ["balances:read"]
    assert reserve(tenant).status_code == 403
    with server.admin() as c:
        c.patch(f"/v1/admin/api-keys/{key_id}", json={"permissions": ALL_TENANT_PERMISSIONS,
                                                      "scope_filter": ["workspace:eng"]})
    assert reserve(tenant, subject=tenant.subject(workspace="ops")).status_code == 403
    assert reserve(tenant, subject=tenant.subject(workspace="eng", agent="a")).status_code == 200
    with server.admin() as c:
        r = c.delete(f"/v1/admin/api-keys/{key_id}", params={"reason": "leaked"})
        assert r.status_code == 200 and r.json()["status"] == "REVOKED" and r.json()["revoked_reason"] == "leaked"
        assert c.delete(f"/v1/admin/api-keys/{key_id}").json()["error"] == "KEY_REVOKED"
        assert c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id, "status": "ACTIVE"}).json()["keys"] == []
    assert reserve(tenant, subject=tenant.subject(workspace="eng")).status_code == 401


def test_last_used_at_is_recorded(server: Server, tenant: Tenant) -> None:
    with tenant.client() as c:
        c.get("/v1/balances", params={"tenant": tenant.tenant_id})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with server.admin() as c:
            key = c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id}).json()["keys"][0]
        if key.get("last_used_at"):
            return
        time.sleep(0.2)
    pytest.fail("last_used_at was never recorded")


def test_introspect(server: Server, tenant: Tenant) -> None:
    with server.admin() as c:
        r = c.get("/v1/auth/introspect").json()
    assert r["auth_type"] == "admin" and r["permissions"] == ["*"] and all(r["capabilities"].values())
    assert "tenant_id" not in r
    with tenant.client() as c:
        r = c.get("/v1/auth/introspect").json()
    assert r["auth_type"] == "tenant" and r["tenant_id"] == tenant.tenant_id
    assert r["capabilities"]["view_budgets"] and not r["capabilities"]["view_tenants"]
    assert not r["capabilities"]["view_webhooks"]


# ---- budgets ----

def test_freeze_blocks_reservations_and_funding_until_unfrozen(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=1000, unit=TOK)
    scope = {"scope": f"tenant:{tenant.tenant_id}", "unit": TOK}
    held = reserve(tenant, 10).json()["reservation_id"]
    with server.admin() as c:
        r = c.post("/v1/admin/budgets/freeze", params=scope, json={"reason": "incident 42"})
        assert r.status_code == 200 and r.json()["status"] == "FROZEN"
        assert c.post("/v1/admin/budgets/freeze", params=scope).status_code == 409
    assert reserve(tenant).json()["error"] == "BUDGET_FROZEN"
    assert tenant.fund("", "CREDIT", 5, unit=TOK).json()["error"] == "BUDGET_FROZEN"
    with tenant.client() as c:  # in-flight work still settles: no lost spend
        r = c.post(f"/v1/reservations/{held}/commit", json={"idempotency_key": "c1", "actual": {"unit": TOK, "amount": 7}})
        assert r.status_code == 200, r.text
    with server.admin() as c:
        assert c.post("/v1/admin/budgets/unfreeze", params=scope).json()["status"] == "ACTIVE"
        assert c.post("/v1/admin/budgets/unfreeze", params=scope).status_code == 409
        got = c.get("/v1/admin/budgets/lookup", params=scope).json()
        assert got["spent"]["amount"] == 7 and got["reserved"]["amount"] == 0
    assert reserve(tenant).status_code == 200
    rows = audit(server, operation="freezeBudget", tenant_id="__admin__")
    assert any(r.get("metadata", {}).get("target_tenant_id") == tenant.tenant_id
               and r["metadata"].get("reason") == "incident 42" for r in rows)


def test_patch_budget_recomputes_over_limit(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=10, unit=TOK, overdraft_limit=100)
    rid = reserve(tenant, 10, overage_policy="ALLOW_WITH_OVERDRAFT").json()["reservation_id"]
    with tenant.client() as c:
        c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c", "actual": {"unit": TOK, "amount": 60}})
    scope = {"scope": f"tenant:{tenant.tenant_id}", "unit": TOK}
    with server.admin() as c:
        r = c.patch("/v1/admin/budgets", params=scope, json={"overdraft_limit": {"unit": TOK, "amount": 20}})
        assert r.status_code == 200 and r.json()["is_over_limit"] is True and r.json()["debt"]["amount"] == 50
        r = c.get("/v1/admin/budgets", params={"tenant_id": tenant.tenant_id, "over_limit": "true"})
        assert len(r.json()["ledgers"]) == 1
        r = c.patch("/v1/admin/budgets", params=scope, json={"overdraft_limit": {"unit": TOK, "amount": 80},
                                                             "commit_overage_policy": "REJECT",
                                                             "metadata": {"owner": "ops"}})
        assert r.json()["is_over_limit"] is False and r.json()["commit_overage_policy"] == "REJECT"
        assert r.json()["metadata"] == {"owner": "ops"}


def test_lookup_is_tenant_scoped(server: Server, tenant: Tenant) -> None:
    other = new_tenant(server)
    other.budget(amount=5, unit=TOK)
    with tenant.client() as c:
        r = c.get("/v1/admin/budgets/lookup", params={"scope": f"tenant:{other.tenant_id}", "unit": TOK})
    assert r.status_code == 404 and other.tenant_id not in r.json().get("details", {}).get("scope", "x")


# ---- tenants ----

def test_tenant_list_filters_search_and_pages(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"list-{tag}-{i}" for i in range(5)]
    with server.admin() as c:
        for i, tid in enumerate(ids):
            assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": f"Team {tag} {i}"}).status_code == 201
        c.patch(f"/v1/admin/tenants/{ids[0]}", json={"status": "SUSPENDED"})
        seen, cursor = [], None
        while True:
            params = {"search": tag, "limit": 2, **({"cursor": cursor} if cursor else {})}
            body = c.get("/v1/admin/tenants", params=params).json()
            seen += [t["tenant_id"] for t in body["tenants"]]
            cursor = body.get("next_cursor")
            if not body["has_more"]:
                break
        assert seen == sorted(ids)
        r = c.get("/v1/admin/tenants", params={"search": tag, "status": "SUSPENDED"}).json()
        assert [t["tenant_id"] for t in r["tenants"]] == [ids[0]]
        r = c.get("/v1/admin/tenants", params={"search": tag, "sort_by": "tenant_id", "sort_dir": "desc"}).json()
        assert [t["tenant_id"] for t in r["tenants"]] == sorted(ids, reverse=True)


# ---- audit ----

def test_audit_rows_for_admin_and_failed_auth_not_tenant_runtime(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK)
    trace = uuid.uuid4().hex
    with tenant.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(tenant, 5, unit=TOK), headers={"X-Cycles-Trace-Id": trace})
    assert r.status_code == 200
    rid = r.json()["reservation_id"]
    # runtime operations of a tenant key are recorded by the reservation and its events, not audited
    assert audit(server, trace_id=trace) == []
    with tenant.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(tenant, 10**9, unit=TOK), headers={"X-Cycles-Trace-Id": trace})
    assert r.status_code == 409
    assert audit(server, trace_id=trace) == []
    with server.admin() as c:  # ... their denial is an event carrying the request's ids
        events = c.get("/v1/admin/events", params={"trace_id": trace}).json()["events"]
    assert [e["event_type"] for e in events] == ["reservation.denied"]
    assert events[0]["request_id"] == r.headers["X-Request-Id"] and events[0]["actor"]["type"] == "api_key"
    # an operator releasing it with the admin key is audited (spec: actor_type admin_on_behalf_of)
    with server.admin() as c:
        r = c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": uuid.uuid4().hex},
                   headers={"X-Cycles-Trace-Id": trace})
    assert r.status_code == 200
    rows = audit(server, trace_id=trace)
    assert len(rows) == 1
    row = rows[0]
    assert row["operation"] == "releaseReservation" and row["status"] == 200 and row["resource_id"] == rid
    assert row["tenant_id"] == "__admin__" and row["metadata"]["actor_type"] == "admin_on_behalf_of"
    assert row["request_id"] == r.headers["X-Request-Id"]
    # a refused admin mutation leaves a row with its error code
    with server.admin() as c:
        r = c.post("/v1/admin/budgets", json={"tenant_id": tenant.tenant_id, "scope": f"tenant:{tenant.tenant_id}",
                                              "unit": TOK, "allocated": {"unit": TOK, "amount": 1}},
                   headers={"X-Cycles-Trace-Id": trace})
    assert r.status_code == 409
    rows = audit(server, trace_id=trace, error_code=r.json()["error"])
    assert len(rows) == 1 and rows[0]["status"] == 409
    assert len(audit(server, trace_id=trace, error_code_exclude=r.json()["error"])) == 1
    # reads are not audited; failed authentication is, under __unauth__
    bad_trace = uuid.uuid4().hex
    httpx.get(server.base_url + "/v1/balances", headers={"X-Cycles-API-Key": "cyc_live_nope-nope-nope",
                                                         "X-Cycles-Trace-Id": bad_trace})
    rows = audit(server, trace_id=bad_trace)
    assert len(rows) == 1 and rows[0]["tenant_id"] == "__unauth__" and rows[0]["status"] == 401
    assert audit(server, tenant_id=tenant.tenant_id, operation="getBalances") == []


def test_audit_pagination_is_complete_and_ordered(server: Server, tenant: Tenant) -> None:
    # Other tests (and other workers) write operator rows on the same server: read only the rows since
    # this test started, and of those only this tenant's.
    since = (datetime.now(timezone.utc) - timedelta(seconds=2)).isoformat()
    for i in range(7):
        policy(server, tenant, name=f"p{i}", scope_pattern=f"tenant:{tenant.tenant_id}")
    seen, cursor = [], None
    with server.admin() as c:
        while True:
            params = {"tenant_id": "__admin__", "operation": "createPolicy", "limit": 3, "from": since,
                      **({"cursor": cursor} if cursor else {})}
            body = c.get("/v1/admin/audit/logs", params=params).json()
            seen += body["logs"]
            cursor = body.get("next_cursor")
            if not body["has_more"]:
                break
        asc = c.get("/v1/admin/audit/logs", params={"tenant_id": "__admin__", "operation": "createPolicy",
                                                    "sort_dir": "asc", "from": since, "limit": 200}).json()["logs"]
    seen = [r for r in seen if (r.get("metadata") or {}).get("target_tenant_id") == tenant.tenant_id]
    asc = [r for r in asc if (r.get("metadata") or {}).get("target_tenant_id") == tenant.tenant_id]
    assert len(seen) == 7 == len({r["log_id"] for r in seen})
    assert [r["log_id"] for r in asc] == [r["log_id"] for r in reversed(seen)]


# ---- close cascade ----

def test_close_cascades_and_freezes_every_mutation(server: Server) -> None:
    t = new_tenant(server, ALL_TENANT_PERMISSIONS + ["policies:write", "policies:read"])
    t.budget(amount=1000, unit=TOK)
    t.budget("workspace:eng", amount=500, unit=TOK)
    held = [reserve(t, 30, subject=t.subject(workspace="eng")).json()["reservation_id"] for _ in range(3)]
    pol = policy(server, t, scope_pattern=f"tenant:{t.tenant_id}", caps={"max_tokens": 1})
    with server.admin() as c:
        r = c.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "CLOSED"})
        assert r.status_code == 200 and r.json()["status"] == "CLOSED" and r.json()["closed_at"]
        ledgers = c.get("/v1/admin/budgets", params={"tenant_id": t.tenant_id}).json()["ledgers"]
        assert {l["status"] for l in ledgers} == {"CLOSED"} and all(l["reserved"]["amount"] == 0 for l in ledgers)
        keys = c.get("/v1/admin/api-keys", params={"tenant_id": t.tenant_id}).json()["keys"]
        assert {k["status"] for k in keys} == {"REVOKED"}
        for rid in held:  # reads stay available
            r = c.get(f"/v1/reservations/{rid}")
            assert r.status_code == 200 and r.json()["status"] == "RELEASED"
        assert c.get(f"/v1/admin/tenants/{t.tenant_id}").status_code == 200
        assert c.get(f"/v1/admin/policies/{pol['policy_id']}").status_code == 200
        # every later mutation of the tenant's objects answers 409 TENANT_CLOSED
        for method, path, kw in [
            ("PATCH", f"/v1/admin/tenants/{t.tenant_id}", {"json": {"name": "x"}}),
            ("PATCH", f"/v1/admin/policies/{pol['policy_id']}", {"json": {"priority": 2}}),
            ("DELETE", f"/v1/admin/policies/{pol['policy_id']}", {}),
            ("POST", "/v1/admin/policies", {"json": {"tenant_id": t.tenant_id, "name": "n", "scope_pattern": "*"}}),
            ("POST", "/v1/admin/budgets", {"json": {"tenant_id": t.tenant_id, "scope": f"tenant:{t.tenant_id}/app:a",
                                                    "unit": TOK, "allocated": {"unit": TOK, "amount": 1}}}),
            ("POST", "/v1/admin/budgets/freeze", {"params": {"scope": f"tenant:{t.tenant_id}", "unit": TOK}}),
            ("PATCH", "/v1/admin/budgets", {"params": {"scope": f"tenant:{t.tenant_id}", "unit": TOK},
                                            "json": {"commit_overage_policy": "REJECT"}}),
            ("POST", "/v1/admin/budgets/fund", {"params": {"tenant_id": t.tenant_id, "scope": f"tenant:{t.tenant_id}",
                                                           "unit": TOK},
                                                "json": {"operation": "CREDIT", "amount": {"unit": TOK, "amount": 1}}}),
            ("PATCH", f"/v1/admin/api-keys/{keys[0]['key_id']}", {"json": {"name": "x"}}),
            ("POST", "/v1/admin/api-keys", {"json": {"tenant_id": t.tenant_id, "name": "new"}}),
            ("POST", f"/v1/reservations/{held[0]}/release", {"json": {"idempotency_key": "r"}}),
        ]:
            r = c.request(method, path, **kw)
            assert r.status_code == 409 and r.json()["error"] == "TENANT_CLOSED", (method, path, r.text)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_cascade_interrupted_by_a_crash_is_finished_at_startup(kind: str, tmp_path: Any,
                                                               request: pytest.FixtureRequest) -> None:
    """The CLOSED flip commits first; a process that dies before the cascade ends leaves it PENDING,
    and the next server start finishes it."""
    import asyncio

    from conftest import store_url
    from support import start_server

    from cycles.store import open_store

    url = store_url(kind, tmp_path, request)
    srv = start_server(url, tmp_path)
    try:
        t = new_tenant(srv)
        t.budget(amount=1000, unit=TOK)
        held = [reserve(t, 25).json()["reservation_id"] for _ in range(4)]
    finally:
        srv.stop()

    async def flip_only() -> None:  # what a crash right after the flip leaves behind
        store = open_store(url)
        try:
            rec = await store.update_tenant(t.tenant_id, {"status": "CLOSED"}, "2026-01-01T00:00:00.000Z")
            assert rec["cascade"] == "PENDING"
            assert t.tenant_id in await store.pending_cascades()
        finally:
            await store.close()

    asyncio.run(flip_only())
    srv = start_server(url, tmp_path)
    try:
        with srv.admin() as c:
            led = c.get("/v1/admin/budgets/lookup", params={"scope": f"tenant:{t.tenant_id}", "unit": TOK}).json()
            assert led["status"] == "CLOSED" and led["reserved"]["amount"] == 0 and led["spent"]["amount"] == 0
            assert all(c.get(f"/v1/reservations/{rid}").json()["status"] == "RELEASED" for rid in held)
            keys = c.get("/v1/admin/api-keys", params={"tenant_id": t.tenant_id}).json()["keys"]
            assert {k["status"] for k in keys} == {"REVOKED"}
    finally:
        srv.stop()

    async def check_done() -> None:
        store = open_store(url)
        try:
            assert t.tenant_id not in await store.pending_cascades()
        finally:
            await store.close()

    asyncio.run(check_done())


# ---- operator identity ----

def test_named_operator_keys_audit_permissions_and_bootstrap_rotation(tmp_path: Any, request: pytest.FixtureRequest) -> None:
    """Each operator has an own key, audited under its id, limited by granular admin permissions;
    the bootstrap key can be turned off without a restart once named keys exist."""
    from conftest import store_url
    from support import start_server

    srv = start_server(store_url("sqlite", tmp_path, request), tmp_path)
    try:
        with srv.admin() as c:
            r = c.post("/v1/admin/operator-keys", json={"name": "alice"})
            assert r.status_code == 201, r.text
            alice = r.json()["key_secret"]
            assert alice.startswith("cyc_op_") and "secret_hash" not in r.text
            viewer = c.post("/v1/admin/operator-keys", json={"name": "viewer", "permissions": ["admin:read"]}).json()
        a = httpx.Client(base_url=srv.base_url, headers={"X-Admin-API-Key": alice})
        v = httpx.Client(base_url=srv.base_url, headers={"X-Admin-API-Key": viewer["key_secret"]})
        tid = "op-" + uuid.uuid4().hex[:8]
        r = a.post("/v1/admin/tenants", json={"tenant_id": tid, "name": "x"})
        assert r.status_code == 201
        assert v.get("/v1/admin/tenants").status_code == 200
        r = v.post("/v1/admin/tenants", json={"tenant_id": tid + "-2", "name": "x"})
        assert r.status_code == 403 and r.json()["error"] == "INSUFFICIENT_PERMISSIONS"
        # no escalation: a viewer cannot mint a writer
        assert v.post("/v1/admin/operator-keys", json={"name": "evil", "permissions": ["*"]}).status_code == 403
        rows = [row for row in a.get("/v1/admin/audit/logs", params={"operation": "createTenant"}).json()["logs"]
                if row.get("metadata", {}).get("target_tenant_id") == tid]
        assert rows and rows[0]["key_id"].startswith("op_") and rows[0]["tenant_id"] == "__admin__"
        # the bootstrap key cannot disable itself; alice can, and the bootstrap key stops working at once
        with srv.admin() as c:
            assert c.post("/v1/admin/operator-keys/bootstrap/disable").status_code == 400
        assert a.post("/v1/admin/operator-keys/bootstrap/disable").status_code == 200
        with srv.admin() as c:
            assert c.get("/v1/admin/tenants").status_code == 401
        assert a.get("/v1/admin/tenants").status_code == 200
        # revoking takes effect at once
        assert a.delete(f"/v1/admin/operator-keys/{viewer['key']['key_id']}").status_code == 200
        assert v.get("/v1/admin/tenants").status_code == 401
        listed = a.get("/v1/admin/operator-keys").json()
        assert listed["bootstrap_disabled"] is True and {k["status"] for k in listed["keys"]} == {"ACTIVE", "REVOKED"}
    finally:
        srv.stop()


def test_overview_counts_follow_every_change(server: Server) -> None:
    def counts() -> dict[str, Any]:
        with server.admin() as c:
            r = c.get("/v1/admin/overview")
        assert r.status_code == 200, r.text
        return r.json()

    before = counts()
    t = new_tenant(server)
    t.budget(amount=10, unit=TOK, overdraft_limit=5)
    rid = reserve(t, 10, overage_policy="ALLOW_WITH_OVERDRAFT").json()["reservation_id"]
    with t.client() as c:
        c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c", "actual": {"unit": TOK, "amount": 13}})
    after = counts()
    assert after["tenant_counts"]["active"] == before["tenant_counts"]["active"] + 1
    assert after["budget_counts"]["total"] == before["budget_counts"]["total"] + 1
    assert after["budget_counts"]["with_debt"] == before["budget_counts"]["with_debt"] + 1
    assert after["budget_counts"]["by_unit"][TOK] == before["budget_counts"]["by_unit"].get(TOK, 0) + 1
    assert any(d["scope"] == f"tenant:{t.tenant_id}" and d["debt"] == 3 for d in after["debt_scopes"])
    with server.admin() as c:
        c.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "CLOSED"})
    closed = counts()
    assert closed["tenant_counts"]["closed"] == after["tenant_counts"]["closed"] + 1
    assert closed["budget_counts"]["closed"] == after["budget_counts"]["closed"] + 1
    assert closed["tenant_counts"]["total"] == after["tenant_counts"]["total"]


def test_budget_list_utilization_search_and_sort(server: Server, tenant: Tenant) -> None:
    for i, spent in enumerate((0, 25, 50, 99)):
        tenant.budget(f"workspace:w{i}", amount=100, unit=TOK)
        if spent:
            rid = reserve(tenant, spent, subject=tenant.subject(workspace=f"w{i}")).json()
            assert "reservation_id" in rid, rid
    # the tenant budget is missing, so each reservation charges only its workspace budget
    with tenant.client() as c:
        for r in c.get("/v1/reservations", params={"status": "ACTIVE"}).json()["reservations"]:
            c.post(f"/v1/reservations/{r['reservation_id']}/commit",
                   json={"idempotency_key": r["reservation_id"], "actual": r["reserved"]})
    base = {"tenant_id": tenant.tenant_id}
    with server.admin() as c:
        def scopes(**params: Any) -> list[str]:
            r = c.get("/v1/admin/budgets", params={**base, **params})
            assert r.status_code == 200, r.text
            return [l["scope"].rsplit(":", 1)[1] for l in r.json()["ledgers"]]

        assert scopes(utilization_min="0.25", utilization_max="0.5", sort_by="utilization", sort_dir="asc") == ["w1", "w2"]
        assert scopes(sort_by="utilization") == ["w3", "w2", "w1", "w0"]
        assert scopes(search="W2") == ["w2"]
        seen, cursor = [], None
        while True:
            r = c.get("/v1/admin/budgets", params={**base, "sort_by": "utilization", "limit": 1,
                                                   **({"cursor": cursor} if cursor else {})}).json()
            seen += [l["scope"].rsplit(":", 1)[1] for l in r["ledgers"]]
            if not r["has_more"]:
                break
            cursor = r["next_cursor"]
        assert seen == ["w3", "w2", "w1", "w0"]
        for bad_value in ("1.5", "-0.1", "nan", "abc", "1e400"):
            assert c.get("/v1/admin/budgets", params={**base, "utilization_min": bad_value}).status_code == 400
        assert c.get("/v1/admin/budgets", params={**base, "utilization_min": "0.9",
                                                  "utilization_max": "0.1"}).status_code == 400


def test_suspended_tenant_is_read_only_but_in_flight_work_settles(server: Server) -> None:
    t = new_tenant(server, ALL_TENANT_PERMISSIONS + ["policies:write", "policies:read"])
    t.budget(amount=100, unit=TOK)
    rid = reserve(t, 10).json()["reservation_id"]
    with server.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "SUSPENDED"}).json()["suspended_at"]
    with t.client() as c:
        assert reserve(t).status_code == 403
        r = c.post("/v1/admin/policies", json={"name": "n", "scope_pattern": "*"})
        assert r.status_code == 409 and r.json()["error"] == "TENANT_SUSPENDED"
        assert c.get("/v1/balances", params={"tenant": t.tenant_id}).status_code == 200
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "c", "actual": {"unit": TOK, "amount": 4}})
        assert r.status_code == 200
    assert t.fund("", "CREDIT", 5, unit=TOK).status_code == 200  # operators still act on it
    with server.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "ACTIVE"}).status_code == 200
    assert reserve(t).status_code == 200


def test_scope_prefix_matches_whole_segments(server: Server, tenant: Tenant) -> None:
    for ws in ("eng", "engineering"):
        tenant.budget(f"workspace:{ws}", amount=10, unit=TOK)
    tenant.budget("workspace:eng/agent:a", amount=10, unit=TOK)
    with server.admin() as c:
        r = c.get("/v1/admin/budgets", params={"tenant_id": tenant.tenant_id,
                                               "scope_prefix": f"tenant:{tenant.tenant_id}/workspace:eng"})
    assert sorted(l["scope"].split("/", 1)[1] for l in r.json()["ledgers"]) == ["workspace:eng", "workspace:eng/agent:a"]


def test_close_budget_waits_for_its_reservations(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK)
    scope = {"scope": f"tenant:{tenant.tenant_id}", "unit": TOK}
    rid = reserve(tenant, 10).json()["reservation_id"]
    with server.admin() as c:
        r = c.post("/v1/admin/budgets/close", params=scope, json={"reason": "project over"})
        assert r.status_code == 409 and "open reservations" in r.json()["message"]
    with tenant.client() as c:
        assert c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": "r"}).status_code == 200
    with server.admin() as c:
        r = c.post("/v1/admin/budgets/close", params=scope)
        assert r.status_code == 200 and r.json()["status"] == "CLOSED"
        assert c.post("/v1/admin/budgets/close", params=scope).json()["error"] == "BUDGET_CLOSED"
        closed = c.get("/v1/admin/events", params={"tenant_id": tenant.tenant_id, "event_type": "budget.closed"})
        assert len(closed.json()["events"]) == 1
    assert reserve(tenant).json()["error"] == "BUDGET_CLOSED"
    assert tenant.fund("", "CREDIT", 1, unit=TOK).json()["error"] == "BUDGET_CLOSED"
