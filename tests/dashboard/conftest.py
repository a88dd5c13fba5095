"""One real `cycles serve` (SQLite) with real data and one real Chromium (Debian's /usr/bin/chromium,
driven by Playwright; never a downloaded browser) shared by every dashboard test."""

from __future__ import annotations

import http.server
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import ADMIN_KEY, USD, Server, Tenant, new_tenant, reserve_body, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIDENCE = {"CYCLES_EVIDENCE": "1"}  # signed envelopes, for the evidence viewer
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); the dashboard browser tests need it",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        _Receiver.received.append(body)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def receiver() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.shutdown()


def commit(t: Tenant, amount: int, actual: int, model: str = "gpt-x", **subject: str) -> dict[str, Any]:
    with t.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(t, amount, subject=t.subject(**subject),
                                                         action={"kind": "llm.completion", "name": model}))
        assert r.status_code == 200, r.text
        rid = r.json()["reservation_id"]
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": uuid.uuid4().hex,
                                                           "actual": {"unit": USD, "amount": actual}})
        assert r.status_code == 200, r.text
        return r.json()


class Data:
    """What the seeded server holds (names the tests look for)."""

    def __init__(self, server: Server, receiver_url: str) -> None:
        self.server = server
        self.acme = new_tenant(server, tenant_id="acme-corp", permissions=[
            "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
            "reservations:list", "balances:read", "budgets:read", "budgets:write", "events:read", "webhooks:read",
            "webhooks:write", "policies:read"])
        self.beta = new_tenant(server, tenant_id="beta-labs")
        a, b = self.acme, self.beta
        a.budget("", 10_000_000)
        a.budget("workspace:eng", 2_000_000)
        a.budget("workspace:eng/agent:planner", 500_000)
        a.budget("workspace:ops", 100_000, overdraft_limit=50_000, commit_overage_policy="ALLOW_WITH_OVERDRAFT")
        b.budget("", 1_000_000)
        b.budget("workspace:research", 300_000)
        for i in range(6):
            commit(a, 50_000, 40_000 + i * 1000, model="gpt-x" if i % 3 else "claude-y", workspace="eng",
                   agent="planner" if i % 2 else "writer")
        commit(a, 90_000, 130_000, workspace="ops", agent="oncall")  # overage into debt (overdraft)
        commit(b, 10_000, 9_000, workspace="research", agent="scout")
        with a.client() as c:  # a denial: more than the planner budget holds
            r = c.post("/v1/reservations", json=reserve_body(a, 5_000_000, subject=a.subject(workspace="eng", agent="planner")))
            assert r.json().get("decision") == "DENY" or r.status_code == 409, r.text
            r = c.post("/v1/reservations", json=reserve_body(a, 1_000, subject=a.subject(workspace="eng", agent="planner"),
                                                             ttl_ms=3_600_000))
            self.open_reservation = r.json()["reservation_id"]
        with server.admin() as c:
            assert c.put("/v1/admin/config/webhook-security", json={"blocked_cidr_ranges": [], "allowed_url_patterns": [],
                                                                    "allow_http": True}).status_code == 200
            r = c.post("/v1/admin/webhooks", params={"tenant_id": "acme-corp"},
                       json={"url": receiver_url, "event_types": ["budget.frozen", "budget.funded"], "name": "ops-hook"})
            assert r.status_code == 201, r.text
            self.webhook = r.json()["subscription"]["subscription_id"]
            for path in ("freeze", "unfreeze"):  # a budget.frozen event for the webhook to deliver
                assert c.post(f"/v1/admin/budgets/{path}", params={"scope": "tenant:acme-corp/workspace:eng", "unit": USD},
                              json={"reason": "seed"}).status_code == 200
            deadline = time.monotonic() + 15
            while not c.get(f"/v1/admin/webhooks/{self.webhook}/deliveries").json()["deliveries"]:
                assert time.monotonic() < deadline, "the seeded webhook delivery did not happen"
                time.sleep(0.1)
            r = c.post("/v1/admin/policies", json={"tenant_id": "acme-corp", "name": "agent-rate", "scope_pattern": "agent:*",
                                                   "rate_limits": {"max_reservations_per_minute": 600}})
            assert r.status_code == 201, r.text
            # action governance: quotas on acme's eng agents (counted by two emails below; per_run, so a
            # session that crosses an hour or midnight still finds them); beta in observe
            # mode with shell commands denied, so its would-be denials are recorded and nothing refused
            r = c.post("/v1/admin/policies", json={
                "tenant_id": "acme-corp", "name": "outbound-quotas", "scope_pattern": "tenant:acme-corp/workspace:eng/agent:*",
                "priority": 5, "action_quotas": [{"action_kind": "message.email.send", "max_calls": 20, "window": "per_run"}],
                "risk_class_quotas": [{"risk_class": "external_side_effect", "max_calls": 50, "window": "per_run"}]})
            assert r.status_code == 201, r.text
            r = c.post("/v1/admin/policies", json={"tenant_id": "beta-labs", "name": "no-exec", "scope_pattern": "tenant:beta-labs",
                                                   "denied_action_kinds": ["code.exec"]})
            assert r.status_code == 201, r.text
            assert c.patch("/v1/admin/tenants/beta-labs", json={"observe_mode": "OBSERVE"}).status_code == 200
        with a.client() as c:
            for _ in range(2):
                r = c.post("/v1/reservations", json=reserve_body(a, 100, subject={**a.subject(workspace="eng", agent="mailer"),
                                                                                "dimensions": {"run_id": "seed-run"}},
                                                                 action={"kind": "message.email.send", "name": "smtp"}))
                assert r.status_code == 200, r.text
                rid = r.json()["reservation_id"]
                r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": uuid.uuid4().hex,
                                                                   "actual": {"unit": USD, "amount": 90}})
                assert r.status_code == 200, r.text
            self.evidence_id = r.json()["cycles_evidence"]["evidence_id"]  # the last commit's envelope
        with b.client() as c:
            for agent in ("scout", "scout", "coder"):
                r = c.post("/v1/reservations", json=reserve_body(b, 500, subject=b.subject(workspace="research", agent=agent),
                                                                 action={"kind": "code.exec", "name": "bash"}))
                assert r.status_code == 200 and r.json()["decision"] == "DENY", r.text
        self.receiver_url = receiver_url


