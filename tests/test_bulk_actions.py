"""Bulk actions over tenants and budgets (POST /v1/admin/{tenants,budgets}/bulk-action) through a real
server: filters, the safety gates (empty filter, 500-row cap, expected_count), idempotent replay,
per-row outcomes, the close cascade, and bad input answered 400 (never 5xx)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import msgspec
import pytest

from support import USD, Server, Tenant, new_tenant, reserve_body

TOK = "TOKENS"
TENANTS = "/v1/admin/tenants/bulk-action"
BUDGETS = "/v1/admin/budgets/bulk-action"


def key() -> str:
    return uuid.uuid4().hex


def post(server: Server, path: str, body: Any) -> httpx.Response:
    with server.admin() as c:
        return c.post(path, json=body)


def tenant_status(server: Server, tenant_id: str) -> str:
    with server.admin() as c:
        r = c.get(f"/v1/admin/tenants/{tenant_id}")
    assert r.status_code == 200, r.text
    return r.json()["status"]


def ledger(server: Server, tenant: Tenant, suffix: str = "", unit: str = TOK) -> dict[str, Any]:
    scope = f"tenant:{tenant.tenant_id}" + (f"/{suffix}" if suffix else "")
    with server.admin() as c:
        r = c.get("/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit})
    assert r.status_code == 200, r.text
    return r.json()


def ids(rows: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in rows}


def audit_row(server: Server, request_id: str, operation: str) -> dict[str, Any]:
    with server.admin() as c:
        r = c.get("/v1/admin/audit/logs", params={"request_id": request_id, "operation": operation})
    assert r.status_code == 200, r.text
    logs = [row for row in r.json()["logs"] if (row.get("metadata") or {}).get("phase") != "started"]
    assert len(logs) == 1, logs  # the finished row (the started one precedes any change)
    return logs[0]


def bulk_events(server: Server, response: httpx.Response, kind: str) -> list[dict[str, Any]]:
    """The events a bulk request emitted, by its correlation id."""
    action = response.json()["action"].lower()
    corr = f"{kind}_bulk_action:{action}:{response.headers['x-request-id']}"
    with server.admin() as c:
        r = c.get("/v1/admin/events", params={"correlation_id": corr, "limit": 100})
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    assert all(e["correlation_id"] == corr and e["request_id"] == response.headers["x-request-id"] for e in events)
    assert all(e["actor"]["type"] == "admin_on_behalf_of" for e in events)
    return events


def tagged_tenants(server: Server, n: int) -> tuple[str, list[str]]:
    tag = "bk" + uuid.uuid4().hex[:8]
    tids = [f"{tag}-{i}" for i in range(n)]
    with server.admin() as c:
        for tid in tids:
            r = c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": f"Bulk {tid}"})
            assert r.status_code == 201, r.text
    return tag, tids


# ---- tenants ----

def test_suspend_by_search_then_reactivate(server: Server) -> None:
    tag, tids = tagged_tenants(server, 3)
    with server.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{tids[2]}", json={"status": "SUSPENDED"}).status_code == 200
        preview = c.get("/v1/admin/tenants", params={"search": tag.upper()}).json()["tenants"]
    assert len(preview) == 3  # the preview the operator counts from: same (case-insensitive) search

    r = post(server, TENANTS, {"filter": {"search": tag.upper()}, "action": "SUSPEND", "expected_count": 3,
                               "idempotency_key": key()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "SUSPEND" and body["total_matched"] == 3
    assert ids(body["succeeded"]) == set(tids[:2]) and body["failed"] == []
    assert body["skipped"] == [{"id": tids[2], "reason": "ALREADY_IN_TARGET_STATE"}]
    assert all(tenant_status(server, t) == "SUSPENDED" for t in tids)
    row = audit_row(server, r.headers["x-request-id"], "bulkActionTenants")
    assert row["status"] == 200 and row["tenant_id"] == "__admin__"
    meta = row["metadata"]
    assert meta["action"] == "SUSPEND" and meta["total_matched"] == 3 and meta["filter"] == {"search": tag.upper()}
    assert set(meta["succeeded_ids"]) == set(tids[:2]) and meta["skipped_ids"] == [tids[2]]
    assert meta["failed_count"] == 0 and meta["skipped_count"] == 1
    events = bulk_events(server, r, "tenant")  # one per changed row, none for the skip
    assert sorted((e["event_type"], e["tenant_id"], e["data"]["previous_status"], e["data"]["new_status"])
                  for e in events) == [("tenant.suspended", t, "ACTIVE", "SUSPENDED") for t in tids[:2]]

    r = post(server, TENANTS, {"filter": {"search": tag, "status": "SUSPENDED"}, "action": "REACTIVATE",
                               "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert ids(r.json()["succeeded"]) == set(tids) and r.json()["total_matched"] == 3
    assert all(tenant_status(server, t) == "ACTIVE" for t in tids)
    assert {e["event_type"] for e in bulk_events(server, r, "tenant")} == {"tenant.reactivated"}


def test_bulk_close_runs_the_cascade(server: Server) -> None:
    tag = "bc" + uuid.uuid4().hex[:8]
    a = new_tenant(server, tenant_id=f"{tag}-a")
    b = new_tenant(server, tenant_id=f"{tag}-b")
    for t in (a, b):
        t.budget(amount=1000, unit=TOK)
        t.budget("workspace:eng", amount=500, unit=TOK)
    with a.client() as c:
        held = c.post("/v1/reservations", json=reserve_body(a, 40, unit=TOK)).json()["reservation_id"]

    r = post(server, TENANTS, {"filter": {"search": tag}, "action": "CLOSE", "expected_count": 2,
                               "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert ids(r.json()["succeeded"]) == {a.tenant_id, b.tenant_id}
    assert sorted((e["event_type"], e["tenant_id"]) for e in bulk_events(server, r, "tenant")) == [
        ("tenant.closed", a.tenant_id), ("tenant.closed", b.tenant_id)]
    with server.admin() as c:
        for t in (a, b):
            assert tenant_status(server, t.tenant_id) == "CLOSED"
            ledgers = c.get("/v1/admin/budgets", params={"tenant_id": t.tenant_id}).json()["ledgers"]
            assert len(ledgers) == 2 and {l["status"] for l in ledgers} == {"CLOSED"}
            assert all(l["reserved"]["amount"] == 0 for l in ledgers)
            keys = c.get("/v1/admin/api-keys", params={"tenant_id": t.tenant_id}).json()["keys"]
            assert keys and {k["status"] for k in keys} == {"REVOKED"}
        assert c.get(f"/v1/reservations/{held}").json()["status"] == "RELEASED"

    # CLOSED is terminal: SUSPEND fails per row (HTTP 200), CLOSE again is a skip
    r = post(server, TENANTS, {"filter": {"search": tag}, "action": "SUSPEND", "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert r.json()["succeeded"] == [] and r.json()["skipped"] == []
    assert {(f["id"], f["error_code"]) for f in r.json()["failed"]} == {(a.tenant_id, "INVALID_TRANSITION"),
                                                                         (b.tenant_id, "INVALID_TRANSITION")}
    assert all(f["message"] for f in r.json()["failed"])
    r = post(server, TENANTS, {"filter": {"search": tag, "status": "CLOSED"}, "action": "CLOSE",
                               "idempotency_key": key()})
    assert r.status_code == 200 and {s["reason"] for s in r.json()["skipped"]} == {"ALREADY_IN_TARGET_STATE"}
    assert len(r.json()["skipped"]) == 2


def test_expected_count_mismatch_writes_nothing(server: Server) -> None:
    tag, tids = tagged_tenants(server, 2)
    k = key()
    r = post(server, TENANTS, {"filter": {"search": tag}, "action": "SUSPEND", "expected_count": 3,
                               "idempotency_key": k})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "COUNT_MISMATCH"
    assert r.json()["details"] == {"expected_count": 3, "total_matched": 2}
    assert all(tenant_status(server, t) == "ACTIVE" for t in tids)
    row = audit_row(server, r.headers["x-request-id"], "bulkActionTenants")
    assert row["status"] == 409 and row["error_code"] == "COUNT_MISMATCH"
    # a refused request does not burn its key: the corrected request goes through
    r = post(server, TENANTS, {"filter": {"search": tag}, "action": "SUSPEND", "expected_count": 2,
                               "idempotency_key": k})
    assert r.status_code == 200 and len(r.json()["succeeded"]) == 2, r.text

    t = new_tenant(server)
    t.budget(amount=100, unit=TOK)
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id}, "action": "CREDIT", "expected_count": 0,
                               "amount": {"unit": TOK, "amount": 5}, "idempotency_key": key()})
    assert r.status_code == 409 and r.json()["error"] == "COUNT_MISMATCH", r.text
    assert ledger(server, t)["allocated"]["amount"] == 100


def test_more_than_500_matches_is_refused_with_the_count(server: Server) -> None:
    t = new_tenant(server)
    with server.admin() as c:
        for i in range(501):
            r = c.post("/v1/admin/budgets", json={"tenant_id": t.tenant_id, "scope": f"tenant:{t.tenant_id}/app:a{i}",
                                                  "unit": TOK, "allocated": {"unit": TOK, "amount": 10}})
            assert r.status_code == 201, r.text
    body = {"filter": {"tenant_id": t.tenant_id}, "action": "CREDIT", "amount": {"unit": TOK, "amount": 1},
            "idempotency_key": key()}
    r = post(server, BUDGETS, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "LIMIT_EXCEEDED" and r.json()["details"]["total_matched"] == 501
    assert ledger(server, t, "app:a0")["allocated"]["amount"] == 10
    # narrowed (every row has utilization 0; the search keeps a1, a10-a19, a100-a199) it applies
    r = post(server, BUDGETS, {**body, "filter": {**body["filter"], "utilization_max": 0, "search": "/APP:A1"}})
    assert r.status_code == 200, r.text
    assert r.json()["total_matched"] == 111  # a1, a10-a19, a100-a199
    assert ledger(server, t, "app:a1")["allocated"]["amount"] == 11
    assert ledger(server, t, "app:a2")["allocated"]["amount"] == 10


# ---- budgets ----

def test_credit_over_a_scope_subtree(server: Server) -> None:
    t = new_tenant(server)
    for suffix in ("", "workspace:eng", "workspace:eng/app:a", "workspace:eng/app:b", "workspace:engineering",
                   "workspace:ops"):
        t.budget(suffix, amount=1000, unit=TOK)
    t.budget("workspace:eng", amount=1000, unit=USD)
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, "scope_prefix": f"tenant:{t.tenant_id}/workspace:ENG",
                                          "unit": TOK},
                               "action": "CREDIT", "amount": {"unit": TOK, "amount": 250}, "expected_count": 3,
                               "reason": "quarterly top-up", "idempotency_key": key()})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = {ledger(server, t, s)["ledger_id"] for s in ("workspace:eng", "workspace:eng/app:a", "workspace:eng/app:b")}
    assert ids(body["succeeded"]) == expected and body["failed"] == [] and body["skipped"] == []
    assert body["succeeded"][0] == {"id": body["succeeded"][0]["id"]}  # success rows carry only the id
    for suffix, allocated in (("", 1000), ("workspace:eng", 1250), ("workspace:eng/app:a", 1250),
                              ("workspace:eng/app:b", 1250), ("workspace:engineering", 1000), ("workspace:ops", 1000)):
        assert ledger(server, t, suffix)["allocated"]["amount"] == allocated, suffix
    assert ledger(server, t, "workspace:eng", USD)["allocated"]["amount"] == 1000
    row = audit_row(server, r.headers["x-request-id"], "bulkActionBudgets")
    assert row["metadata"]["target_tenant_id"] == t.tenant_id and row["metadata"]["reason"] == "quarterly top-up"
    assert set(row["metadata"]["succeeded_ids"]) == expected and row["metadata"]["total_matched"] == 3
    events = bulk_events(server, r, "budget")
    assert sorted(e["scope"] for e in events) == sorted(f"tenant:{t.tenant_id}/{s}" for s in (
        "workspace:eng", "workspace:eng/app:a", "workspace:eng/app:b"))
    assert {e["event_type"] for e in events} == {"budget.funded"}
    assert {e["data"]["ledger_id"] for e in events} == expected


def test_debit_with_one_row_over_budget(server: Server) -> None:
    t = new_tenant(server)
    t.budget("app:a", amount=1000, unit=TOK)
    t.budget("app:b", amount=1000, unit=TOK)
    t.budget("app:c", amount=50, unit=TOK)
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id}, "action": "DEBIT",
                               "amount": {"unit": TOK, "amount": 100}, "idempotency_key": key()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_matched"] == 3 and len(body["succeeded"]) == 2
    (fail,) = body["failed"]
    assert fail["id"] == ledger(server, t, "app:c")["ledger_id"] and fail["error_code"] == "BUDGET_EXCEEDED"
    assert fail["message"]
    assert [ledger(server, t, s)["allocated"]["amount"] for s in ("app:a", "app:b", "app:c")] == [900, 900, 50]
    events = bulk_events(server, r, "budget")  # the failed row emitted nothing
    assert sorted(e["scope"] for e in events) == [f"tenant:{t.tenant_id}/app:a", f"tenant:{t.tenant_id}/app:b"]
    assert {e["event_type"] for e in events} == {"budget.debited"}


def test_per_row_unit_mismatch_and_repay_skip(server: Server) -> None:
    t = new_tenant(server)
    tok = t.budget("app:a", amount=100, unit=TOK)
    usd = t.budget("app:a", amount=100, unit=USD)
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id}, "action": "CREDIT",
                               "amount": {"unit": TOK, "amount": 1}, "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert ids(r.json()["succeeded"]) == {tok["ledger_id"]}
    assert [(f["id"], f["error_code"]) for f in r.json()["failed"]] == [(usd["ledger_id"], "INVALID_TRANSITION")]
    assert ledger(server, t, "app:a", USD)["allocated"]["amount"] == 100

    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, "unit": TOK}, "action": "REPAY_DEBT",
                               "amount": {"unit": TOK, "amount": 10}, "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] == [{"id": tok["ledger_id"], "reason": "ALREADY_IN_TARGET_STATE"}]
    assert ledger(server, t, "app:a")["allocated"]["amount"] == 101

    # RESET_SPENT: allocated and spent set on every row
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, "unit": TOK}, "action": "RESET_SPENT",
                               "amount": {"unit": TOK, "amount": 500}, "spent": {"unit": TOK, "amount": 7},
                               "idempotency_key": key()})
    assert r.status_code == 200 and len(r.json()["succeeded"]) == 1, r.text
    led = ledger(server, t, "app:a")
    assert led["allocated"]["amount"] == 500 and led["spent"]["amount"] == 7

    # frozen ledgers fail per row
    with server.admin() as c:
        assert c.post("/v1/admin/budgets/freeze", params={"scope": f"tenant:{t.tenant_id}/app:a", "unit": TOK}
                      ).status_code == 200
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, "status": "FROZEN"}, "action": "RESET",
                               "amount": {"unit": TOK, "amount": 5}, "idempotency_key": key()})
    assert r.status_code == 200, r.text
    assert [(f["id"], f["error_code"]) for f in r.json()["failed"]] == [(tok["ledger_id"], "INVALID_TRANSITION")]


def test_idempotent_replay_and_key_reuse(server: Server) -> None:
    t = new_tenant(server)
    t.budget("app:a", amount=100, unit=TOK)
    t.budget("app:b", amount=100, unit=TOK)
    k = key()
    body = {"filter": {"tenant_id": t.tenant_id, "scope_prefix": f"tenant:{t.tenant_id}"}, "action": "CREDIT",
            "amount": {"unit": TOK, "amount": 10}, "idempotency_key": k}
    first = post(server, BUDGETS, body)
    assert first.status_code == 200 and len(first.json()["succeeded"]) == 2, first.text
    # a new matching budget appears: the replay still answers the original response, byte for byte
    t.budget("app:c", amount=100, unit=TOK)
    with server.admin() as c:
        again = c.post(BUDGETS, content=msgspec.json.encode({**body, "amount": {"amount": 10, "unit": TOK}}),
                       headers={"content-type": "application/json", "X-Idempotency-Key": k})
    assert again.status_code == 200 and again.content == first.content
    assert [ledger(server, t, s)["allocated"]["amount"] for s in ("app:a", "app:b", "app:c")] == [110, 110, 100]
    row = audit_row(server, again.headers["x-request-id"], "bulkActionBudgets")
    assert row["status"] == 200 and row["metadata"]["replay"] is True

    r = post(server, BUDGETS, {**body, "amount": {"unit": TOK, "amount": 11}})
    assert r.status_code == 409 and r.json()["error"] == "IDEMPOTENCY_MISMATCH", r.text
    r = post(server, BUDGETS, {**body, "filter": {**body["filter"], "search": "app:a"}})
    assert r.status_code == 409 and r.json()["error"] == "IDEMPOTENCY_MISMATCH", r.text
    assert [ledger(server, t, s)["allocated"]["amount"] for s in ("app:a", "app:b", "app:c")] == [110, 110, 100]

    # tenants: the same rules
    tag, tids = tagged_tenants(server, 2)
    tb = {"filter": {"search": tag}, "action": "SUSPEND", "idempotency_key": k}
    first = post(server, TENANTS, tb)
    assert first.status_code == 200 and len(first.json()["succeeded"]) == 2
    again = post(server, TENANTS, tb)
    assert again.content == first.content  # not a second run (that would report two skips)
    r = post(server, TENANTS, {**tb, "action": "CLOSE"})
    assert r.status_code == 409 and r.json()["error"] == "IDEMPOTENCY_MISMATCH"
    assert all(tenant_status(server, x) == "SUSPENDED" for x in tids)
    r = post(server, TENANTS, {**tb, "idempotency_key": k[:8], "action": "REACTIVATE"})
    assert r.status_code == 200


def test_resume_after_an_interrupted_run_never_applies_a_row_twice(server: Server) -> None:
    """A run that stopped half way (store outage) leaves its claim ABORTED; the retry with the same key
    resumes under the same generation, so the rows already funded replay instead of applying again."""
    from cycles.server import bulk
    from cycles.store import open_store
    from cycles.store.base import FundCommand

    t = new_tenant(server)
    for s in ("app:a", "app:b", "app:c"):
        t.budget(s, amount=100, unit=TOK)
    k = key()
    body = {"filter": {"tenant_id": t.tenant_id}, "action": "CREDIT", "amount": {"unit": TOK, "amount": 10},
            "idempotency_key": k}
    req = msgspec.json.decode(msgspec.json.encode(body), type=bulk.BudgetBulkActionRequest)

    async def half_run() -> None:
        store = open_store(server.store_url)
        try:
            idem = bulk._Idempotency(store, t.tenant_id, "bulkActionBudgets", k, req)
            assert await idem.claim() is None
            scope = f"tenant:{t.tenant_id}/app:a"
            import hashlib
            payload = hashlib.sha256("\x00".join((scope, TOK, "CREDIT", "10", "")).encode()).hexdigest()
            await store.fund(FundCommand(tenant=t.tenant_id, scope=scope, unit=TOK, operation="CREDIT", amount=10,
                                         spent=None, idempotency_key=f"bulk:{idem.gen}:{k}:{scope}:{TOK}",
                                         payload_hash=payload))
            await idem.abort()
        finally:
            await store.close()

    asyncio.run(half_run())
    assert ledger(server, t, "app:a")["allocated"]["amount"] == 110
    r = post(server, BUDGETS, body)
    assert r.status_code == 200 and len(r.json()["succeeded"]) == 3, r.text
    assert [ledger(server, t, s)["allocated"]["amount"] for s in ("app:a", "app:b", "app:c")] == [110, 110, 110]
    assert post(server, BUDGETS, body).content == r.content


def test_concurrent_submits_of_one_key_apply_once(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    t = new_tenant(server)
    for i in range(40):
        t.budget(f"app:a{i}", amount=100, unit=TOK)
    body = {"filter": {"tenant_id": t.tenant_id}, "action": "CREDIT", "amount": {"unit": TOK, "amount": 1},
            "idempotency_key": key()}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(server, BUDGETS, body), range(6)))
    ok = [r for r in answers if r.status_code == 200]
    assert ok and all(r.content == ok[0].content for r in ok)
    for r in answers:
        assert r.status_code == 200 or (r.status_code == 409 and r.json()["error"] == "DUPLICATE_RESOURCE"), r.text
    assert len(ok[0].json()["succeeded"]) == 40
    with server.admin() as c:
        ledgers = c.get("/v1/admin/budgets", params={"tenant_id": t.tenant_id, "limit": 100}).json()["ledgers"]
    assert {l["allocated"]["amount"] for l in ledgers} == {101}
    assert post(server, BUDGETS, body).content == ok[0].content


def test_running_claim_answers_409_and_expired_claims_are_taken_over(tmp_path: Any) -> None:
    """The claim document's life cycle on a store with a controlled clock."""
    from cycles.protocol.errors import ProtocolError
    from cycles.server import bulk
    from cycles.store.sqlite import SQLiteStore

    now = [1_000_000]
    req = msgspec.json.decode(b'{"filter":{"search":"x"},"action":"SUSPEND","idempotency_key":"k"}',
                              type=bulk.TenantBulkActionRequest)
    other = msgspec.json.decode(b'{"filter":{"search":"y"},"action":"SUSPEND","idempotency_key":"k"}',
                                type=bulk.TenantBulkActionRequest)

    async def run() -> None:
        store = SQLiteStore(str(tmp_path / "c.db"), clock=lambda: now[0])
        try:
            first = bulk._Idempotency(store, "__admin__", "bulkActionTenants", "k", req)
            assert await first.lookup() is None and await first.claim() is None
            second = bulk._Idempotency(store, "__admin__", "bulkActionTenants", "k", req)
            with pytest.raises(ProtocolError) as err:
                await second.claim()
            assert err.value.status == 409 and err.value.code.value == "DUPLICATE_RESOURCE"
            with pytest.raises(ProtocolError) as err:
                await bulk._Idempotency(store, "__admin__", "bulkActionTenants", "k", other).lookup()
            assert err.value.code.value == "IDEMPOTENCY_MISMATCH"
            # a claim left RUNNING by a crash is taken over after the window, under the same generation
            now[0] += bulk.REPLAY_WINDOW_MS + 1
            assert await second.claim() is None and second.gen == first.gen
            await second.finish(b'{"done":1}')
            assert await bulk._Idempotency(store, "__admin__", "bulkActionTenants", "k", req).lookup() == b'{"done":1}'
            # past the window a finished key is free again, with a fresh generation
            now[0] += bulk.REPLAY_WINDOW_MS + 1
            third = bulk._Idempotency(store, "__admin__", "bulkActionTenants", "k", req)
            assert await third.lookup() is None and await third.claim() is None and third.gen != first.gen
        finally:
            await store.close()

    asyncio.run(run())


