"""Webhook subscriptions through a real server, on both planes: create / get / list / patch / delete,
the admin bulk action, the webhook security config, the subscription invariants on every write path,
SSRF refusals, secrets that are shown once and sealed at rest, rotation with a grace period, and bad
input answered 400 (never 5xx)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any, Iterator

import httpx
import pytest

from support import ADMIN_KEY, WEBHOOK_KEY, Server, Tenant, new_tenant

WH_PERMS = ["webhooks:read", "webhooks:write", "budgets:read", "events:read"]
# TEST-NET-3 stands in for a public address: it resolves without DNS and nothing is served there. It is
# special-purpose, so blocked by default; these tests run with it unblocked (`tests_security`).
PUBLIC = "https://203.0.113.10"
SECURITY = "/v1/admin/config/webhook-security"
BULK = "/v1/admin/webhooks/bulk-action"


def tag() -> str:
    return uuid.uuid4().hex[:10]


def url(path: str = "") -> str:
    return f"{PUBLIC}/hooks/{path or tag()}"


def wh_tenant(server: Server, permissions: list[str] | None = None) -> Tenant:
    return new_tenant(server, permissions=permissions or WH_PERMS)


def body(**extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"url": url(), "event_types": ["budget.exhausted"]}
    b.update(extra)
    return b


def create(t: Tenant, **extra: Any) -> dict[str, Any]:
    with t.client() as c:
        r = c.post("/v1/webhooks", json=body(**extra))
    assert r.status_code == 201, r.text
    return r.json()


def admin_create(server: Server, tenant_id: str | None = None, **extra: Any) -> dict[str, Any]:
    with server.admin() as c:
        r = c.post("/v1/admin/webhooks", json=body(**extra), params={"tenant_id": tenant_id} if tenant_id else None)
    assert r.status_code == 201, r.text
    return r.json()


def run_store(server: Server, fn: Any) -> Any:
    from cycles.store import open_store

    async def go() -> Any:
        store = open_store(server.store_url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


def stored(server: Server, sid: str) -> dict[str, Any] | None:
    return run_store(server, lambda s: s.get_doc("webhook", sid))


def force(server: Server, sid: str, **changes: Any) -> None:
    """Change a stored record directly (what the delivery engine or a buggy provisioner would do)."""

    async def go(store: Any) -> None:
        rec = await store.get_doc("webhook", sid)
        await store.save_doc("webhook", rec["tenant_id"], sid, {**rec, **changes}, rec["version"], guard_tenant=False)

    run_store(server, go)


def box() -> Any:
    from cycles.webhooks.crypto import SecretBox

    return SecretBox(base64.b64decode(WEBHOOK_KEY))


def events_of(server: Server, tenant_id: str, event_type: str | None = None) -> list[dict[str, Any]]:
    params = {"tenant_id": tenant_id, "limit": 100}
    if event_type:
        params["event_type"] = event_type
    with server.admin() as c:
        r = c.get("/v1/admin/events", params=params)
    assert r.status_code == 200, r.text
    return r.json()["events"]


def assert_400(r: httpx.Response, code: str | None = None) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    if code:
        assert r.json()["error"] == code, r.text


def _blocked_for_tests() -> list[str]:
    from cycles.webhooks.urlpolicy import DEFAULT_BLOCKED

    return [r for r in DEFAULT_BLOCKED if r != "203.0.113.0/24"]


@pytest.fixture(scope="module", autouse=True)
def tests_security(server: Server) -> Iterator[None]:
    with server.admin() as c:
        assert c.put(SECURITY, json={"blocked_cidr_ranges": _blocked_for_tests()}).status_code == 200
    yield
    with server.admin() as c:
        assert c.put(SECURITY, json={}).status_code == 200


@pytest.fixture
def restore_security(server: Server) -> Iterator[None]:
    """The security config is server-wide: put back what was there."""
    with server.admin() as c:
        before = c.get(SECURITY).json()
    yield
    with server.admin() as c:
        assert c.put(SECURITY, json=before).status_code == 200


# ---- happy paths ----

def test_tenant_plane_crud(server: Server) -> None:
    t = wh_tenant(server)
    created = create(t, name="ops", description="budget alerts", event_categories=["reservation"],
                     scope_filter=f"tenant:{t.tenant_id}/*", thresholds={"budget_utilization": [0.95, 0.8]},
                     retry_policy={"max_retries": 3}, disable_after_failures=4, metadata={"team": "sre"})
    sub, secret = created["subscription"], created["signing_secret"]
    sid = sub["subscription_id"]
    assert sid.startswith("whsub_") and len(sid) == 6 + 24
    assert secret.startswith("whsec_") and len(secret) >= 40
    assert sub["tenant_id"] == t.tenant_id and sub["status"] == "ACTIVE" and sub["consecutive_failures"] == 0
    assert sub["retry_policy"] == {"max_retries": 3, "initial_delay_ms": 1000, "backoff_multiplier": 2.0,
                                   "max_delay_ms": 60000}
    assert sub["disable_after_failures"] == 4 and sub["thresholds"] == {"budget_utilization": [0.8, 0.95]}
    assert sub["event_categories"] == ["reservation"] and sub["metadata"] == {"team": "sre"}
    assert "signing_secret" not in sub

    with t.client() as c:
        got = c.get(f"/v1/webhooks/{sid}")
        assert got.status_code == 200 and got.json() == sub
        listed = c.get("/v1/webhooks")
        assert listed.status_code == 200 and [s["subscription_id"] for s in listed.json()["subscriptions"]] == [sid]
        assert listed.json()["has_more"] is False
        # the tenant parameter is validation only for a tenant key
        assert c.get("/v1/webhooks", params={"tenant": t.tenant_id}).status_code == 200
        r = c.patch(f"/v1/webhooks/{sid}", json={"name": "ops-2", "event_types": ["budget.exhausted", "tenant.suspended"]})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "ops-2" and r.json()["event_types"] == ["budget.exhausted", "tenant.suspended"]
        assert r.json()["updated_at"] >= sub["updated_at"] and "signing_secret" not in r.json()
        r = c.delete(f"/v1/webhooks/{sid}")
        assert r.status_code == 204 and r.content == b""
        r = c.get(f"/v1/webhooks/{sid}")
        assert r.status_code == 404 and r.json()["error"] == "WEBHOOK_NOT_FOUND"
        assert c.delete(f"/v1/webhooks/{sid}").status_code == 404
        # webhook.* events are operator-only: the tenant's event feed does not show them
        feed = c.get("/v1/events").json()["events"]
        assert not [e for e in feed if e["event_type"].startswith("webhook.")]
    assert stored(server, sid) is None

    evs = {e["event_type"]: e for e in events_of(server, t.tenant_id) if e["event_type"].startswith("webhook.")}
    assert set(evs) == {"webhook.created", "webhook.updated", "webhook.deleted"}
    assert evs["webhook.created"]["data"] == {"subscription_id": sid, "tenant_id": t.tenant_id, "new_status": "ACTIVE",
                                              "changed_fields": []}
    assert evs["webhook.created"]["correlation_id"] == f"webhook_create:{sid}"
    assert evs["webhook.created"]["category"] == "webhook"
    assert sorted(evs["webhook.updated"]["data"]["changed_fields"]) == ["event_types", "name"]
    assert evs["webhook.deleted"]["data"]["previous_status"] == "ACTIVE"
    assert "new_status" not in evs["webhook.deleted"]["data"]


def test_admin_plane_crud_system_and_tenant_owned(server: Server) -> None:
    t = wh_tenant(server)
    # no tenant_id: a system-wide subscription, which may carry admin-only selectors
    system = admin_create(server, event_types=["api_key.created", "policy.updated"], event_categories=["system"])
    ssid = system["subscription"]["subscription_id"]
    assert system["subscription"]["tenant_id"] == "__system__" and system["signing_secret"].startswith("whsec_")
    owned = admin_create(server, t.tenant_id)["subscription"]
    assert owned["tenant_id"] == t.tenant_id
    # the owning tenant also as a body field (extension); both given and different is refused
    with server.admin() as c:
        r = c.post("/v1/admin/webhooks", json=body(tenant_id=t.tenant_id))
        assert r.status_code == 201 and r.json()["subscription"]["tenant_id"] == t.tenant_id
        assert_400(c.post("/v1/admin/webhooks", json=body(tenant_id=t.tenant_id), params={"tenant_id": "other"}))
        r = c.post("/v1/admin/webhooks", json=body(), params={"tenant_id": "no-such-" + tag()})
        assert r.status_code == 404 and r.json()["error"] == "TENANT_NOT_FOUND"

        assert c.get(f"/v1/admin/webhooks/{ssid}").json() == system["subscription"]
        r = c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id})
        assert r.status_code == 200 and len(r.json()["subscriptions"]) == 2
        r = c.get("/v1/admin/webhooks", params={"tenant_id": "__system__", "search": ssid})
        assert [s["subscription_id"] for s in r.json()["subscriptions"]] == [ssid]
        r = c.patch(f"/v1/admin/webhooks/{ssid}", json={"event_types": [], "event_categories": ["api_key", "webhook"]})
        assert r.status_code == 200 and r.json()["event_categories"] == ["api_key", "webhook"], r.text
        assert c.delete(f"/v1/admin/webhooks/{ssid}").status_code == 204
        assert c.get(f"/v1/admin/webhooks/{ssid}").json()["error"] == "WEBHOOK_NOT_FOUND"

        # the tenant plane under the admin key: the tenant is a required filter; reads and writes of any tenant
        r = c.get("/v1/webhooks")
        assert_400(r)
        assert "tenant query parameter is required" in r.json()["message"]
        r = c.get("/v1/webhooks", params={"tenant": t.tenant_id})
        assert r.status_code == 200 and len(r.json()["subscriptions"]) == 2
        osid = owned["subscription_id"]
        assert c.get(f"/v1/webhooks/{osid}").status_code == 200
        r = c.patch(f"/v1/webhooks/{osid}", json={"status": "PAUSED", "metadata": {"reason": "[WEBHOOK_PAUSE] INC-1"}})
        assert r.status_code == 200 and r.json()["status"] == "PAUSED"
        rid = r.headers["x-request-id"]
        logs = c.get("/v1/admin/audit/logs", params={"request_id": rid}).json()["logs"]
        assert logs and logs[0]["metadata"]["actor_type"] == "admin_on_behalf_of"
        assert logs[0]["metadata"]["target_tenant_id"] == t.tenant_id
        r = c.post("/v1/webhooks", json=body(tenant_id=t.tenant_id))  # admin on behalf of the tenant
        assert r.status_code == 201 and r.json()["subscription"]["tenant_id"] == t.tenant_id
        assert_400(c.post("/v1/webhooks", json=body()))  # which tenant?
        assert c.delete(f"/v1/webhooks/{osid}").status_code == 204


def test_list_filters_search_sort_and_cursor(server: Server) -> None:
    t = wh_tenant(server)
    mark = tag()
    subs = [admin_create(server, t.tenant_id, url=f"{PUBLIC}/{mark}/{i}",
                         event_types=["budget.exhausted"] if i % 2 else ["tenant.suspended"])["subscription"]
            for i in range(5)]
    sids = [s["subscription_id"] for s in subs]
    for i, sid in enumerate(sids):
        force(server, sid, consecutive_failures=i * 2)
    force(server, sids[0], status="PAUSED")
    with server.admin() as c:
        def ids(**params: Any) -> list[str]:
            r = c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id, **params})
            assert r.status_code == 200, r.text
            return [s["subscription_id"] for s in r.json()["subscriptions"]]

        assert ids() == list(reversed(sids))  # default: consecutive_failures, descending
        assert ids(sort_dir="asc") == sids
        assert ids(status="PAUSED") == [sids[0]]
        assert set(ids(event_type="budget.exhausted")) == {sids[1], sids[3]}
        assert ids(search=f"{mark}/3".upper()) == [sids[3]]
        assert ids(search=sids[2]) == [sids[2]]
        assert ids(search="") == ids()  # empty is absent
        assert ids(sort_by="url", sort_dir="asc") == sids
        # cursor pagination covers every row exactly once, in order
        for params in ({}, {"sort_by": "url", "sort_dir": "asc"}, {"sort_by": "status"}, {"sort_by": "tenant_id"}):
            seen: list[str] = []
            cursor = None
            for _ in range(10):
                r = c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id, "limit": 2, **params,
                                                        **({"cursor": cursor} if cursor else {})})
                assert r.status_code == 200, r.text
                page = r.json()
                seen += [s["subscription_id"] for s in page["subscriptions"]]
                cursor = page.get("next_cursor")
                assert page["has_more"] == (cursor is not None)
                if not cursor:
                    break
            assert seen == ids(**params), params
        r = c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id, "limit": 2})
        cursor = r.json()["next_cursor"]
        assert_400(c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id, "cursor": cursor, "status": "ACTIVE"}))
        for bad in ({"cursor": "!!!"}, {"cursor": "eyJrIjpbMV19"}, {"sort_by": "name"}, {"sort_dir": "up"},
                    {"status": "GONE"}, {"event_type": "budget.nope"}, {"search": "x" * 129}, {"limit": "0"},
                    {"limit": "101"}, {"limit": "ten"}):
            r = c.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id, **bad})
            assert_400(r)
    with t.client() as c:
        r = c.get("/v1/webhooks", params={"status": "PAUSED"})
        assert [s["subscription_id"] for s in r.json()["subscriptions"]] == [sids[0]]
        r = c.get("/v1/webhooks", params={"limit": 3})
        assert len(r.json()["subscriptions"]) == 3 and r.json()["has_more"] is True
        r2 = c.get("/v1/webhooks", params={"limit": 3, "cursor": r.json()["next_cursor"]})
        assert len(r2.json()["subscriptions"]) == 2 and r2.json()["has_more"] is False


# ---- permissions and tenancy ----

def test_permissions(server: Server) -> None:
    owner = wh_tenant(server)
    sid = create(owner)["subscription"]["subscription_id"]
    none = new_tenant(server, permissions=["budgets:read"], tenant_id=owner.tenant_id)
    reader = new_tenant(server, permissions=["webhooks:read"], tenant_id=owner.tenant_id)
    with none.client() as c:
        for r in (c.get("/v1/webhooks"), c.get(f"/v1/webhooks/{sid}"), c.post("/v1/webhooks", json=body()),
                  c.patch(f"/v1/webhooks/{sid}", json={"name": "x"}), c.delete(f"/v1/webhooks/{sid}")):
            assert r.status_code == 403 and r.json()["error"] == "FORBIDDEN", r.text
    with reader.client() as c:
        assert c.get("/v1/webhooks").status_code == 200
        assert c.get(f"/v1/webhooks/{sid}").status_code == 200
        for r in (c.post("/v1/webhooks", json=body()), c.patch(f"/v1/webhooks/{sid}", json={"name": "x"}),
                  c.delete(f"/v1/webhooks/{sid}")):
            assert r.status_code == 403, r.text
    # tenant keys never reach the admin plane
    with owner.client() as c:
        for r in (c.get("/v1/admin/webhooks"), c.get(f"/v1/admin/webhooks/{sid}"),
                  c.post("/v1/admin/webhooks", json=body()), c.patch(f"/v1/admin/webhooks/{sid}", json={"name": "x"}),
                  c.delete(f"/v1/admin/webhooks/{sid}"), c.get(SECURITY), c.put(SECURITY, json={}),
                  c.post(BULK, json={"filter": {"tenant_id": owner.tenant_id}, "action": "PAUSE",
                                     "idempotency_key": tag()})):
            assert r.status_code in (401, 403), r.text
    # a read-only operator key
    with server.admin() as c:
        viewer = c.post("/v1/admin/operator-keys", json={"name": "wh-viewer-" + tag(),
                                                          "permissions": ["admin:webhooks:read"]}).json()["key_secret"]
    with httpx.Client(base_url=server.base_url, headers={"X-Admin-API-Key": viewer}, timeout=30) as v:
        assert v.get("/v1/admin/webhooks", params={"tenant_id": owner.tenant_id}).status_code == 200
        assert v.get(f"/v1/admin/webhooks/{sid}").status_code == 200
        assert v.get(SECURITY).status_code == 200
        for r in (v.post("/v1/admin/webhooks", json=body()), v.patch(f"/v1/admin/webhooks/{sid}", json={"name": "x"}),
                  v.delete(f"/v1/admin/webhooks/{sid}"), v.put(SECURITY, json={}),
                  v.post(BULK, json={"filter": {"tenant_id": owner.tenant_id}, "action": "PAUSE",
                                     "idempotency_key": tag()}),
                  v.patch(f"/v1/webhooks/{sid}", json={"name": "x"})):
            assert r.status_code == 403 and r.json()["error"] == "INSUFFICIENT_PERMISSIONS", r.text
    assert stored(server, sid)["status"] == "ACTIVE"


def test_cross_tenant_ids_answer_not_found(server: Server) -> None:
    a, b = wh_tenant(server), wh_tenant(server)
    secret_url = url("private-" + tag())
    sid = create(a, url=secret_url, name="a-only")["subscription"]["subscription_id"]
    system = admin_create(server)["subscription"]["subscription_id"]
    with b.client() as c:
        for target in (sid, system):
            for r in (c.get(f"/v1/webhooks/{target}"), c.patch(f"/v1/webhooks/{target}", json={"status": "PAUSED"}),
                      c.delete(f"/v1/webhooks/{target}")):
                assert r.status_code == 404 and r.json()["error"] == "WEBHOOK_NOT_FOUND", r.text
                assert secret_url not in r.text and "a-only" not in r.text
        r = c.get("/v1/webhooks")
        assert r.status_code == 200 and r.json()["subscriptions"] == []
        r = c.get("/v1/webhooks", params={"tenant": a.tenant_id})
        assert r.status_code == 403 and secret_url not in r.text
        # an unknown id answers the same
        r = c.get("/v1/webhooks/whsub_" + "0" * 24)
        assert r.status_code == 404 and r.json()["error"] == "WEBHOOK_NOT_FOUND"
        assert c.get("/v1/webhooks/" + "x" * 500).status_code == 404
    rec = stored(server, sid)
    assert rec["status"] == "ACTIVE" and rec["name"] == "a-only"
    with server.admin() as c:
        assert c.delete(f"/v1/admin/webhooks/{system}").status_code == 204


# ---- bad input ----

BAD_CREATE: list[Any] = [
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "surprise": 1},
    {"url": PUBLIC + "/x"},
    {"event_types": ["budget.exhausted"]},
    {"url": 42, "event_types": ["budget.exhausted"]},
    {"url": PUBLIC + "/x", "event_types": "budget.exhausted"},
    {"url": PUBLIC + "/x", "event_types": []},
    {"url": PUBLIC + "/x", "event_types": ["budget.nope"]},
    {"url": PUBLIC + "/x", "event_types": [""]},
    {"url": PUBLIC + "/x", "event_types": [7]},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "event_categories": ["money"]},
    {"url": PUBLIC + "/" + "a" * 2100, "event_types": ["budget.exhausted"]},
    {"url": "", "event_types": ["budget.exhausted"]},
    {"url": "not a url", "event_types": ["budget.exhausted"]},
    {"url": "ftp://203.0.113.10/x", "event_types": ["budget.exhausted"]},
    {"url": "https://", "event_types": ["budget.exhausted"]},
    {"url": "https://203.0.113.10:99999/x", "event_types": ["budget.exhausted"]},
    {"url": "https://203.0.113.10/a\nb", "event_types": ["budget.exhausted"]},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "name": "n" * 257},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "description": "d" * 1025},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "name": 5},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "signing_secret": "short"},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"X-Cycles-Signature": "forged"}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"Host": "evil"}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"X-A": "v\r\nX-B: injected"}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"bad name": "v"}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"X-A": 1}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {"X-A": "1", "x-a": "2"}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "headers": {f"X-{i}": "v" for i in range(21)}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "retry_policy": {"max_retries": 11}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "retry_policy": {"initial_delay_ms": 1.5}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "retry_policy": {"bogus": 1}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"],
     "retry_policy": {"initial_delay_ms": 50000, "max_delay_ms": 1000}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "disable_after_failures": 0},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "disable_after_failures": True},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "thresholds": {"budget_utilization": [1.5]}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "thresholds": {"burn_rate_multiplier": 1.0}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "thresholds": {"rate_window_seconds": 10}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "thresholds": {"nope": 1}},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "scope_filter": "tenant:*/x"},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "metadata": []},
    {"url": PUBLIC + "/x", "event_types": ["budget.exhausted"], "status": "ACTIVE"},
    [], "just a string", None, 17,
]

BAD_PATCH: list[Any] = [
    {"surprise": 1}, {"url": None}, {"url": 5}, {"url": "http://203.0.113.10/x"}, {"url": "a" * 2049},
    {"name": "n" * 257}, {"description": "d" * 1025}, {"event_types": ["nope.nope"]}, {"event_types": None},
    {"event_categories": ["money"]}, {"status": "DISABLED"}, {"status": "active"}, {"signing_secret": "short"},
    {"signing_secret": "s" * 20, "rotate_signing_secret": True}, {"secret_grace_seconds": 60},
    {"rotate_signing_secret": True, "secret_grace_seconds": 7 * 86400 + 1},
    {"rotate_signing_secret": True, "secret_grace_seconds": -1}, {"rotate_signing_secret": "yes"},
    {"retry_policy": {"max_delay_ms": 10}}, {"retry_policy": {"initial_delay_ms": 60000, "max_delay_ms": 1000}},
    {"headers": {"Content-Length": "0"}}, {"headers": {"X-A": "a\nb"}}, {"disable_after_failures": -1},
    {"thresholds": {"denial_rate_threshold": 2}}, {"scope_filter": "a*b"},
    {"event_types": []},  # with no categories: INVARIANT 1
    [], "x", None,
]


UNSENDABLE_HEADERS = [
    ({"X-Team": "équipe"}, "non-ASCII"), ({"X-Team": "a\u2028b"}, "non-ASCII"), ({"X-Team": "a\x01b"}, "control"),
    ({"X-Team": "a\x7fb"}, "control"), ({"X-Team": "a\rb"}, "CR, LF and NUL"), ({"X-Team": "a\x00"}, "CR, LF and NUL"),
    ({"X-Team\n": "v"}, "not a valid HTTP header name"), ({"X-Tëam": "v"}, "not a valid HTTP header name"),
]


def test_header_values_must_be_sendable(server: Server) -> None:
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    with t.client() as c, server.admin() as a:
        for headers, why in UNSENDABLE_HEADERS:
            for r in (c.post("/v1/webhooks", json=body(headers=headers)),
                      a.post("/v1/admin/webhooks", json=body(headers=headers)),
                      c.patch(f"/v1/webhooks/{sid}", json={"headers": headers}),
                      a.patch(f"/v1/admin/webhooks/{sid}", json={"headers": headers})):
                assert_400(r, "INVALID_REQUEST")
                assert why in r.json()["message"], r.json()
        # printable ASCII with spaces and tabs is fine
        r = c.patch(f"/v1/webhooks/{sid}", json={"headers": {"X-Team": "sre team\t~!"}})
        assert r.status_code == 200, r.text


def test_bad_input_is_400_never_5xx(server: Server) -> None:
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    before = stored(server, sid)
    with t.client() as c, server.admin() as a:
        for bad in BAD_CREATE:
            for client, path in ((c, "/v1/webhooks"), (a, "/v1/admin/webhooks")):
                r = client.post(path, json=bad)
                assert r.status_code == 400, (path, bad, r.status_code, r.text)
                assert r.json()["error"] in ("INVALID_REQUEST", "WEBHOOK_URL_INVALID")
        for bad in BAD_PATCH:
            for client, path in ((c, f"/v1/webhooks/{sid}"), (a, f"/v1/admin/webhooks/{sid}")):
                r = client.patch(path, json=bad)
                assert r.status_code == 400, (path, bad, r.status_code, r.text)
        for raw in (b"{", b"\xff\xfe", b"", b"[" * 10000, b'{"url": "\\ud800"}'):
            for r in (c.post("/v1/webhooks", content=raw), c.patch(f"/v1/webhooks/{sid}", content=raw),
                      a.post(BULK, content=raw), a.put(SECURITY, content=raw)):
                assert r.status_code == 400, (raw[:20], r.status_code, r.text)
        # a tenant key names no tenant
        r = c.post("/v1/webhooks", json=body(tenant_id=t.tenant_id))
        assert_400(r, "INVALID_REQUEST")
        assert "tenant_id" in r.json()["message"]
        # an unknown-field or overlong id in a path is just not found
        assert c.get("/v1/webhooks/%00").status_code == 404
    assert stored(server, sid) == before
    with t.client() as c:
        assert c.get("/v1/webhooks").json()["subscriptions"][0]["subscription_id"] == sid
        assert len(c.get("/v1/webhooks").json()["subscriptions"]) == 1


def test_admin_only_selectors_refused_on_every_write_path(server: Server) -> None:
    """INVARIANT 2: a tenant-owned subscription never carries api_key / policy / webhook / system selectors,
    whoever writes it and however; INVARIANT 1: never both selectors empty."""
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    before = stored(server, sid)
    admin_only = [{"event_types": ["api_key.created"]}, {"event_types": ["budget.exhausted", "policy.updated"]},
                  {"event_types": ["budget.exhausted"], "event_categories": ["webhook"]},
                  {"event_types": ["budget.exhausted"], "event_categories": ["budget", "system"]},
                  {"event_types": ["system.webhook_test"]}]
    with t.client() as c, server.admin() as a:
        for sel in admin_only:
            # tenant create
            assert_400(c.post("/v1/webhooks", json=body(**sel)), "INVALID_REQUEST")
            # admin create for a tenant: query parameter and body field
            assert_400(a.post("/v1/admin/webhooks", json=body(**sel), params={"tenant_id": t.tenant_id}),
                       "INVALID_REQUEST")
            assert_400(a.post("/v1/admin/webhooks", json=body(tenant_id=t.tenant_id, **sel)), "INVALID_REQUEST")
            # admin on behalf of the tenant on the tenant plane
            assert_400(a.post("/v1/webhooks", json=body(tenant_id=t.tenant_id, **sel)), "INVALID_REQUEST")
            # patches: tenant key, admin plane, admin on the tenant plane
            for client, path in ((c, f"/v1/webhooks/{sid}"), (a, f"/v1/admin/webhooks/{sid}"),
                                 (a, f"/v1/webhooks/{sid}")):
                r = client.patch(path, json=sel)
                assert_400(r, "INVALID_REQUEST")
        # categories alone on a patch, and category-only conversions
        r = c.patch(f"/v1/webhooks/{sid}", json={"event_categories": ["api_key"]})
        assert_400(r, "INVALID_REQUEST")
        assert "api_key" in r.json()["message"]
        assert stored(server, sid) == before
        r = c.patch(f"/v1/webhooks/{sid}", json={"event_types": [], "event_categories": ["budget"]})
        assert r.status_code == 200 and r.json()["event_types"] == [] and r.json()["event_categories"] == ["budget"]
        assert_400(c.patch(f"/v1/webhooks/{sid}", json={"event_categories": []}), "INVALID_REQUEST")  # INVARIANT 1
        assert_400(a.patch(f"/v1/admin/webhooks/{sid}", json={"event_categories": []}), "INVALID_REQUEST")
        # the same selectors are fine on an operator-owned (__system__) subscription
        r = a.post("/v1/admin/webhooks", json=body(event_types=["api_key.created"], event_categories=["system"]))
        assert r.status_code == 201, r.text
        system_sid = r.json()["subscription"]["subscription_id"]
        assert a.delete(f"/v1/admin/webhooks/{system_sid}").status_code == 204

    # bulk: a row whose stored selectors break the invariant (written behind the API's back) is refused,
    # not resumed or paused; deleting it is fine
    force(server, sid, event_types=["api_key.created"], event_categories=["policy"], status="PAUSED")
    bad_row = stored(server, sid)
    with server.admin() as a:
        for action in ("RESUME",):
            r = a.post(BULK, json={"filter": {"tenant_id": t.tenant_id}, "action": action, "idempotency_key": tag()})
            assert r.status_code == 200, r.text
            assert r.json()["succeeded"] == [] and [f["id"] for f in r.json()["failed"]] == [sid]
            assert r.json()["failed"][0]["error_code"] == "INVALID_REQUEST"
        force(server, sid, status="ACTIVE")
        r = a.post(BULK, json={"filter": {"tenant_id": t.tenant_id}, "action": "PAUSE", "idempotency_key": tag()})
        assert r.json()["failed"][0]["error_code"] == "INVALID_REQUEST", r.text
        assert stored(server, sid)["status"] == "ACTIVE"
        assert stored(server, sid)["event_categories"] == bad_row["event_categories"]
        r = a.post(BULK, json={"filter": {"tenant_id": t.tenant_id}, "action": "DELETE", "idempotency_key": tag()})
        assert [s["id"] for s in r.json()["succeeded"]] == [sid]
    assert stored(server, sid) is None


# ---- SSRF ----

REFUSED_URLS = [
    "http://203.0.113.10/hook", "https://127.0.0.1/hook", "https://127.8.9.10:8443/hook", "https://10.1.2.3/hook",
    "https://169.254.169.254/latest/meta-data/", "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook",
    "https://localhost/hook", "https://LOCALHOST./hook", "https://192.168.1.1/x", "https://172.16.0.1/x",
    "https://0.0.0.0/x", "https://[fd00::1]/x", "https://user:pw@203.0.113.10/x", "https://no-such-host.invalid/x",
]


def test_ssrf_refused_on_create_and_url_change(server: Server, restore_security: None) -> None:
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    with t.client() as c, server.admin() as a:
        for bad in REFUSED_URLS:
            r = c.post("/v1/webhooks", json=body(url=bad))
            assert_400(r, "WEBHOOK_URL_INVALID")
            assert_400(a.post("/v1/admin/webhooks", json=body(url=bad)), "WEBHOOK_URL_INVALID")
            assert_400(c.patch(f"/v1/webhooks/{sid}", json={"url": bad}), "WEBHOOK_URL_INVALID")
        assert c.get("/v1/webhooks").json()["subscriptions"][0]["url"].startswith(PUBLIC)

        # the operator relaxes the policy: http allowed, a custom blocked list without loopback
        r = a.put(SECURITY, json={"allow_http": True, "blocked_cidr_ranges": ["192.0.2.0/24", "10.0.0.0/8"]})
        assert r.status_code == 200, r.text
        assert r.json() == {"blocked_cidr_ranges": ["192.0.2.0/24", "10.0.0.0/8"], "allowed_url_patterns": [],
                            "allow_http": True}
        assert a.get(SECURITY).json() == r.json()
        r = c.post("/v1/webhooks", json=body(url="http://127.0.0.1:9/hook"))
        assert r.status_code == 201, r.text
        local_sid = r.json()["subscription"]["subscription_id"]
        assert c.patch(f"/v1/webhooks/{sid}", json={"url": "http://localhost:9/x"}).status_code == 200
        assert_400(c.post("/v1/webhooks", json=body(url="https://192.0.2.7/x")), "WEBHOOK_URL_INVALID")
        assert_400(c.post("/v1/webhooks", json=body(url="http://10.0.0.1/x")), "WEBHOOK_URL_INVALID")
        # allowed_url_patterns: only matching URLs
        r = a.put(SECURITY, json={"allowed_url_patterns": [f"{PUBLIC}/ok/*"]})
        assert r.status_code == 200 and r.json()["allow_http"] is False
        assert r.json()["blocked_cidr_ranges"][0] == "10.0.0.0/8"  # defaults for what a PUT leaves out
        assert_400(c.post("/v1/webhooks", json=body(url=f"{PUBLIC}/ok/1")), "WEBHOOK_URL_INVALID")  # TEST-NET-3
        r = a.put(SECURITY, json={"allowed_url_patterns": [f"{PUBLIC}/ok/*"], "blocked_cidr_ranges": _blocked_for_tests()})
        assert c.post("/v1/webhooks", json=body(url=f"{PUBLIC}/ok/1")).status_code == 201
        assert_400(c.post("/v1/webhooks", json=body(url=f"{PUBLIC}/other")), "WEBHOOK_URL_INVALID")
        # not retroactive: subscriptions created under the relaxed config stay and can be edited,
        # but a url change is checked against the config in force
        assert c.get(f"/v1/webhooks/{local_sid}").json()["url"] == "http://127.0.0.1:9/hook"
        assert c.patch(f"/v1/webhooks/{local_sid}", json={"name": "still here"}).status_code == 200
        assert_400(c.patch(f"/v1/webhooks/{local_sid}", json={"url": "http://127.0.0.1:10/hook"}),
                   "WEBHOOK_URL_INVALID")


def test_security_config_validation(server: Server, restore_security: None) -> None:
    from cycles.webhooks.urlpolicy import DEFAULT_BLOCKED

    with server.admin() as a:
        for bad in ({"blocked_cidr_ranges": ["10.0.0.0/33"]}, {"blocked_cidr_ranges": ["nope"]},
                    {"blocked_cidr_ranges": "10.0.0.0/8"}, {"allow_http": "yes"}, {"allowed_url_patterns": [1]},
                    {"allowed_url_patterns": ["https://a b/*"]}, {"extra": True}, [], None):
            r = a.put(SECURITY, json=bad)
            assert_400(r, "INVALID_REQUEST")
        r = a.put(SECURITY, json={"blocked_cidr_ranges": ["10.1.2.3/8", " 127.0.0.1 ", "::1"]})
        assert r.status_code == 200, r.text
        assert r.json()["blocked_cidr_ranges"] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
        r = a.put(SECURITY, json={})
        assert r.json() == {"blocked_cidr_ranges": list(DEFAULT_BLOCKED), "allowed_url_patterns": [],
                            "allow_http": False}
        assert a.get(SECURITY).json() == r.json()


# Special-purpose addresses (IANA IPv4/IPv6 registries) and the IPv6 forms that embed an IPv4 address.
SSRF_FORMS = [
    # NAT64 well-known and local-use prefixes
    "[64:ff9b::a9fe:a9fe]", "[64:ff9b::7f00:1]", "[64:ff9b::169.254.169.254]", "[64:ff9b:1::a00:1]",
    # 6to4, Teredo (client 127.0.0.1, inverted), IPv4-mapped, IPv4-compatible, SIIT
    "[2002:a9fe:a9fe::]", "[2002:7f00:1::1]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[::ffff:a9fe:a9fe]",
    "[::ffff:10.0.0.1]", "[::7f00:1]", "[::127.0.0.1]", "[::ffff:0:7f00:1]",
    # IPv4 special-purpose
    "198.18.0.1", "198.19.255.254", "192.0.0.8", "192.0.0.170", "192.0.2.1", "198.51.100.1", "192.88.99.1",
    "192.31.196.1", "192.52.193.1", "192.175.48.1", "100.64.0.1", "224.0.0.1", "255.255.255.255",
    # IPv6 special-purpose, and deprecated site-local
    "[fec0::1]", "[2001:db8::1]", "[3fff::1]", "[100::1]", "[5f00::1]", "[2620:4f:8000::1]", "[2001:2::1]",
    "[fd12::1]", "[fe80::1]", "[ff02::1]", "[::]", "[::1]",
]


def test_ssrf_special_purpose_forms_refused_at_write(server: Server) -> None:
    from cycles.webhooks.urlpolicy import DEFAULT_BLOCKED

    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    with t.client() as c, server.admin() as a:
        # the defaults themselves (TEST-NET-3 included), not the tests' relaxed copy
        assert a.put(SECURITY, json={}).json()["blocked_cidr_ranges"] == list(DEFAULT_BLOCKED)
        try:
            for host in SSRF_FORMS + ["203.0.113.10"]:
                bad = f"https://{host}/hook"
                assert_400(c.post("/v1/webhooks", json=body(url=bad)), "WEBHOOK_URL_INVALID")
                assert_400(a.post("/v1/admin/webhooks", json=body(url=bad)), "WEBHOOK_URL_INVALID")
                assert_400(c.patch(f"/v1/webhooks/{sid}", json={"url": bad}), "WEBHOOK_URL_INVALID")
        finally:
            assert a.put(SECURITY, json={"blocked_cidr_ranges": _blocked_for_tests()}).status_code == 200


@pytest.mark.parametrize("host", SSRF_FORMS)
def test_ssrf_special_purpose_forms_refused_at_send(host: str) -> None:
    """The sender resolves, checks and pins the address on every attempt: nothing is sent."""
    from cycles.webhooks.send import Sender
    from cycles.webhooks.urlpolicy import UrlPolicy, UrlRejected, resolve

    with pytest.raises(UrlRejected, match="blocked range"):
        resolve(f"https://{host}/hook", UrlPolicy())
    result = asyncio.run(Sender(per_endpoint=1).post(f"https://{host}/hook", UrlPolicy(), b"{}", httpx.Headers(), 2))
    assert result.outcome == "refused" and not result.sent, result


@pytest.mark.parametrize("address,blocked", [
    ("64:ff9b::a9fe:a9fe", True), ("64:ff9b::808:808", False), ("2002:a9fe:a9fe::", True), ("2002:808:808::", False),
    ("64:ff9b:1:a9fe:a9:fe00::", True), ("2001:0:4136:e378:8000:63bf:80ff:fffe", True), ("::ffff:7f00:1", True),
    ("8.8.8.8", False), ("2606:4700::1111", False),
])
def test_ssrf_embedded_ipv4_checked_when_the_prefix_is_unblocked(address: str, blocked: bool) -> None:
    """An operator may unblock a translation prefix (DNS64); the IPv4 address inside is still checked."""
    from cycles.webhooks.urlpolicy import DEFAULT_BLOCKED, UrlPolicy, _blocked

    prefixes = {"64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/23", "::ffff:0:0/96"}
    policy = UrlPolicy(blocked_cidr_ranges=[r for r in DEFAULT_BLOCKED if r not in prefixes])
    assert _blocked(address, policy.networks()) is blocked


# ---- secrets ----

def test_secrets_shown_once_sealed_at_rest_and_headers_masked(server: Server) -> None:
    t = wh_tenant(server)
    given = "whsec_my-own-secret-" + tag()
    token = "Bearer tok_" + tag()
    created = create(t, signing_secret=given, headers={"Authorization": token, "X-Team": "sre-" + tag()})
    sid = created["subscription"]["subscription_id"]
    assert created["signing_secret"] == given
    assert created["subscription"]["headers"] == {"Authorization": "********", "X-Team": "********"}
    assert token not in str(created["subscription"])
    with t.client() as c, server.admin() as a:
        texts = [c.get(f"/v1/webhooks/{sid}").text, c.get("/v1/webhooks").text, a.get(f"/v1/admin/webhooks/{sid}").text,
                 a.get("/v1/admin/webhooks", params={"tenant_id": t.tenant_id}).text,
                 c.patch(f"/v1/webhooks/{sid}", json={"name": "renamed"}).text,
                 a.get("/v1/admin/events", params={"tenant_id": t.tenant_id}).text,
                 a.get("/v1/admin/audit/logs", params={"search": sid}).text]
        for text in texts:
            assert given not in text and token not in text and "whsec_" not in text and "sealed" not in text
        r = c.patch(f"/v1/webhooks/{sid}", json={"headers": {"Authorization": "Bearer new"}})
        assert r.status_code == 200 and r.json()["headers"] == {"Authorization": "********"}
        assert "Bearer new" not in r.text
    rec = stored(server, sid)
    assert set(rec["headers"]) == {"Authorization"}
    assert rec["headers"]["Authorization"].startswith("enc:v1:") and "Bearer" not in rec["headers"]["Authorization"]
    assert box().open(rec["headers"]["Authorization"]) == "Bearer new"
    assert len(rec["secrets"]) == 1 and given not in str(rec)
    assert box().open(rec["secrets"][0]["sealed"]) == given
    # resending the same header value keeps its sealed form (no change, no event)
    with t.client() as c:
        n = len(events_of(server, t.tenant_id, "webhook.updated"))
        r = c.patch(f"/v1/webhooks/{sid}", json={"headers": {"Authorization": "Bearer new"}})
        assert r.status_code == 200
        assert len(events_of(server, t.tenant_id, "webhook.updated")) == n
        assert c.patch(f"/v1/webhooks/{sid}", json={"headers": {}}).json().get("headers") is None
    assert stored(server, sid)["headers"] == {}


def test_rotation_keeps_the_previous_secret_for_a_grace_period(server: Server) -> None:
    t = wh_tenant(server)
    created = create(t)
    sid, first = created["subscription"]["subscription_id"], created["signing_secret"]
    with t.client() as c:
        r = c.patch(f"/v1/webhooks/{sid}", json={"rotate_signing_secret": True})
        assert r.status_code == 200, r.text
        second = r.json()["signing_secret"]
        assert second.startswith("whsec_") and second != first
        got = c.get(f"/v1/webhooks/{sid}")
        assert "signing_secret" not in got.json() and second not in got.text
    rec = stored(server, sid)
    assert len(rec["secrets"]) == 2
    new, old = rec["secrets"]
    assert new["expires_at_ms"] is None and old["expires_at_ms"] is not None
    assert 86_000_000 < old["expires_at_ms"] - new["created_at_ms"] <= 86_400_000
    for entry in rec["secrets"]:
        assert entry["sealed"].startswith("enc:v1:") and first not in entry["sealed"] and second not in entry["sealed"]
    assert first not in str(rec) and second not in str(rec)
    assert [box().open(s["sealed"]) for s in rec["secrets"]] == [second, first]
    upd = [e for e in events_of(server, t.tenant_id, "webhook.updated") if e["data"]["subscription_id"] == sid]
    assert upd and upd[0]["data"]["changed_fields"] == ["signing_secret"]

    # a given secret with a short grace period: every older secret now ends within it
    third = "whsec_third-" + tag()
    with t.client() as c:
        r = c.patch(f"/v1/webhooks/{sid}", json={"signing_secret": third, "secret_grace_seconds": 60})
        assert r.status_code == 200 and "signing_secret" not in r.json() and third not in r.text
        # the secret in use sent again is no rotation
        c.patch(f"/v1/webhooks/{sid}", json={"signing_secret": third})
    rec = stored(server, sid)
    assert [box().open(s["sealed"]) for s in rec["secrets"]] == [third, second, first]
    assert all(s["expires_at_ms"] - rec["secrets"][0]["created_at_ms"] <= 60_000 for s in rec["secrets"][1:])
    # grace 0: the old secrets stop signing at once and are dropped
    with server.admin() as a:
        r = a.patch(f"/v1/admin/webhooks/{sid}", json={"rotate_signing_secret": True, "secret_grace_seconds": 0})
        assert r.status_code == 200
        fourth = r.json()["signing_secret"]
    rec = stored(server, sid)
    assert [box().open(s["sealed"]) for s in rec["secrets"]] == [fourth]


# ---- status, lifecycle, events ----

def test_status_transitions_events_and_reenable(server: Server) -> None:
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]

    def patch(b: Any) -> httpx.Response:
        with t.client() as c:
            return c.patch(f"/v1/webhooks/{sid}", json=b)

    def last(event_type: str) -> dict[str, Any]:
        rows = [e for e in events_of(server, t.tenant_id, event_type) if e["data"]["subscription_id"] == sid]
        assert rows, event_type
        return rows[0]

    r = patch({"status": "PAUSED", "name": "quiet"})
    assert r.status_code == 200 and r.json()["status"] == "PAUSED"
    ev = last("webhook.paused")
    assert ev["data"] == {"subscription_id": sid, "tenant_id": t.tenant_id, "previous_status": "ACTIVE",
                          "new_status": "PAUSED", "changed_fields": ["name"]}
    assert ev["correlation_id"] == f"webhook_update:{sid}:{r.headers['x-request-id']}"
    assert ev["request_id"] == r.headers["x-request-id"]
    # no-op patches: nothing written, no event
    count = len(events_of(server, t.tenant_id))
    version = stored(server, sid)["version"]
    assert patch({}).status_code == 200
    assert patch({"status": "PAUSED", "name": "quiet"}).status_code == 200
    assert len(events_of(server, t.tenant_id)) == count and stored(server, sid)["version"] == version

    r = patch({"status": "ACTIVE"})
    assert r.json()["status"] == "ACTIVE"
    assert last("webhook.resumed")["data"]["previous_status"] == "PAUSED"

    # the delivery engine disabled it after failures: PAUSED is refused, ACTIVE re-enables and resets
    force(server, sid, status="DISABLED", consecutive_failures=10, disabled_reason="consecutive_failures_exceeded_threshold")
    assert_400(patch({"status": "PAUSED"}))
    r = patch({"status": "ACTIVE"})
    assert r.status_code == 200 and r.json()["status"] == "ACTIVE" and r.json()["consecutive_failures"] == 0
    assert stored(server, sid)["disabled_reason"] is None
    assert last("webhook.resumed")["data"]["previous_status"] == "DISABLED"


def test_closed_and_suspended_tenants(server: Server) -> None:
    t = wh_tenant(server)
    sid = create(t)["subscription"]["subscription_id"]
    with server.admin() as a:
        assert a.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "SUSPENDED"}).status_code == 200
    with t.client() as c:  # a suspended tenant's keys are read-only
        assert c.get(f"/v1/webhooks/{sid}").status_code == 200
        for r in (c.post("/v1/webhooks", json=body()), c.patch(f"/v1/webhooks/{sid}", json={"name": "x"}),
                  c.delete(f"/v1/webhooks/{sid}")):
            assert r.status_code == 409 and r.json()["error"] == "TENANT_SUSPENDED", r.text
    with server.admin() as a:  # operators still can
        assert a.patch(f"/v1/webhooks/{sid}", json={"status": "PAUSED"}).status_code == 200
        assert a.patch(f"/v1/admin/tenants/{t.tenant_id}", json={"status": "CLOSED"}).status_code == 200
        r = a.get(f"/v1/admin/webhooks/{sid}")
        assert r.status_code == 200 and r.json()["status"] == "DISABLED"  # the close cascade
        r = a.post("/v1/admin/webhooks", json=body(), params={"tenant_id": t.tenant_id})
        assert r.status_code == 409 and r.json()["error"] == "TENANT_CLOSED"
        for r in (a.patch(f"/v1/admin/webhooks/{sid}", json={"status": "ACTIVE"}),
                  a.patch(f"/v1/webhooks/{sid}", json={"status": "ACTIVE"}),
                  a.patch(f"/v1/admin/webhooks/{sid}", json={}),
                  a.delete(f"/v1/admin/webhooks/{sid}"), a.delete(f"/v1/webhooks/{sid}")):
            assert r.status_code == 409 and r.json()["error"] == "TENANT_CLOSED", r.text
        r = a.post(BULK, json={"filter": {"tenant_id": t.tenant_id}, "action": "RESUME", "idempotency_key": tag()})
        assert r.status_code == 200 and r.json()["failed"][0]["error_code"] == "INVALID_TRANSITION"
        r = a.post(BULK, json={"filter": {"tenant_id": t.tenant_id}, "action": "DELETE", "idempotency_key": tag()})
        assert r.status_code == 200 and r.json()["failed"][0]["error_code"] == "INVALID_TRANSITION", r.text
    assert stored(server, sid)["status"] == "DISABLED"


# ---- bulk ----

def test_bulk_action_gates_replay_and_row_outcomes(server: Server) -> None:
    t = wh_tenant(server)
    sids = [create(t)["subscription"]["subscription_id"] for _ in range(4)]
    force(server, sids[2], status="PAUSED")
    force(server, sids[3], status="DISABLED")
    f = {"tenant_id": t.tenant_id}
    with server.admin() as a:
        # safety gates: an empty filter, a wrong expected_count (nothing written), bad bodies
        assert_400(a.post(BULK, json={"filter": {}, "action": "PAUSE", "idempotency_key": tag()}))
        assert_400(a.post(BULK, json={"filter": {"search": "  "}, "action": "PAUSE", "idempotency_key": tag()}))
        for bad in ({"filter": f, "action": "DISABLE", "idempotency_key": tag()}, {"filter": f, "action": "PAUSE"},
                    {"filter": f, "action": "PAUSE", "idempotency_key": ""},
                    {"filter": f, "action": "PAUSE", "idempotency_key": "k" * 129},
                    {"filter": {**f, "status": "GONE"}, "action": "PAUSE", "idempotency_key": tag()},
                    {"filter": {**f, "event_type": "nope"}, "action": "PAUSE", "idempotency_key": tag()},
                    {"filter": {**f, "search": "s" * 129}, "action": "PAUSE", "idempotency_key": tag()},
                    {"filter": {**f, "x": 1}, "action": "PAUSE", "idempotency_key": tag()},
                    {"filter": f, "action": "PAUSE", "idempotency_key": tag(), "expected_count": -1}):
            assert_400(a.post(BULK, json=bad))
        r = a.post(BULK, json={"filter": f, "action": "PAUSE", "idempotency_key": tag(), "expected_count": 3})
        assert r.status_code == 409 and r.json()["error"] == "COUNT_MISMATCH"
        assert [stored(server, s)["status"] for s in sids] == ["ACTIVE", "ACTIVE", "PAUSED", "DISABLED"]

        k = tag()
        req = {"filter": f, "action": "PAUSE", "idempotency_key": k, "expected_count": 4}
        r = a.post(BULK, json=req)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["action"] == "PAUSE" and out["total_matched"] == 4 and out["idempotency_key"] == k
        assert {s["id"] for s in out["succeeded"]} == set(sids[:2])
        assert {s["id"]: s["reason"] for s in out["skipped"]} == {sids[2]: "ALREADY_IN_TARGET_STATE",
                                                                   sids[3]: "ALREADY_IN_TARGET_STATE"}
        assert out["failed"] == []
        paused = [e for e in events_of(server, t.tenant_id, "webhook.paused")]
        assert len(paused) == 2
        assert {e["correlation_id"] for e in paused} == {f"webhook_bulk_action:pause:{r.headers['x-request-id']}"}
        assert {e["request_id"] for e in paused} == {r.headers["x-request-id"]}
        assert paused[0]["data"]["previous_status"] == "ACTIVE" and paused[0]["data"]["new_status"] == "PAUSED"

        # idempotent replay: the same body, nothing applied again
        force(server, sids[0], status="ACTIVE")
        again = a.post(BULK, json=req)
        assert again.status_code == 200 and again.content == r.content
        assert stored(server, sids[0])["status"] == "ACTIVE"
        assert len(events_of(server, t.tenant_id, "webhook.paused")) == 2
        r = a.post(BULK, json={**req, "action": "RESUME"})
        assert r.status_code == 409 and r.json()["error"] == "IDEMPOTENCY_MISMATCH"
        r = a.post(BULK, json=req, headers={"X-Idempotency-Key": "other"})
        assert_400(r)

        r = a.post(BULK, json={"filter": f, "action": "RESUME", "idempotency_key": tag()})
        out = r.json()
        assert {s["id"] for s in out["succeeded"]} == {sids[1], sids[2]}
        assert [s["id"] for s in out["skipped"]] == [sids[0]]
        assert [(s["id"], s["error_code"]) for s in out["failed"]] == [(sids[3], "INVALID_TRANSITION")]
        assert len(events_of(server, t.tenant_id, "webhook.resumed")) == 2

        # filters narrow by status and search; DELETE removes, and a replay still answers the same
        r = a.post(BULK, json={"filter": {**f, "status": "DISABLED"}, "action": "DELETE", "idempotency_key": tag(),
                               "expected_count": 1})
        assert [s["id"] for s in r.json()["succeeded"]] == [sids[3]] and stored(server, sids[3]) is None
        k = tag()
        req = {"filter": {"search": sids[0].upper()}, "action": "DELETE", "idempotency_key": k}
        r = a.post(BULK, json=req)
        assert [s["id"] for s in r.json()["succeeded"]] == [sids[0]]
        assert a.post(BULK, json=req).content == r.content
        assert len(events_of(server, t.tenant_id, "webhook.deleted")) == 2
        logs = a.get("/v1/admin/audit/logs", params={"request_id": r.headers["x-request-id"]}).json()["logs"]
        # a "started" row written before any change, then the finished row with the outcome
        assert sorted(row["metadata"]["phase"] for row in logs) == ["finished", "started"]
        assert {row["operation"] for row in logs} == {"bulkActionWebhooks"}
        r = a.post(BULK, json={"filter": {"event_type": "budget.exhausted", **f}, "action": "PAUSE",
                               "idempotency_key": tag()})
        assert r.json()["total_matched"] == 2


# ---- no sealing key ----

def test_without_a_secret_key_writes_that_must_seal_answer_500(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from cycles.server.app import create_app

    monkeypatch.delenv("CYCLES_WEBHOOK_SECRET_KEY", raising=False)
    monkeypatch.delenv("CYCLES_WEBHOOK_ALLOW_PLAINTEXT", raising=False)
    app = create_app(store_url=f"sqlite:///{tmp_path / 'c.db'}", admin_key=ADMIN_KEY, sweep_interval_s=0)
    with TestClient(app) as c:
        h = {"X-Admin-API-Key": ADMIN_KEY}
        assert c.post("/v1/admin/tenants", json={"tenant_id": "acme", "name": "acme"}, headers=h).status_code == 201
        for params in ({}, {"tenant_id": "acme"}):
            r = c.post("/v1/admin/webhooks", json=body(), params=params, headers=h)
            assert r.status_code == 500 and r.json()["error"] == "INTERNAL_ERROR"
            assert "CYCLES_WEBHOOK_SECRET_KEY" in r.json()["message"]
        assert c.get("/v1/admin/webhooks", headers=h).json()["subscriptions"] == []
        assert c.get(SECURITY, headers=h).status_code == 200
