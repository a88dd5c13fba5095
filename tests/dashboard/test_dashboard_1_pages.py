"""The dashboard in real Chromium: it is served offline with a strict CSP, the login (operator key,
tenant key, wrong key with backoff), session limits, and every page rendering the seeded data in
light and dark mode without a console error (the screenshots in docs/dashboard/ come from here).

These tests only read the seeded server; the tests that change things use a server of their own
(conftest `work`), so what is shown here is the seeded data whatever order pytest-xdist picks."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx

from support import ADMIN_KEY, cycles_bin, free_port
from .conftest import Data, Tab

STATIC = Path(__file__).resolve().parents[2] / "src" / "cycles" / "dashboard" / "static"


def test_served_offline_with_a_strict_csp_and_turned_off_by_the_flag(dash: Data, tmp_path: Path) -> None:
    r = httpx.get(dash.server.base_url + "/dashboard")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script: only <script type=module src=...>
    js = httpx.get(dash.server.base_url + "/dashboard/static/js/main.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["content-security-policy"] == csp
    # every asset is in the package, and none names another origin
    for f in STATIC.rglob("*"):
        if f.suffix in (".js", ".css", ".html"):
            text = f.read_text()
            assert not re.search(r"(src|href|url)\s*[=(]\s*['\"]?(https?:)?//", text), f
            assert "fetch('http" not in text and "import('http" not in text, f
    port = free_port()
    proc = subprocess.Popen([cycles_bin(), "serve", "--port", str(port), "--store", f"sqlite:///{tmp_path}/off.db",
                             "--no-dashboard", "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "CYCLES_ADMIN_API_KEY": ADMIN_KEY,
                                                           "CYCLES_WEBHOOK_SECRET_KEY": "dGVzdC13ZWJob29rLXNlY3JldC1rZXktMzItYnl0ZXM="})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/actuator/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the --no-dashboard server did not start"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/dashboard").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/dashboard/static/js/main.js").status_code == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_key_is_refused_and_backs_off_then_the_operator_key_signs_in(tab: Tab, dash: Data) -> None:
    tab.open()
    page = tab.page
    field = page.get_by_label("API key")
    field.fill("not-a-real-key-123456789")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("That key was not accepted.").wait_for()
    assert page.locator("form.login-card button[type=submit]").is_disabled()  # backoff before the next try
    assert "Wait" in page.locator("form.login-card button[type=submit]").inner_text()
    tab.errors[:] = [e for e in tab.errors if "401" not in e]  # the refused introspection is expected
    page.wait_for_function("() => !document.querySelector('form.login-card button[type=submit]').disabled", timeout=5000)
    field.fill(ADMIN_KEY)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#headline")
    nav = page.locator("nav a").all_inner_texts()
    assert {"Overview", "Tenants", "Budgets", "Reservations", "Events", "API keys", "Webhooks", "Audit", "Spend"} <= set(nav)
    # the key: in this tab's sessionStorage only; never in the URL, localStorage or the server's log
    assert page.evaluate("() => localStorage.length") == 0
    assert page.evaluate("() => sessionStorage.getItem('cycles.key')") == ADMIN_KEY
    assert ADMIN_KEY not in page.url
    assert not tab.ctx.cookies()
    assert ADMIN_KEY not in dash.server.log()


def test_tenant_key_sees_its_own_tenant_only(tab: Tab, dash: Data) -> None:
    tab.login(dash.acme.key)
    page = tab.page
    nav = set(page.locator("nav a").all_inner_texts())
    assert {"Budgets", "Reservations", "Events", "Spend", "Webhooks"} <= nav
    assert not nav & {"Overview", "Tenants", "API keys", "Audit"}  # capability flags gate the navigation
    tab.go("budgets")
    page.get_by_text("tenant:acme-corp/workspace:eng", exact=True).wait_for()
    assert page.get_by_text("beta-labs").count() == 0
    assert page.locator("#flt-tenant_id").count() == 0
    assert page.get_by_role("button", name=re.compile("^Freeze ")).count() == 0  # operator-only action
    tab.go("reservations")
    page.get_by_text(dash.open_reservation).wait_for()
    tab.go("tenants")  # not allowed: lands on the first page it may see
    page.wait_for_function("() => document.title.startsWith('Spend')")


def test_idle_and_absolute_session_limits_sign_out(tab: Tab) -> None:
    tab.login(ADMIN_KEY)
    page = tab.page
    page.evaluate("() => sessionStorage.setItem('cycles.active', String(Date.now() - 31 * 60 * 1000))")
    tab.go("budgets")
    page.get_by_text("Signed out after 30 minutes without activity.").wait_for()
    assert page.evaluate("() => sessionStorage.getItem('cycles.key')") is None
    tab.login(ADMIN_KEY)
    page.evaluate("() => sessionStorage.setItem('cycles.started', String(Date.now() - 8 * 3600 * 1000 - 1000))")
    tab.go("events")
    page.get_by_text("Signed out: sessions last at most 8 hours.").wait_for()


PAGES = [  # (route, text that only appears once the page shows the seeded data, screenshot name)
    ("overview", "Needs attention:", "overview"),
    ("spend?tenant=acme-corp&scope=tenant:acme-corp&unit=USD_MICROCENTS", "By action name", "spend"),
    ("tenants", "beta-labs", "tenants"),
    ("tenant/acme-corp?tab=budgets", "tenant:acme-corp/workspace:ops", "tenant-detail"),
    ("tenant/acme-corp?tab=policies", "agent-rate", "tenant-policies"),
    ("budgets", "tenant:beta-labs/workspace:research", "budgets"),
    ("hierarchy?tenant=acme-corp", "agent:planner", "hierarchy"),
    ("reservations?tenant=acme-corp", "llm.completion/claude-y", "reservations"),
    ("events", "budget.created", "events"),
    ("denials?tenant=acme-corp", "BUDGET_EXCEEDED", "denials"),
    ("keys", "beta-labs", "api-keys"),
    ("webhooks", "WEBHOOK", "webhooks"),
    ("webhook/WEBHOOK", "Delivery outcomes", "webhook-detail"),
    ("audit", "createWebhookSubscription", "audit"),
    ("governance?tenant=acme-corp", "reservation(s) would have been denied", "governance"),
    ("governance?tenant=beta-labs", "3 reservation(s) would have been denied", "governance-observe"),
    ("evidence/EVIDENCE", "Authentic:", "evidence"),
]


def test_every_page_renders_its_data_in_light_and_dark(tab: Tab, dash: Data, shots: Path) -> None:
    tab.login(ADMIN_KEY)
    page = tab.page
    page.screenshot(path=str(shots / "overview-light.png"))
    for theme in ("light", "dark"):
        if theme == "dark":
            page.locator("#theme-toggle").click()
            assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
        for route, text, name in PAGES:
            route = route.replace("WEBHOOK", dash.webhook).replace("EVIDENCE", dash.evidence_id)
            text = text.replace("WEBHOOK", dash.webhook)
            tab.go(route)
            page.get_by_text(text).first.wait_for()
            page.wait_for_function("() => !document.querySelector('#view .load-state') || "
                                   "!document.querySelector('#view .load-state').textContent.startsWith('Loading')")
            page.screenshot(path=str(shots / f"{name}-{theme}.png"))
    tab.page.context.clear_cookies()
    page.evaluate("() => sessionStorage.clear()")
    tab.open()
    page.get_by_label("API key").wait_for()
    page.screenshot(path=str(shots / "login-light.png"))


def test_keyboard_command_palette_and_filters_in_the_url(admin_tab: Tab) -> None:
    page = admin_tab.page
    page.keyboard.press("Control+k")
    page.locator("#palette-input").fill("budgets frozen")
    page.keyboard.press("Enter")
    page.wait_for_function("() => location.hash.includes('status=FROZEN')")
    assert page.locator("#flt-status").input_value() == "FROZEN"
    page.locator("#flt-status").select_option("ACTIVE")
    page.wait_for_function("() => location.hash.includes('status=ACTIVE')")
    page.reload()  # the filters come back from the URL
    page.wait_for_selector("#flt-status")
    assert page.locator("#flt-status").input_value() == "ACTIVE"
    page.get_by_label("Show closed").check()
    page.wait_for_function("() => location.hash.includes('show_closed=1')")


def test_export_csv_and_json_of_what_is_shown(admin_tab: Tab) -> None:
    page = admin_tab.page
    admin_tab.go("budgets?tenant_id=acme-corp")
    page.get_by_text("tenant:acme-corp/workspace:ops").wait_for()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export CSV").click()
    lines = Path(dl.value.path()).read_text().splitlines()
    assert lines[0].startswith("Scope,Unit,Status,Allocated")
    assert any(line.startswith("tenant:acme-corp/workspace:ops,USD_MICROCENTS,ACTIVE,100000,") for line in lines)
    assert len(lines) == 1 + 4  # acme-corp's four budgets
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export JSON").click()
    rows = __import__("json").loads(Path(dl.value.path()).read_text())
    assert {r["scope"] for r in rows} >= {"tenant:acme-corp", "tenant:acme-corp/workspace:eng/agent:planner"}


def test_mobile_layout(browser, dash: Data, shots: Path) -> None:  # noqa: ANN001
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(dash.server.base_url + "/dashboard#/budgets")
        page.get_by_label("API key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("tenant:acme-corp/workspace:eng", exact=True).wait_for()
        assert not page.locator("aside.side").is_visible()  # the menu folds away
        page.get_by_role("button", name="Show or hide the menu").click()
        assert page.locator("aside.side").is_visible()
        page.screenshot(path=str(shots / "mobile-menu-light.png"))
        page.get_by_role("link", name="Overview").click()
        page.locator("#headline").wait_for()
        assert not page.locator("aside.side").is_visible()
        page.screenshot(path=str(shots / "mobile-overview-light.png"))
    finally:
        ctx.close()
    assert not errors


def test_read_only_operator_sees_everything_and_no_action(tab: Tab, dash: Data) -> None:
    with dash.server.admin() as c:
        r = c.post("/v1/admin/operator-keys", json={"name": "dash-viewer", "permissions": ["admin:read"]})
        assert r.status_code == 201, r.text
    tab.login(r.json()["key_secret"])
    page = tab.page
    assert {"Overview", "Tenants", "Budgets", "API keys", "Audit"} <= set(page.locator("nav a").all_inner_texts())
    tab.go("budgets?tenant_id=acme-corp")
    page.get_by_text("tenant:acme-corp/workspace:ops").wait_for()
    assert page.locator("#create-budget, #bulk-fund").count() == 0
    assert page.get_by_role("button", name=re.compile(r"^(Freeze|Fund) ")).count() == 0
    tab.go("tenants")
    page.get_by_role("link", name="beta-labs").wait_for()
    assert page.get_by_role("button", name=re.compile(r"^(Suspend|Emergency freeze) ")).count() == 0


def test_a_slow_page_never_overwrites_the_page_that_replaced_it(admin_tab: Tab) -> None:
    """The overview's data is held back while the operator moves on to Tenants; when it arrives, the
    overview renders into its own slot, gone from the document, and Tenants stays."""
    page = admin_tab.page
    held: list = []
    page.route("**/v1/admin/overview*", lambda route: held.append(route))
    admin_tab.go("budgets")  # (signing in showed the overview already)
    page.locator("#view h1", has_text="Budgets").wait_for()
    admin_tab.go("overview")
    deadline = time.monotonic() + 20
    while not held:  # the route handler runs while Playwright waits
        assert time.monotonic() < deadline, "the overview never asked for its data"
        page.wait_for_timeout(50)
    admin_tab.go("tenants")
    page.locator("#view h1", has_text="Tenants").wait_for()
    for route in held:
        route.continue_()
    page.wait_for_timeout(1500)  # the overview's other requests and its render, had it a place to write
    assert page.locator("#view h1").all_inner_texts() == ["Tenants"]
    assert "tenants" in page.evaluate("location.hash")