def test_utilization_filters_use_exact_ratios(server: Server) -> None:
    t = new_tenant(server)
    spent = {"app:u0": (10, 0), "app:u3": (10, 3), "app:u5": (1000, 500), "app:u9": (1000, 900),
             "app:zero": (0, 0), "app:inf": (0, 5)}
    for s, (allocated, used) in spent.items():
        t.budget(s, amount=1, unit=TOK)
        r = t.fund(s, "RESET_SPENT", allocated, unit=TOK, spent={"unit": TOK, "amount": used})
        assert r.status_code == 200, r.text
    by_id = {ledger(server, t, s)["ledger_id"]: s for s in spent}

    def matched(**flt: Any) -> set[str]:
        r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, **flt}, "action": "CREDIT",
                                   "amount": {"unit": TOK, "amount": 0}, "idempotency_key": key()})
        assert r.status_code == 200, r.text
        return {by_id[i] for i in ids(r.json()["succeeded"])}

    assert matched(utilization_min=0.3) == {"app:u3", "app:u5", "app:u9", "app:inf"}  # 3/10 >= 0.3 exactly
    assert matched(utilization_max=0.3) == {"app:u0", "app:u3", "app:zero"}
    assert matched(utilization_min=0.5, utilization_max=0.5) == {"app:u5"}
    assert matched(utilization_min=0.31, utilization_max=1) == {"app:u5", "app:u9"}
    assert matched(utilization_min=0, search="U9") == {"app:u9"}
    r = post(server, BUDGETS, {"filter": {"tenant_id": t.tenant_id, "utilization_min": 0.6, "utilization_max": 0.5},
                               "action": "CREDIT", "amount": {"unit": TOK, "amount": 1}, "idempotency_key": key()})
    assert r.status_code == 400 and r.json()["error"] == "INVALID_REQUEST", r.text


