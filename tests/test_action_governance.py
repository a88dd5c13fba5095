"""v0.1.26 action governance on every store: the registry, allow / deny lists, risk-class and per-kind quotas
in the spec's evaluation order, quota atomicity under concurrency, window rollover (store clock), per_run
counts, observe mode, the counter views with the balances:read fallback, and byte-compatibility for tenants
that use none of it."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cycles.core import actions as A
from cycles.store.base import ReserveCommand

from support import Server, Tenant, reserve_body, start_server

USD = "USD_MICROCENTS"


def policy(tenant: Tenant, **fields: Any) -> dict[str, Any]:
    body = {"tenant_id": tenant.tenant_id, "name": f"p-{uuid.uuid4().hex[:8]}",
            "scope_pattern": f"tenant:{tenant.tenant_id}", **fields}
    with tenant.server.admin() as c:
        r = c.post("/v1/admin/policies", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def reserve(c: httpx.Client, tenant: Tenant, kind: str, amount: int = 10, **extra: Any) -> httpx.Response:
    body = reserve_body(tenant, amount, **extra)
    body["action"] = {"kind": kind, "name": "x", **body.get("action_extra", {})}
    body.pop("action_extra", None)
    return c.post("/v1/reservations", json=body)


def events_of(server: Server, tenant: Tenant, event_type: str) -> list[dict[str, Any]]:
    with server.admin() as c:
        r = c.get("/v1/admin/events", params={"tenant_id": tenant.tenant_id, "event_type": event_type, "limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["events"]


def counters(server: Server, tenant: Tenant, **params: Any) -> list[dict[str, Any]]:
    with server.admin() as c:
        r = c.get("/v1/admin/action-quota-counters", params={"tenant_id": tenant.tenant_id, **params})
    assert r.status_code == 200, r.text
    return r.json()["counters"]


# ---- registry ----

def test_registry_lists_and_gets_kinds_with_risk_classes(server: Server) -> None:
    r = httpx.get(server.base_url + "/v1/action-kinds", params={"risk_class": "high_risk", "limit": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "0.1.26" and body["kinds"] and body["has_more"] is False
    assert {k["risk_class"] for k in body["kinds"]} == {"high_risk"}
    assert "code.deploy" in {k["kind"] for k in body["kinds"]}
    page = httpx.get(server.base_url + "/v1/action-kinds", params={"limit": 10}).json()
    assert len(page["kinds"]) == 10 and page["has_more"] and page["next_cursor"]
    nxt = httpx.get(server.base_url + "/v1/action-kinds", params={"limit": 10, "cursor": page["next_cursor"]}).json()
    assert nxt["kinds"][0]["kind"] > page["kinds"][-1]["kind"]
    one = httpx.get(server.base_url + "/v1/action-kinds/message.email.send")
    assert one.status_code == 200 and one.json()["risk_class"] == "external_side_effect"
    assert one.json()["policy_key_spec"] == {"host": True, "recipient_domain": True}
    assert httpx.get(server.base_url + "/v1/action-kinds/email.sendx").status_code == 404
    etag = one.headers["etag"]
    assert httpx.get(server.base_url + "/v1/action-kinds", headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(server.base_url + "/v1/action-kinds", params={"risk_class": "bogus"}).status_code == 400


# ---- policies and tenants carry the new fields ----

def test_policy_and_tenant_fields(tenant: Tenant) -> None:
    plain = policy(tenant)
    for name in A.RULE_FIELDS:
        assert plain[name] == []
    with tenant.server.admin() as c:
        r = c.post("/v1/admin/policies", json={
            "tenant_id": tenant.tenant_id, "name": "both", "scope_pattern": f"tenant:{tenant.tenant_id}",
            "allowed_action_kinds": ["llm.completion"], "denied_action_kinds": ["code.exec.shell"]})
        assert r.status_code == 400 and "mutually exclusive" in r.json()["message"]
        r = c.post("/v1/admin/policies", json={
            "tenant_id": tenant.tenant_id, "name": "ttl", "scope_pattern": f"tenant:{tenant.tenant_id}",
            "action_quotas": [{"action_kind": "llm.completion", "max_calls": 3, "window": "per_hour_tumbling",
                               "per_run_counter_ttl_ms": 120000}]})
        assert r.status_code == 400, r.text
        r = c.post("/v1/admin/policies", json={
            "tenant_id": tenant.tenant_id, "name": "custom", "scope_pattern": f"tenant:{tenant.tenant_id}",
            "denied_action_kinds": ["custom.acme.undeclared"]})
        assert r.status_code == 400, r.text
        # PATCH replaces a list; clearing one while setting the other is allowed
        r = c.patch(f"/v1/admin/policies/{plain['policy_id']}", json={"denied_action_kinds": ["code.exec.shell"]})
        assert r.status_code == 200 and r.json()["denied_action_kinds"] == ["code.exec.shell"]
        r = c.patch(f"/v1/admin/policies/{plain['policy_id']}",
                    json={"denied_action_kinds": [], "allowed_action_kinds": ["llm.completion"]})
        assert r.status_code == 200 and r.json()["allowed_action_kinds"] == ["llm.completion"], r.text
        t = c.get(f"/v1/admin/tenants/{tenant.tenant_id}").json()
        assert t["observe_mode"] == "ENFORCE"
        assert c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"observe_mode": "SHADOW"}).status_code == 400
        quota = policy(tenant, action_quotas=[{"action_kind": "db.write", "max_calls": 2, "window": "per_run"}])
        ids = lambda **f: {p["policy_id"] for p in c.get("/v1/admin/policies", params={  # noqa: E731
            "tenant_id": tenant.tenant_id, **f}).json()["policies"]}
        assert ids(has_action_quotas="true") == {quota["policy_id"]}
        assert ids(references_action_kind="llm.completion") == {plain["policy_id"]}
        assert ids(references_action_kind="db.write") == {quota["policy_id"]}
        r = c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"observe_mode": "OBSERVE"})
        assert r.json()["observe_mode"] == "OBSERVE"
        listed = c.get("/v1/admin/tenants", params={"observe_mode": "OBSERVE", "limit": 100}).json()["tenants"]
        assert tenant.tenant_id in {t["tenant_id"] for t in listed}
    settings = events_of(tenant.server, tenant, "tenant.settings_changed")
    assert any(e["data"]["changed_fields"] == ["observe_mode"] for e in settings)
    spec = httpx.get(tenant.server.base_url + "/openapi.json").json()
    assert {"/v1/action-kinds", "/v1/action-kinds/{kind}", "/v1/admin/action-quota-counters",
            "/v1/admin/action-quota-counters/reset"} <= set(spec["paths"])
    assert spec["paths"]["/v1/action-kinds"]["get"]["security"] == []
    changed = events_of(tenant.server, tenant, "policy.updated")
    assert any(e["data"]["changed_fields"] == ["allowed_action_kinds", "denied_action_kinds"] for e in changed)


# ---- step 1: access control, before quotas and budgets ----

def test_denied_kind_is_refused_before_budget_on_reserve_dry_run_and_decide(tenant: Tenant) -> None:
    tenant.budget(amount=5)  # too small for the request: the deny list must answer first
    pol = policy(tenant, denied_action_kinds=["code.exec.shell"])
    with tenant.client() as c:
        live = reserve(c, tenant, "code.exec.shell", 100)
        assert live.status_code == 409, live.text
        err = live.json()
        assert err["error"] == "ACTION_KIND_DENIED"
        detail = err["details"]["deny_detail"]
        assert detail["reason_code"] == "ACTION_KIND_DENIED" and detail["blocked_by_policy"] == pol["policy_id"]
        assert "quota_violation" not in detail and detail["suggested_fix"]
        dry = reserve(c, tenant, "code.exec.shell", 100, dry_run=True)
        assert dry.status_code == 200 and dry.json()["decision"] == "DENY"
        assert dry.json()["reason_code"] == "ACTION_KIND_DENIED" == dry.json()["deny_detail"]["reason_code"]
        body = reserve_body(tenant, 100)
        body["action"] = {"kind": "code.exec.shell", "name": "x"}
        dec = c.post("/v1/decide", json=body)
        assert dec.json()["decision"] == "DENY" and dec.json()["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
        # another kind goes on to the budget (step 4), with a deny_detail since this tenant uses the extension
        other = reserve(c, tenant, "llm.completion", 100, dry_run=True)
        assert other.json()["reason_code"] == "BUDGET_EXCEEDED"
        assert other.json()["deny_detail"]["budget_remaining"] == 5
    denied = events_of(tenant.server, tenant, "reservation.denied")
    assert any(e["data"]["reason_code"] == "ACTION_KIND_DENIED" and e["data"]["deny_detail"]["blocked_by_policy"]
               == pol["policy_id"] for e in denied)


def test_allow_list_and_closed_tenant_guard_first(tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    policy(tenant, allowed_action_kinds=["llm.completion"])
    with tenant.client() as c:
        r = reserve(c, tenant, "message.email.send")
        assert r.status_code == 409 and r.json()["error"] == "ACTION_KIND_NOT_ALLOWED"
        assert reserve(c, tenant, "llm.completion").status_code == 200
        assert reserve(c, tenant, "custom.acme.nothing").status_code == 400  # undeclared custom kind
        with tenant.server.admin() as a:
            assert a.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"status": "CLOSED"}).status_code == 200
        dry = reserve(c, tenant, "message.email.send", dry_run=True)
        assert dry.json()["reason_code"] == "TENANT_CLOSED"  # base admission gates run before step 1


# ---- steps 2 and 3: risk-class quotas, then per-kind quotas, then the budget ----

def test_quota_order_risk_class_then_kind_then_budget(tenant: Tenant) -> None:
    tenant.budget(amount=25)
    pol = policy(tenant,
                 risk_class_quotas=[{"risk_class": "external_side_effect", "max_calls": 2,
                                     "window": "per_hour_tumbling"}],
                 action_quotas=[{"action_kind": "message.email.send", "max_calls": 1, "window": "per_hour_tumbling"}])
    with tenant.client() as c:
        assert reserve(c, tenant, "message.email.send").status_code == 200  # risk 1/2, kind 1/1
        r = reserve(c, tenant, "message.email.send")  # the kind quota is full, the class quota is not
        assert r.status_code == 409 and r.json()["error"] == "ACTION_QUOTA_EXCEEDED"
        v = r.json()["details"]["deny_detail"]["quota_violation"]
        assert (v["action_kind"], v["used"], v["limit"]) == ("message.email.send", 1, 1)
        assert v["window"] == "per_hour_tumbling"
        assert "risk_class" not in v and v["policy_id"] == pol["policy_id"] and v["window_key"]
        assert reserve(c, tenant, "http.post").status_code == 200  # same class: 2/2
        r = reserve(c, tenant, "message.email.send", dry_run=True)  # both full: the risk class (step 2) answers
        v = r.json()["deny_detail"]["quota_violation"]
        assert r.json()["reason_code"] == "ACTION_QUOTA_EXCEEDED" and v["risk_class"] == "external_side_effect"
        assert v["action_kind"] == "message.email.send" and v["used"] == 2
        # a kind of another class passes the quotas and meets the budget (25 - 20 = 5 < 10)
        r = reserve(c, tenant, "llm.completion")
        assert r.status_code == 409 and r.json()["error"] == "BUDGET_EXCEEDED"
        assert r.json()["details"]["deny_detail"]["reason_code"] == "BUDGET_EXCEEDED"
    crossed = events_of(tenant.server, tenant, "quota.threshold_approaching")
    assert {(e["data"]["action_kind"], e["data"]["used"], e["data"]["limit"]) for e in crossed} == {
        ("message.email.send", 1, 1), ("__risk__", 2, 2)}  # once each, at 80 % (rounded up to a whole call)
    rows = {(c["action_kind"], c.get("risk_class")): c for c in counters(tenant.server, tenant)}
    assert rows[("__risk__", "external_side_effect")]["used"] == 2
    assert rows[("message.email.send", None)]["used"] == 1 and rows[("message.email.send", None)]["remaining"] == 0


def test_a_budget_denial_counts_nothing(tenant: Tenant) -> None:
    tenant.budget(amount=5)
    policy(tenant, action_quotas=[{"action_kind": "llm.completion", "max_calls": 3, "window": "per_day_tumbling"}])
    with tenant.client() as c:
        assert reserve(c, tenant, "llm.completion", 10).json()["error"] == "BUDGET_EXCEEDED"
        assert reserve(c, tenant, "llm.completion", 1).status_code == 200
    (row,) = counters(tenant.server, tenant)
    assert row["used"] == 1 and row["limit"] == 3


def test_host_allowlist_applies_only_to_declared_matching_keys(tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    policy(tenant, action_quotas=[{"action_kind": "http.post", "max_calls": 1, "window": "per_hour_tumbling",
                                   "host_allowlist": ["api.sendgrid.com"]}])
    with tenant.client() as c:
        def post(host: str | None) -> int:
            extra = {"action_extra": {"policy_keys": {"host": host}}} if host else {}
            return reserve(c, tenant, "http.post", **extra).status_code
        assert post("api.sendgrid.com") == 200
        assert post("api.sendgrid.com") == 409
        assert post("other.example.com") == 200  # the allowlist is a positive filter
        assert post(None) == 200  # no host: the rule does not apply


def test_quota_holds_under_64_concurrent_clients(tenant: Tenant) -> None:
    tenant.budget(amount=10_000)
    policy(tenant, action_quotas=[{"action_kind": "llm.completion", "max_calls": 7, "window": "per_hour_tumbling"}])

    def one(_: int) -> int:
        # 64 clients at once; one that is told the store is busy (503) retries with the same idempotency key,
        # as the protocol asks (a loaded 2-core machine cannot always open 64 Redis connections in time)
        body = reserve_body(tenant, 10)
        with tenant.client() as c:
            for _ in range(10):
                r = c.post("/v1/reservations", json=body)
                if r.status_code != 503:
                    return r.status_code
        return 503

    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes.count(200) == 7 and codes.count(409) == 57, codes
    (row,) = counters(tenant.server, tenant)
    assert row["used"] == 7
    assert tenant.balance()["reserved"]["amount"] == 70


def test_per_run_counts_need_a_run_id_and_come_back_on_release(tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    policy(tenant, action_quotas=[{"action_kind": "llm.completion", "max_calls": 2, "window": "per_run",
                                   "per_run_counter_ttl_ms": 120000}])
    run = tenant.subject(dimensions={"run_id": "run-1"})
    with tenant.client() as c:
        r = reserve(c, tenant, "llm.completion")
        assert r.status_code == 400 and "run_id" in r.json()["message"]
        first = reserve(c, tenant, "llm.completion", subject=run).json()
        assert reserve(c, tenant, "llm.completion", subject=run).status_code == 200
        assert reserve(c, tenant, "llm.completion", subject=run).json()["error"] == "ACTION_QUOTA_EXCEEDED"
        other = tenant.subject(dimensions={"run_id": "run-2"})
        assert reserve(c, tenant, "llm.completion", subject=other).status_code == 200
        rel = c.post(f"/v1/reservations/{first['reservation_id']}/release", json={"idempotency_key": "rel-1"})
        assert rel.status_code == 200, rel.text
        assert reserve(c, tenant, "llm.completion", subject=run).status_code == 200
    rows = counters(tenant.server, tenant, run_id="run-1")
    assert [(r["window_key"], r["used"]) for r in rows] == [("run-1", 2)]


# ---- observe mode ----

def test_observe_mode_records_would_be_denials_and_changes_nothing(tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    policy(tenant, denied_action_kinds=["code.exec.shell"],
           action_quotas=[{"action_kind": "llm.completion", "max_calls": 1, "window": "per_hour_tumbling"}])
    with tenant.server.admin() as a:
        r = a.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"observe_mode": "OBSERVE"})
        assert r.status_code == 200 and r.json()["observe_mode"] == "OBSERVE"
    with tenant.client() as c:
        shadow = reserve(c, tenant, "code.exec.shell", 100)
        assert shadow.status_code == 200, shadow.text
        assert shadow.json()["decision"] == "DENY"
        assert shadow.json()["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
        assert "reservation_id" not in shadow.json()
        for _ in range(2):  # the quota counter does not move in OBSERVE mode: both would be allowed
            ok = reserve(c, tenant, "llm.completion", 100)
            assert ok.json()["decision"] == "ALLOW" and "reservation_id" not in ok.json()
        assert tenant.balance()["reserved"]["amount"] == 0
        # a request may override the tenant's mode
        assert reserve(c, tenant, "code.exec.shell", observe_mode="ENFORCE").status_code == 409
        assert reserve(c, tenant, "llm.completion", observe_mode="ENFORCE").status_code == 200
    assert counters(tenant.server, tenant)[0]["used"] == 1
    seen = events_of(tenant.server, tenant, "reservation.observed_denied")
    assert len(seen) == 1 and seen[0]["data"]["deny_detail"]["reason_code"] == "ACTION_KIND_DENIED"
    assert seen[0]["correlation_id"].startswith("observed:")
    assert len(events_of(tenant.server, tenant, "reservation.observed_allowed")) == 2
    # shadow denials stay out of reservation.denied (production alerting); the enforced one is there
    assert len(events_of(tenant.server, tenant, "reservation.denied")) == 1
    metrics = httpx.get(tenant.server.base_url + "/metrics").text
    assert 'endpoint="observe"' in metrics and "ACTION_KIND_DENIED" in metrics


# ---- the counters view: permissions, reset ----

def test_counter_permissions_with_balances_read_fallback_and_reset(tenant: Tenant) -> None:
    tenant.budget(amount=1000)
    pol = policy(tenant, action_quotas=[{"action_kind": "llm.completion", "max_calls": 1,
                                         "window": "per_hour_tumbling"}])
    with tenant.client() as c:
        assert reserve(c, tenant, "llm.completion").status_code == 200
        assert reserve(c, tenant, "llm.completion").status_code == 409
    server = tenant.server
    keys = {}
    with server.admin() as a:
        for name, perms in (("new", ["action_quotas:read"]), ("old", ["balances:read"]), ("none", ["budgets:read"])):
            r = a.post("/v1/admin/api-keys", json={"tenant_id": tenant.tenant_id, "name": name, "permissions": perms})
            assert r.status_code == 201, r.text
            keys[name] = r.json()["key_secret"]
        assert a.get("/v1/admin/action-quota-counters").status_code == 400  # admin must name the tenant
    url = server.base_url + "/v1/admin/action-quota-counters"
    r = httpx.get(url, headers={"X-Cycles-API-Key": keys["new"]})
    assert r.status_code == 200 and "x-cycles-permission-deprecated" not in r.headers
    (row,) = r.json()["counters"]
    assert (row["used"], row["limit"], row["policy_id"]) == (1, 1, pol["policy_id"])
    r = httpx.get(url, headers={"X-Cycles-API-Key": keys["old"]})
    assert r.status_code == 200 and r.headers["x-cycles-permission-deprecated"] == "balances:read"
    assert r.json()["counters"] == [row]
    assert httpx.get(url, headers={"X-Cycles-API-Key": keys["none"]}).status_code == 403
    reset = {"tenant_id": tenant.tenant_id, "scope": row["scope"], "action_kind": "llm.completion",
             "window": "per_hour_tumbling", "window_key": row["window_key"], "reason": "test"}
    assert httpx.post(url + "/reset", json=reset, headers={"X-Cycles-API-Key": keys["new"]}).status_code in (401, 403)
    with server.admin() as a:
        assert a.post(url + "/reset", json={**reset, "tenant_id": None}).status_code == 400
        assert a.post(url + "/reset", json={**reset, "window_key": "1999-01-01T00"}).status_code == 404
        r = a.post(url + "/reset", json=reset)
        assert r.status_code == 200, r.text
        assert r.json()["previous_used"] == 1 and r.json()["counter"]["used"] == 0
    with tenant.client() as c:
        assert reserve(c, tenant, "llm.completion").status_code == 200
    (ev,) = events_of(server, tenant, "quota.counter_reset")
    assert ev["data"]["previous_used"] == 1 and ev["data"]["reason"] == "test" and ev["data"]["actor_id"]


# ---- tenants without the extension see v0 bodies ----

def test_v0_tenants_get_no_new_fields(tenant: Tenant) -> None:
    tenant.budget(amount=5)
    with tenant.client() as c:
        dry = reserve(c, tenant, "llm.completion", 10, dry_run=True).json()
        assert dry["decision"] == "DENY" and "deny_detail" not in dry
        live = reserve(c, tenant, "llm.completion", 10).json()
        assert live["details"] == {"scope": f"tenant:{tenant.tenant_id}"}
        body = reserve_body(tenant, 10)
        assert "deny_detail" not in c.post("/v1/decide", json=body).json()
        # a request that uses policy_keys is accepted, and is told the deny detail
        keyed = reserve(c, tenant, "http.post", 10, dry_run=True, action_extra={"policy_keys": {"host": "a.b"}})
        assert keyed.status_code == 200 and keyed.json()["deny_detail"]["budget_remaining"] == 5


def test_registry_is_rate_limited_per_source(tmp_path: Path) -> None:
    """The registry is public: a source gets its allowance a minute, then 429 with Retry-After; 304s are free.
    Its own server, so the allowance it spends is nobody else's (the feature does not depend on the store)."""
    srv = start_server(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, extra_env={"CYCLES_ACTION_KINDS_PER_MINUTE": "5"})
    try:
        with httpx.Client(base_url=srv.base_url) as c:
            etag = c.get("/v1/action-kinds").headers["etag"]
            for _ in range(10):
                assert c.get("/v1/action-kinds", headers={"If-None-Match": etag}).status_code == 304
            codes = [c.get("/v1/action-kinds/llm.completion").status_code for _ in range(5)]
            assert codes == [200, 200, 200, 200, 429]
            r = c.get("/v1/action-kinds")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"] == "LIMIT_EXCEEDED"
    finally:
        srv.stop()


