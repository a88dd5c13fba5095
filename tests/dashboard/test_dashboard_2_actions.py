"""Every operator action of the dashboard, done in real Chromium and checked through the API: the
change happened, through the same routes (and so the same permissions and audit rows) as the CLI."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import httpx
import pytest

from support import USD, Server, Tenant, new_tenant, reserve_body
from .conftest import Tab, Work, _Receiver


def eventually(check: Callable[[], Any], timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.1)


def budget(server: Server, tenant: str, scope: str, unit: str = USD) -> dict[str, Any]:
    with server.admin() as c:
        r = c.get("/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit})
    assert r.status_code == 200, r.text
    return r.json()


def amount(b: dict[str, Any], field: str) -> int:
    return (b.get(field) or {}).get("amount", 0)


@pytest.fixture
def gamma(work: Work) -> Tenant:
    """A fresh tenant of its own per test; its key (a scrypt hash, slow to make) only when a test asks."""
    tid = f"g-{uuid.uuid4().hex[:8]}"
    with work.server.admin() as c:
        assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": tid}).status_code == 201
    t = Tenant(work.server, tid, "")
    t.budget("", 1_000_000)
    t.budget("workspace:eng", 400_000)
    return t


def with_key(t: Tenant) -> Tenant:
    with t.server.admin() as c:
        r = c.post("/v1/admin/api-keys", json={"tenant_id": t.tenant_id, "name": "runtime",
                                                "permissions": ["reservations:create", "reservations:commit",
                                                                "reservations:list"]})
    assert r.status_code == 201, r.text
    t.key = r.json()["key_secret"]
    return t


def dialog_button(tab: Tab, name: str) -> None:
    tab.page.get_by_role("dialog").get_by_role("button", name=name, exact=True).click()


def test_freeze_unfreeze_and_the_five_fund_operations(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    root, eng = f"tenant:{tid}", f"tenant:{tid}/workspace:eng"
    work_tab.go(f"budgets?tenant_id={tid}")
    page.get_by_role("button", name=f"Freeze {eng}", exact=True).click()
    dialog_button(work_tab, "Freeze budget")
    eventually(lambda: budget(server, tid, eng)["status"] == "FROZEN")
    page.get_by_role("button", name=f"Unfreeze {eng}", exact=True).click()
    dialog_button(work_tab, "Unfreeze budget")
    eventually(lambda: budget(server, tid, eng)["status"] == "ACTIVE")
    with server.admin() as c:  # audited like the CLI: operator rows, target tenant in the metadata
        logs = c.get("/v1/admin/audit/logs", params={"operation": "freezeBudget,unfreezeBudget", "limit": 50}).json()["logs"]
    assert {"freezeBudget", "unfreezeBudget"} <= {row["operation"] for row in logs if row["resource_type"] == "budget"}

    # spend something so RESET_SPENT and REPAY_DEBT have something to act on
    with_key(gamma)
    with gamma.client() as c:
        rid = c.post("/v1/reservations", json=reserve_body(gamma, 1000)).json()["reservation_id"]
        assert c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "k1", "actual": {"unit": USD, "amount": 800}}).status_code == 200

    def fund(op: str, value: int, spent: int | None = None) -> None:
        page.get_by_role("button", name=f"Fund {root}", exact=True).click()
        dlg = page.get_by_role("dialog")
        dlg.get_by_label("Operation").select_option(op)
        dlg.get_by_label("Amount").fill(str(value))
        if spent is not None:
            dlg.get_by_label("Spent after RESET_SPENT").fill(str(spent))
        dialog_button(work_tab, "Apply")
        page.get_by_role("dialog").wait_for(state="detached")

    before = budget(server, tid, root)
    fund("CREDIT", 5000)
    assert amount(budget(server, tid, root), "allocated") == amount(before, "allocated") + 5000
    fund("DEBIT", 2000)
    assert amount(budget(server, tid, root), "allocated") == amount(before, "allocated") + 3000
    fund("RESET", 750_000)
    assert amount(budget(server, tid, root), "allocated") == 750_000
    fund("RESET_SPENT", 800_000, spent=100)
    after = budget(server, tid, root)
    assert amount(after, "allocated") == 800_000 and amount(after, "spent") == 100
    # debt: a commit past the allocation of an overdraft budget leaves it owing
    ops = f"tenant:{tid}/workspace:ops"
    gamma.budget("workspace:ops", 1000, overdraft_limit=10_000, commit_overage_policy="ALLOW_WITH_OVERDRAFT")
    with gamma.client() as tc:
        rid = tc.post("/v1/reservations", json=reserve_body(gamma, 500, subject=gamma.subject(workspace="ops"))).json()["reservation_id"]
        r = tc.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "k2", "actual": {"unit": USD, "amount": 3000}})
        assert r.status_code == 200, r.text
    debt = amount(budget(server, tid, ops), "debt")
    assert debt == 2000
    work_tab.go(f"budgets?tenant_id={tid}&has_debt=1")
    page.get_by_role("button", name=f"Fund {ops}", exact=True).wait_for()
    root = ops  # fund() acts on `root`
    fund("REPAY_DEBT", 500)
    assert amount(budget(server, tid, ops), "debt") == 1500


def test_create_budget_with_the_scope_builder_and_bulk_fund_with_preview(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    work_tab.go(f"budgets?tenant_id={tid}")
    page.locator("#create-budget").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Tenant", exact=True).fill(tid)
    dlg.get_by_label("Workspace (optional)").fill("eng")
    dlg.get_by_label("Agent (optional)").fill("planner")
    assert dlg.locator("#scope-preview").inner_text() == f"tenant:{tid}/workspace:eng/agent:planner"
    dlg.get_by_label("Unit", exact=True).select_option("TOKENS")
    dlg.get_by_label("Allocated").fill("123456")
    dialog_button(work_tab, "Create budget")
    created = eventually(lambda: budget(server, tid, f"tenant:{tid}/workspace:eng/agent:planner", "TOKENS"))
    assert amount(created, "allocated") == 123456
    page.get_by_text(f"tenant:{tid}/workspace:eng/agent:planner").first.wait_for()

    work_tab.go(f"budgets?tenant_id={tid}&unit=USD_MICROCENTS")
    page.locator("#bulk-fund").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_text("Preview: 2 budget(s) match").wait_for()
    dlg.get_by_label("Amount (integer)").fill("100")
    before = {s: amount(budget(server, tid, s), "allocated") for s in (f"tenant:{tid}", f"tenant:{tid}/workspace:eng")}
    dialog_button(work_tab, "Apply to 2 budgets")
    page.get_by_role("dialog").wait_for(state="detached")
    for scope, was in before.items():
        assert amount(budget(server, tid, scope), "allocated") == was + 100


def tenant_status(server: Server, tid: str) -> str:
    with server.admin() as c:
        return c.get(f"/v1/admin/tenants/{tid}").json()["status"]


def test_suspend_reactivate_bulk_and_emergency_freeze(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    other = new_tenant(server, tenant_id=f"h-{uuid.uuid4().hex[:8]}")
    work_tab.go(f"tenants?search={tid}")
    page.get_by_role("button", name=f"Suspend {tid}", exact=True).click()
    dialog_button(work_tab, "Suspend tenant")
    eventually(lambda: tenant_status(server, tid) == "SUSPENDED")
    page.get_by_role("button", name=f"Reactivate {tid}", exact=True).click()
    dialog_button(work_tab, "Reactivate tenant")
    eventually(lambda: tenant_status(server, tid) == "ACTIVE")
    # bulk: select two tenants
    work_tab.go("tenants")
    for t in (tid, other.tenant_id):
        page.locator(".vt-row", has_text=t).get_by_label("Select row").check()
    page.locator("#bulk-suspend").click()
    dialog_button(work_tab, "Suspend 2")
    eventually(lambda: tenant_status(server, tid) == tenant_status(server, other.tenant_id) == "SUSPENDED")
    work_tab.go("tenants?status=SUSPENDED")
    for t in (tid, other.tenant_id):
        page.locator(".vt-row", has_text=t).get_by_label("Select row").check()
    page.locator("#bulk-reactivate").click()
    dialog_button(work_tab, "Reactivate 2")
    eventually(lambda: tenant_status(server, tid) == "ACTIVE")
    # emergency freeze from the tenant page: every ACTIVE budget of the tenant
    work_tab.go(f"tenant/{tid}")
    page.locator("#emergency-freeze").click()
    dialog_button(work_tab, "Freeze 2 budgets")
    eventually(lambda: {budget(server, tid, s)["status"] for s in (f"tenant:{tid}", f"tenant:{tid}/workspace:eng")} == {"FROZEN"})


def test_create_key_shows_the_secret_once_and_revoke_keeps_it_listed(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    work_tab.go(f"keys?tenant_id={tid}")
    page.locator("#create-key").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Tenant").fill(tid)
    dlg.get_by_label("Name").fill("work-made")
    dlg.get_by_label("events:read").check()
    dialog_button(work_tab, "Create key")
    secret = page.locator("#new-secret").input_value()
    assert secret.startswith("cyc_live_")
    who = httpx.get(server.base_url + "/v1/auth/introspect", headers={"X-Cycles-API-Key": secret}).json()
    assert who["tenant_id"] == tid and "events:read" in who["permissions"]
    dialog_button(work_tab, "I have stored it")
    assert page.locator("#new-secret").count() == 0  # gone from the page
    with server.admin() as c:
        key = next(k for k in c.get("/v1/admin/api-keys", params={"tenant_id": tid}).json()["keys"] if k["name"] == "work-made")
    page.get_by_role("button", name=f"Edit {key['key_id']}", exact=True).click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("events:read").uncheck()
    dlg.get_by_label("Scope filter").fill("workspace:eng")
    dialog_button(work_tab, "Save key")
    who = eventually(lambda: (w := httpx.get(server.base_url + "/v1/auth/introspect",
                                              headers={"X-Cycles-API-Key": secret}).json())["permissions"] != who["permissions"] and w)
    assert "events:read" not in who["permissions"] and who["scope_filter"] == ["workspace:eng"]
    page.get_by_role("button", name=f"Revoke {key['key_id']}", exact=True).click()
    dialog_button(work_tab, "Revoke key")
    eventually(lambda: httpx.get(server.base_url + "/v1/auth/introspect", headers={"X-Cycles-API-Key": secret}).status_code == 401)
    row = page.locator(".vt-row", has_text=key["key_id"])
    row.get_by_text("REVOKED").wait_for()  # revoked keys stay in the list


def webhook_status(server: Server, sid: str) -> int | str:
    with server.admin() as c:
        r = c.get(f"/v1/admin/webhooks/{sid}")
    return r.json()["status"] if r.status_code == 200 else r.status_code


def test_webhook_create_pause_resume_test_delete(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    work_tab.go(f"webhooks?tenant_id={tid}")
    page.locator("#create-webhook").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Tenant").fill(tid)
    dlg.get_by_label("URL").fill(work.receiver_url)
    dlg.get_by_label("Name").fill("work-hook")
    dlg.get_by_label("Event types").fill("budget.frozen")
    dialog_button(work_tab, "Create webhook")
    assert page.locator("#new-secret").input_value()  # the signing secret, shown once
    dialog_button(work_tab, "I have stored it")
    with server.admin() as c:
        sid = c.get("/v1/admin/webhooks", params={"tenant_id": tid}).json()["subscriptions"][0]["subscription_id"]
    page.get_by_role("button", name=f"Pause {sid}", exact=True).click()
    eventually(lambda: webhook_status(server, sid) == "PAUSED")
    page.get_by_role("button", name=f"Resume {sid}", exact=True).click()
    eventually(lambda: webhook_status(server, sid) == "ACTIVE")
    seen = len(_Receiver.received)
    page.get_by_role("button", name=f"Test {sid}", exact=True).click()
    eventually(lambda: any(b"webhook_test" in body for body in _Receiver.received[seen:]))
    page.get_by_text("Test delivered").wait_for()
    # replay: a frozen budget's event is delivered live, then once more by a replay of the last hour
    with server.admin() as c:
        c.post("/v1/admin/budgets/freeze", params={"scope": f"tenant:{tid}", "unit": USD}, json={})
    frozen = lambda: sum(b"budget.frozen" in body and tid.encode() in body for body in _Receiver.received)  # noqa: E731
    eventually(lambda: frozen() == 1, timeout=15)
    work_tab.go(f"webhook/{sid}")
    page.get_by_role("button", name="Replay…").click()
    dialog_button(work_tab, "Replay")
    page.get_by_text("Replay queued 1 event(s)").wait_for()
    eventually(lambda: frozen() == 2, timeout=15)
    page.get_by_role("button", name=f"Delete {sid}", exact=True).click()
    dialog_button(work_tab, "Delete webhook")
    eventually(lambda: webhook_status(server, sid) == 404)
    page.wait_for_function("() => location.hash === '#/webhooks'")  # back on the list


def test_force_release_and_policy_create(work_tab: Tab, work: Work, gamma: Tenant) -> None:
    page, server, tid = work_tab.page, work.server, gamma.tenant_id
    with with_key(gamma).client() as c:
        rid = c.post("/v1/reservations", json=reserve_body(gamma, 4321, ttl_ms=600_000)).json()["reservation_id"]
    work_tab.go(f"reservations?tenant={tid}&status=ACTIVE")
    page.get_by_role("button", name=f"Force-release {rid}", exact=True).click()
    dialog_button(work_tab, "Release reservation")
    with gamma.client() as c:
        eventually(lambda: c.get(f"/v1/reservations/{rid}").json()["status"] == "RELEASED")
    assert amount(budget(server, tid, f"tenant:{tid}"), "reserved") == 0
    work_tab.go(f"tenant/{tid}?tab=policies")
    page.get_by_role("button", name="Create policy").click()
    dlg = page.get_by_role("dialog")
    dlg.get_by_label("Name").fill("per-agent")
    dlg.get_by_label("Scope pattern").fill("agent:*")
    dlg.get_by_label("Reservations per minute").fill("120")
    dialog_button(work_tab, "Create policy")
    with server.admin() as c:
        pol = eventually(lambda: [p for p in c.get("/v1/admin/policies", params={"tenant_id": tid}).json()["policies"]
                                  if p["name"] == "per-agent"])
    assert pol[0]["rate_limits"]["max_reservations_per_minute"] == 120