# ---- bad input ----

def _budget_bad(tid: str) -> list[tuple[str, Any]]:
    amt = {"unit": TOK, "amount": 5}
    f = {"tenant_id": tid}
    return [
        ("missing filter", {"action": "CREDIT", "amount": amt, "idempotency_key": "k"}),
        ("empty filter", {"filter": {}, "action": "CREDIT", "amount": amt, "idempotency_key": "k"}),
        ("unknown field", {"filter": f, "action": "CREDIT", "amount": amt, "idempotency_key": "k", "cascade": True}),
        ("unknown filter field", {"filter": {**f, "tenant": tid}, "action": "CREDIT", "amount": amt, "idempotency_key": "k"}),
        ("bad action", {"filter": f, "action": "FREEZE", "amount": amt, "idempotency_key": "k"}),
        ("missing amount", {"filter": f, "action": "CREDIT", "idempotency_key": "k"}),
        ("negative amount", {"filter": f, "action": "DEBIT", "amount": {"unit": TOK, "amount": -5}, "idempotency_key": "k"}),
        ("float amount", {"filter": f, "action": "DEBIT", "amount": {"unit": TOK, "amount": 1.5}, "idempotency_key": "k"}),
        ("negative spent", {"filter": f, "action": "RESET_SPENT", "amount": amt, "spent": {"unit": TOK, "amount": -1},
                            "idempotency_key": "k"}),
        ("spent unit mismatch", {"filter": f, "action": "RESET_SPENT", "amount": amt, "spent": {"unit": USD, "amount": 1},
                                 "idempotency_key": "k"}),
        ("filter unit mismatch", {"filter": {**f, "unit": USD}, "action": "CREDIT", "amount": amt, "idempotency_key": "k"}),
        ("bad unit", {"filter": f, "action": "CREDIT", "amount": {"unit": "EUR", "amount": 1}, "idempotency_key": "k"}),
        ("missing key", {"filter": f, "action": "CREDIT", "amount": amt}),
        ("empty key", {"filter": f, "action": "CREDIT", "amount": amt, "idempotency_key": ""}),
        ("long key", {"filter": f, "action": "CREDIT", "amount": amt, "idempotency_key": "k" * 129}),
        ("negative expected_count", {"filter": f, "action": "CREDIT", "amount": amt, "idempotency_key": "k",
                                     "expected_count": -1}),
        ("utilization above 1", {"filter": {**f, "utilization_min": 1.5}, "action": "CREDIT", "amount": amt,
                                 "idempotency_key": "k"}),
        ("search too long", {"filter": {**f, "search": "x" * 129}, "action": "CREDIT", "amount": amt,
                             "idempotency_key": "k"}),
        ("bad scope_prefix", {"filter": {**f, "scope_prefix": "workspace:eng"}, "action": "CREDIT", "amount": amt,
                              "idempotency_key": "k"}),
        ("other tenant's scope_prefix", {"filter": {**f, "scope_prefix": "tenant:someone-else"}, "action": "CREDIT",
                                         "amount": amt, "idempotency_key": "k"}),
        ("filter not an object", {"filter": "all", "action": "CREDIT", "amount": amt, "idempotency_key": "k"}),
        ("body not an object", []),
    ]