@pytest.fixture(scope="session")
def dash(tmp_path_factory: pytest.TempPathFactory, receiver: str) -> Iterator[Data]:
    tmp = tmp_path_factory.mktemp("dashboard")
    server = start_server(f"sqlite:///{tmp}/cycles.db", tmp, sweep_interval_ms=200, extra_env=EVIDENCE)
    try:
        yield Data(server, receiver)
    finally:
        server.stop()


class Work:
    """A second server for the tests that change things (actions, 1,000 budgets), so the seeded one the
    page tests screenshot stays as seeded whatever order the tests run in (pytest-xdist spreads them)."""

    def __init__(self, server: Server, receiver_url: str) -> None:
        self.server = server
        self.receiver_url = receiver_url
        with server.admin() as c:
            assert c.put("/v1/admin/config/webhook-security", json={"blocked_cidr_ranges": [], "allowed_url_patterns": [],
                                                                    "allow_http": True}).status_code == 200


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory, receiver: str) -> Iterator[Work]:
    tmp = tmp_path_factory.mktemp("dashboard-work")
    server = start_server(f"sqlite:///{tmp}/cycles.db", tmp, sweep_interval_ms=200, extra_env=EVIDENCE)
    try:
        yield Work(server, receiver)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: docs/dashboard/ with CYCLES_UPDATE_SCREENSHOTS=1 (to refresh the ones
    docs/dashboard.md shows), else a temporary directory, so a test run leaves the checkout clean."""
    if os.environ.get("CYCLES_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SHOTS
    return tmp_path_factory.mktemp("screenshots")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Playwright's sync API keeps an event loop running in the test thread while it is started, so no
    # other test's asyncio.run() can work beside it: the browser tests run together on one pytest-xdist
    # worker (--dist loadgroup) and the browser is stopped once the package's last test is done.
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.xdist_group("browser"))


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Tab:
    """A fresh browser context (its own sessionStorage) that records console errors and page errors."""

    def __init__(self, browser: Any, server: Server, *, dark: bool = False) -> None:
        self.ctx = browser.new_context(viewport={"width": 1360, "height": 860}, accept_downloads=True,
                                       color_scheme="dark" if dark else "light")
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(20_000)  # generous: CI shares 2 cores with other work
        self.base = server.base_url
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, route: str = "") -> None:
        self.page.goto(f"{self.base}/dashboard{'#/' + route if route else ''}")

    def login(self, key: str) -> None:
        self.open()
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_selector("nav a")

    def go(self, route: str) -> None:
        self.page.evaluate("r => { location.hash = r }", f"#/{route}")

    def close(self) -> None:
        self.ctx.close()


def _tab(browser: Any, server: Server) -> Iterator[Tab]:
    t = Tab(browser, server)
    yield t
    errors = list(t.errors)
    t.close()
    assert not errors, f"console errors: {errors}"


@pytest.fixture
def tab(browser: Any, dash: Data) -> Iterator[Tab]:
    yield from _tab(browser, dash.server)


@pytest.fixture
def admin_tab(tab: Tab) -> Tab:
    tab.login(ADMIN_KEY)
    return tab


@pytest.fixture
def work_tab(browser: Any, work: Work) -> Iterator[Tab]:
    """An operator's tab on the `work` server."""
    for t in _tab(browser, work.server):
        t.login(ADMIN_KEY)
        yield t