# ---- window rollover, on the store with its clock driven ----

@pytest.fixture(params=["sqlite", "redis"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    now = [1_709_251_170_000]  # 2024-02-29T23:59:30Z: a leap day, the last minute of the day
    loop = asyncio.new_event_loop()
    if request.param == "sqlite":
        from cycles.store.sqlite import SQLiteStore
        store: Any = SQLiteStore(str(tmp_path / "q.db"), synchronous="OFF", clock=lambda: now[0])
    else:
        from cycles.store.redis import RedisStore
        store = RedisStore(request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/13", clock=lambda: now[0])
    yield store, now, loop
    loop.run_until_complete(store.close())
    loop.close()


def test_windows_roll_over_at_the_calendar_boundary(clocked: Any) -> None:
    store, now, loop = clocked
    run = loop.run_until_complete
    tenant = f"q-{uuid.uuid4().hex[:8]}"
    run(store.create_tenant({"tenant_id": tenant, "name": tenant, "status": "ACTIVE"}))
    run(store.create_budget({"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": USD, "allocated": 10**9,
                             "overdraft_limit": 0, "commit_overage_policy": None, "extra": {}}))
    pol = {"policy_id": "pol_q", "scope_pattern": f"tenant:{tenant}", "status": "ACTIVE", "action_quotas": [
        {"action_kind": "llm.completion", "max_calls": 2, "window": "per_minute_tumbling"},
        {"action_kind": "llm.completion", "max_calls": 3, "window": "per_day_tumbling"}]}
    scopes = [f"tenant:{tenant}"]

    def attempt(kind: str = "reserve") -> dict[str, Any] | str:
        action = {"kind": "llm.completion", "name": "m"}
        plan = A.plan([pol], scopes, action, {"tenant": tenant}, now[0])
        cmd = ReserveCommand(tenant=tenant, endpoint=kind, idempotency_key=uuid.uuid4().hex, payload_hash="h",
                             subject={"tenant": tenant}, action=action, unit=USD, amount=1, scope_path=scopes[0],
                             scopes=scopes, actions=plan.store_arg())
        try:
            return run(store.reserve(cmd)).result
        except Exception as exc:  # noqa: BLE001 - the protocol error is what is compared
            return getattr(exc, "code", exc).value

    assert isinstance(attempt(), dict) and isinstance(attempt(), dict)
    assert attempt() == "ACTION_QUOTA_EXCEEDED"  # 2 per minute
    keys = {c["counter"].rsplit("|", 1)[1] for c in run(store.action_counters(tenant))}
    assert keys == {"2024-02-29T23:59", "2024-02-29"} == {A.window_key(now[0], 1), A.window_key(now[0], 3)}
    now[0] += 29_000  # 23:59:59.xxx: still the same minute
    assert attempt() == "ACTION_QUOTA_EXCEEDED"
    now[0] += 1_000  # 2024-03-01T00:00:00: a new minute and a new day
    assert isinstance(attempt(), dict)
    assert isinstance(attempt(), dict)
    dry = attempt("decide")
    assert dry["reason_code"] == "ACTION_QUOTA_EXCEEDED"
    assert dry["deny_detail"]["quota_violation"]["window_key"] == "2024-03-01T00:00"
    keys = {c["counter"].rsplit("|", 1)[1]: c["used"] for c in run(store.action_counters(tenant))}
    assert keys == {"2024-03-01T00:00": 2, "2024-03-01": 2}  # the old windows are over
    # the Lua calendar and Python's agree on every bucket format across the year
    for t in (0, 951_782_400_000, 1_735_689_599_999, 4_102_444_800_000):
        now[0] = t
        assert attempt() != "x"
    listed = {c["counter"].rsplit("|", 1)[1] for c in run(store.action_counters(tenant))}
    assert listed == {A.window_key(4_102_444_800_000, 1), A.window_key(4_102_444_800_000, 3)}


def test_custom_kind_declarations() -> None:
    reg = A.load_registry({A.CUSTOM_KINDS_ENV: '[{"kind": "custom.acme.erp.post", "risk_class": "high_risk"}]'})
    assert reg.risk_class("custom.acme.erp.post") == "high_risk"
    assert reg.risk_class("proprietary.action") == "side_effect"  # unregistered non-custom kinds
    reg.check("proprietary.action")
    with pytest.raises(A.ActionError):
        reg.check("custom.acme.other")
    with pytest.raises(A.ActionError):
        A.load_registry({A.CUSTOM_KINDS_ENV: '[{"kind": "custom.x", "risk_class": "high_risk"}]'})


def test_which_policy_rules_apply() -> None:
    scopes = ["tenant:t", "tenant:t/agent:a"]
    act = {"kind": "code.exec", "name": "x"}

    def pol(pid: str, priority: int, pattern: str = "tenant:t", **rules: Any) -> dict[str, Any]:
        return {"policy_id": pid, "priority": priority, "scope_pattern": pattern, "status": "ACTIVE", **rules}

    caps_only = pol("p_caps", 9, caps={"max_tokens": 5})
    low_deny = pol("p_deny", 1, denied_action_kinds=["code.exec"])
    high_allow = pol("p_allow", 5, "tenant:t/agent:*", allowed_action_kinds=["code.exec"])
    # a higher policy without lists does not switch off a lower policy's deny list
    assert A.plan([caps_only, low_deny], scopes, act, {}, 0).deny[0] == "ACTION_KIND_DENIED"
    # the first policy with a list decides: the higher allow list admits the kind, the lower deny is not added
    assert A.plan([caps_only, low_deny, high_allow], scopes, act, {}, 0).deny is None
    # quotas of a kind come from the first policy that has some for it; the counter is per matched scope
    q1 = pol("p_q1", 3, "tenant:t/agent:*", action_quotas=[
        {"action_kind": "code.exec", "max_calls": 4, "window": "per_hour_tumbling"}])
    day = "per_day_tumbling"
    q2 = pol("p_q2", 2, action_quotas=[{"action_kind": "code.exec", "max_calls": 1, "window": day},
                                         {"action_kind": "llm.completion", "max_calls": 1, "window": day}],
             risk_class_quotas=[{"risk_class": "high_risk", "max_calls": 9, "window": "per_tenant_per_day"}])
    plan = A.plan([q2, q1], scopes, act, {}, 0)
    assert [(q[0], q[4]) for q in plan.quotas] == [
        ("tenant:t|__risk__:high_risk|per_tenant_per_day", 9), ("tenant:t/agent:a|code.exec|per_hour_tumbling", 4)]
    # an effective window that has ended takes the policy out
    q1["effective_until_ms"] = 10
    assert [q[4] for q in A.plan([q2, q1], scopes, act, {}, 20).quotas] == [9, 1]
    assert A.pick_violation([(1, 1), (0, 9)], plan.quotas) == 0  # a risk-class violation answers first