def _tenant_bad() -> list[tuple[str, Any]]:
    return [
        ("missing filter", {"action": "SUSPEND", "idempotency_key": "k"}),
        ("empty filter", {"filter": {}, "action": "SUSPEND", "idempotency_key": "k"}),
        ("blank search only", {"filter": {"search": "  "}, "action": "SUSPEND", "idempotency_key": "k"}),
        ("observe_mode only (ignored here)", {"filter": {"observe_mode": "SHADOW"}, "action": "SUSPEND",
                                              "idempotency_key": "k"}),
        ("unknown field", {"filter": {"search": "x"}, "action": "SUSPEND", "idempotency_key": "k", "force": True}),
        ("unknown filter field", {"filter": {"name": "x"}, "action": "SUSPEND", "idempotency_key": "k"}),
        ("bad action", {"filter": {"search": "x"}, "action": "DELETE", "idempotency_key": "k"}),
        ("bad status", {"filter": {"status": "GONE"}, "action": "SUSPEND", "idempotency_key": "k"}),
        ("missing key", {"filter": {"search": "x"}, "action": "SUSPEND"}),
        ("search too long", {"filter": {"search": "x" * 129}, "action": "SUSPEND", "idempotency_key": "k"}),
        ("negative expected_count", {"filter": {"search": "x"}, "action": "SUSPEND", "idempotency_key": "k",
                                     "expected_count": -2}),
    ]


