"""The APIs the dashboard adds, on every store: spend over time (admin and tenant planes), denial
analytics and the live event stream (server-sent events). All derive from what reserve/commit already
record; nothing here is on the hot path."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx

from support import USD, Server, Tenant, new_tenant, reserve_body


def _commit(t: Tenant, estimate: int, actual: int, **subject: str) -> None:
    with t.client() as c:
        body = reserve_body(t, estimate, subject=t.subject(**subject), action={"kind": "tool.call", "name": subject.get("agent", "x") + "-tool"})
        rid = c.post("/v1/reservations", json=body).json()["reservation_id"]
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": uuid.uuid4().hex,
                                                           "actual": {"unit": USD, "amount": actual}})
        assert r.status_code == 200, r.text


def test_usage_over_time_by_group_on_both_planes(server: Server) -> None:
    t = new_tenant(server, permissions=["reservations:create", "reservations:commit", "reservations:list", "events:read"])
    t.budget("", 1_000_000)
    _commit(t, 500, 300, workspace="eng", agent="alpha")
    _commit(t, 500, 200, workspace="eng", agent="beta")
    _commit(t, 500, 100, workspace="ops", agent="alpha")
    with t.client() as c:  # an open and a released reservation are not spend
        rid = c.post("/v1/reservations", json=reserve_body(t, 999)).json()["reservation_id"]
        c.post("/v1/reservations", json=reserve_body(t, 777))
        c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": uuid.uuid4().hex})
    with server.admin() as c:
        r = c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "group_by": "agent", "bucket_seconds": 300})
    assert r.status_code == 200, r.text
    body = r.json()
    [u] = body["units"]
    assert u["unit"] == USD and u["total"] == 600 and u["count"] == 3
    assert sum(p["amount"] for p in u["series"]) == 600 and body["bucket_seconds"] == 300
    assert {g["key"]: g["amount"] for g in u["groups"]} == {"alpha": 400, "beta": 200}
    with server.admin() as c:
        r = c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "scope_prefix": f"tenant:{t.tenant_id}/workspace:eng",
                                             "group_by": "action_name"})
    [u] = r.json()["units"]
    assert u["total"] == 500 and {g["key"] for g in u["groups"]} == {"alpha-tool", "beta-tool"}
    with t.client() as c:  # the tenant plane: the key's own tenant, no tenant_id parameter
        mine = c.get("/v1/usage", params={"group_by": "workspace"}).json()
    assert mine["tenant_id"] == t.tenant_id and {g["key"]: g["amount"] for g in mine["units"][0]["groups"]} == {"eng": 500, "ops": 100}


def test_usage_and_denials_refuse_bad_input_and_other_tenants(server: Server) -> None:
    t = new_tenant(server)
    other = new_tenant(server)
    with server.admin() as c:
        assert c.get("/v1/admin/usage").status_code == 400  # tenant_id required
        assert c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "group_by": "nope"}).status_code == 400
        assert c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "from": "2026-01-02T00:00:00Z",
                                                "to": "2026-01-01T00:00:00Z"}).status_code == 400
        assert c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "bucket_seconds": 1,
                                                "from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"}).status_code == 400
        r = c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id, "scope_prefix": f"tenant:{other.tenant_id}"})
        assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST"
    with t.client() as c:
        assert c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id}).status_code == 401  # admin plane: admin key only
        assert c.get("/v1/usage", params={"scope_prefix": f"tenant:{other.tenant_id}"}).status_code == 400
        assert c.get("/v1/denials").status_code == 403  # needs events:read
    assert httpx.get(server.base_url + "/v1/usage").status_code == 401


def test_denials_by_reason_agent_and_tool(server: Server) -> None:
    t = new_tenant(server, permissions=["reservations:create", "reservations:commit", "events:read"])
    t.budget("", 1000)
    with t.client() as c:
        for agent in ("greedy", "greedy", "modest"):
            r = c.post("/v1/reservations", json=reserve_body(t, 50_000, subject=t.subject(agent=agent)))
            assert r.status_code in (200, 409) and (r.status_code == 409 or r.json()["decision"] == "DENY"), r.text
        mine = c.get("/v1/denials").json()
    with server.admin() as c:
        body = c.get("/v1/admin/denials", params={"tenant_id": t.tenant_id}).json()
    assert body["total"] == mine["total"] == 3
    assert {g["key"]: g["count"] for g in body["by_agent"]} == {"greedy": 2, "modest": 1}
    assert body["by_reason"][0]["count"] == 3 and body["by_tool"][0]["key"] == "test-model"
    assert sum(p["count"] for p in body["series"]) == 3


def test_event_stream_delivers_new_events_and_resumes(server: Server) -> None:
    t = new_tenant(server, permissions=["events:read", "budgets:read"])
    t.budget("workspace:s", 100)
    got: list[dict[str, Any]] = []
    ids: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": t.key}, timeout=15) as c:
            with c.stream("GET", "/v1/event-stream", params={"category": "budget"}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                for line in r.iter_lines():
                    if line.startswith(": connected"):
                        ready.set()
                    elif line.startswith("id: "):
                        ids.append(line[4:])
                    elif line.startswith("data: "):
                        got.append(json.loads(line[6:]))
                        if len(got) == 2:
                            return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    scope = f"tenant:{t.tenant_id}/workspace:s"
    with server.admin() as c:
        assert c.post("/v1/admin/budgets/freeze", params={"scope": scope, "unit": USD}, json={}).status_code == 200
        assert c.post("/v1/admin/budgets/unfreeze", params={"scope": scope, "unit": USD}, json={}).status_code == 200
    thread.join(10)
    assert [e["event_type"] for e in got] == ["budget.frozen", "budget.unfrozen"]
    assert all(e["tenant_id"] == t.tenant_id for e in got)
    # resuming after the first event replays the second one
    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": t.key}, timeout=15) as c:
        with c.stream("GET", "/v1/event-stream", headers={"Last-Event-ID": ids[0]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["event_type"] == "budget.unfrozen"
                    break
    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": new_tenant(server, permissions=["budgets:read"]).key}) as c:
        assert c.get("/v1/event-stream").status_code == 403


def test_openapi_documents_the_dashboard_apis(server: Server) -> None:
    spec = httpx.get(server.base_url + "/openapi.json").json()
    for path in ("/v1/admin/usage", "/v1/usage", "/v1/admin/denials", "/v1/denials", "/v1/admin/event-stream", "/v1/event-stream"):
        assert "get" in spec["paths"][path], path


def test_introspect_of_a_read_only_operator_key_offers_no_action(server: Server) -> None:
    with server.admin() as c:
        r = c.post("/v1/admin/operator-keys", json={"name": f"viewer-{uuid.uuid4().hex[:6]}", "permissions": ["admin:read"]})
        assert r.status_code == 201, r.text
        secret = r.json()["key_secret"]
        full = c.get("/v1/auth/introspect").json()
    assert full["permissions"] == ["*"] and all(full["capabilities"].values())  # the bootstrap key
    who = httpx.get(server.base_url + "/v1/auth/introspect", headers={"X-Admin-API-Key": secret}).json()
    assert who["auth_type"] == "admin" and who["permissions"] == ["admin:read"]
    caps = who["capabilities"]
    assert all(caps[k] for k in caps if k.startswith("view_"))
    assert not any(caps[k] for k in caps if k.startswith("manage_"))


def test_usage_counts_post_only_events(server: Server) -> None:
    t = new_tenant(server, permissions=["reservations:create", "reservations:commit", "reservations:list"])
    t.budget("", 1_000_000)
    _commit(t, 500, 300, workspace="eng", agent="alpha")
    with t.client() as c:
        r = c.post("/v1/events", json={"idempotency_key": uuid.uuid4().hex, "subject": t.subject(workspace="eng", agent="poster"),
                                       "action": {"kind": "llm.completion", "name": "batch-job"},
                                       "actual": {"unit": USD, "amount": 4321}})
        assert r.status_code == 201, r.text
        mine = c.get("/v1/usage", params={"group_by": "agent"}).json()
    [u] = mine["units"]
    assert u["total"] == 300 + 4321 and u["count"] == 2 and u["events"] == 1
    assert {g["key"]: g["amount"] for g in u["groups"]} == {"alpha": 300, "poster": 4321}
    assert sum(p["amount"] for p in u["series"]) == u["total"]


def test_usage_reads_a_bounded_number_of_rows_whatever_the_tenant_holds(server: Server, monkeypatch: Any) -> None:
    """Usage never lists the tenant's reservations (the Redis listing refuses past its cap with 400): the
    store pages through its time index and stops at the bound. The cap and the page size are made small
    here, in-process, to run the same code with a tenant of 23 reservations instead of 50,000."""
    import asyncio

    from cycles.protocol.errors import ProtocolError
    from cycles.store import open_store, redis as redis_store
    from cycles.store.base import ReservationQuery

    t = new_tenant(server, permissions=["reservations:create", "reservations:commit", "reservations:list"])
    t.budget("", 1_000_000)
    for i in range(20):
        _commit(t, 100, i + 1, agent=f"a{i % 3}")
    with t.client() as c:  # not spend: open, released
        for _ in range(3):
            rid = c.post("/v1/reservations", json=reserve_body(t, 50)).json()["reservation_id"]
        c.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": uuid.uuid4().hex})
    monkeypatch.setattr(redis_store, "MAX_LIST_CANDIDATES", 5)
    monkeypatch.setattr(redis_store, "SPEND_PAGE", 4)

    async def scan() -> tuple[Any, Any, bool]:
        store = open_store(server.store_url)
        try:
            now = await store.now_ms()
            full = await store.scan_spend(t.tenant_id, now - 3_600_000, now, 1000)
            cut = await store.scan_spend(t.tenant_id, now - 3_600_000, now, 10)
            try:
                await store.list_reservations(ReservationQuery(tenant=t.tenant_id, status="COMMITTED", limit=1000))
                refused = False
            except ProtocolError:
                refused = True
            return full, cut, refused
        finally:
            await store.close()

    full, cut, refused = asyncio.run(scan())
    assert refused == server.store_url.startswith("redis")  # the listing's cap, which usage no longer meets
    assert not full.has_more and len(full.items) == 20
    assert sum(r["amount"] for r in full.items) == sum(range(1, 21)) and {r["source"] for r in full.items} == {"reservation"}
    assert cut.has_more and 0 < len(cut.items) <= 10
    with server.admin() as c:  # and through the API, with the server's own (real) bounds
        body = c.get("/v1/admin/usage", params={"tenant_id": t.tenant_id}).json()
    assert body["units"][0]["total"] == 210 and body["units"][0]["count"] == 20 and not body.get("truncated")