def test_bad_input_is_400_never_5xx(server: Server, tenant: Tenant) -> None:
    tenant.budget(amount=100, unit=TOK)
    with server.admin() as c:
        for path, cases in ((BUDGETS, _budget_bad(tenant.tenant_id)), (TENANTS, _tenant_bad())):
            for name, body in cases:
                r = c.post(path, json=body)
                assert r.status_code == 400, (path, name, r.text)
                assert r.json()["error"] in ("INVALID_REQUEST", "UNIT_MISMATCH"), (path, name, r.text)
            for raw in (b"", b"{", b"\xff\xfe", b"null", b'{"filter":{"search":"x"},"action":"SUSPEND"'):
                r = c.post(path, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, raw, r.text)
        r = c.post(BUDGETS, json={"filter": {"tenant_id": "no-such-tenant"}, "action": "CREDIT",
                                  "amount": {"unit": TOK, "amount": 1}, "idempotency_key": "k"})
        assert r.status_code == 404, r.text
        r = c.post(TENANTS, json={"filter": {"search": "x"}, "action": "SUSPEND", "idempotency_key": "a"},
                   headers={"X-Idempotency-Key": "b"})
        assert r.status_code == 400, r.text
    assert ledger(server, tenant)["allocated"]["amount"] == 100
    assert tenant_status(server, tenant.tenant_id) == "ACTIVE"


def test_admin_key_only(server: Server, tenant: Tenant) -> None:
    body = {"filter": {"tenant_id": tenant.tenant_id}, "action": "CREDIT", "amount": {"unit": TOK, "amount": 1},
            "idempotency_key": "k"}
    with tenant.client() as c:
        r = c.post(BUDGETS, json=body)
        assert r.status_code in (401, 403), r.text
        r = c.post(TENANTS, json={"filter": {"search": tenant.tenant_id}, "action": "SUSPEND", "idempotency_key": "k"})
        assert r.status_code in (401, 403), r.text
    r = httpx.post(server.base_url + TENANTS, json={"filter": {"search": "x"}, "action": "SUSPEND",
                                                    "idempotency_key": "k"})
    assert r.status_code == 401
    assert tenant_status(server, tenant.tenant_id) == "ACTIVE"


def test_bulk_writes_a_started_row_before_any_change_and_a_finished_row(server: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"bs-{tag}-{i}" for i in range(2)]
    with server.admin() as c:
        for tid in ids:
            assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": tid}).status_code == 201
        r = c.post("/v1/admin/tenants/bulk-action", json={"filter": {"search": f"bs-{tag}"}, "action": "SUSPEND",
                                                          "expected_count": 2, "idempotency_key": uuid.uuid4().hex})
        assert r.status_code == 200, r.text
        rows = c.get("/v1/admin/audit/logs", params={"operation": "bulkActionTenants",
                                                     "request_id": r.headers["X-Request-Id"]}).json()["logs"]
    phases = {row["metadata"]["phase"]: row for row in rows}
    assert set(phases) == {"started", "finished"}
    assert sorted(phases["finished"]["metadata"]["succeeded_ids"]) == ids
    assert phases["started"]["timestamp"] <= phases["finished"]["timestamp"]
