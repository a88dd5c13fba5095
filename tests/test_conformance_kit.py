"""`cycles conformance`: the kit passes against our server on every store, and fails, naming the right
requirement, against servers that break exactly one behaviour. A broken server is a small ASGI proxy in front
of the real session server that rewrites one thing (the real server does all the rest)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cycles.conformance import kit
from support import Server, cycles_bin, free_port

HOOK = "https://1.1.1.1/cycles-conformance"  # a public address literal: passes the URL policy, no DNS needed

Break = Callable[["Proxy", Request, bytes, httpx.Response], Awaitable[httpx.Response | Response]]


class Proxy:
    """Forwards every request to `target`; `on_request` may rewrite the request body, `on_response` the answer."""

    def __init__(self, target: str, on_response: Break | None = None,
                 on_request: Callable[[Request, dict[str, str], bytes], tuple[dict[str, str], bytes]] | None = None):
        self.target = target
        self.on_response = on_response
        self.on_request = on_request
        self.subjects: dict[str, dict[str, Any]] = {}  # reservation id -> the reserve request's body
        self.keys: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/{path:path}", self.handle,
                                      methods=["GET", "POST", "PATCH", "PUT", "DELETE"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Proxy":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def send(self, method: str, path: str, headers: dict[str, str], body: bytes,
                   params: Any = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as c:
            return await c.request(method, path, headers=headers, content=body, params=params)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        if "x-cycles-api-key" in headers:
            self.keys.append(headers["x-cycles-api-key"])
        if self.on_request:
            headers, body = self.on_request(request, headers, body)
        resp = await self.send(request.method, request.url.path, headers, body, request.query_params)
        if request.method == "POST" and request.url.path == "/v1/reservations" and resp.status_code == 200:
            rid = resp.json().get("reservation_id")
            if rid:
                self.subjects[rid] = json.loads(body)
        if self.on_response:
            out = await self.on_response(self, request, body, resp)
            if isinstance(out, Response):
                return out
            resp = out
        hop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        return Response(resp.content, resp.status_code, {k: v for k, v in resp.headers.items() if k.lower() not in hop})


def _json(resp: httpx.Response, status: int, body: Any) -> Response:
    headers = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-")}
    return Response(json.dumps(body).encode(), status, headers, media_type="application/json")


def run_kit(url: str, server: Server, only: list[str]) -> dict[str, Any]:
    return kit.run(url, None, server.admin_key, None, only=only, concurrency=8, webhook_url=HOOK)


def row(report: dict[str, Any], fragment: str) -> dict[str, Any]:
    [found] = [r for r in report["requirements"] if fragment in r["id"]]
    return found


def failed(report: dict[str, Any]) -> list[str]:
    return [r["id"] for r in report["requirements"] if r["status"] == "fail" and r["level"] == "MUST"]


# ------------------------------------------------------------------------------------- our server


def test_kit_passes_against_our_server(server: Server, tmp_path) -> None:
    out = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run([cycles_bin(), "conformance", "run", server.base_url, "--admin-key", server.admin_key,
                           "--json", str(out), "--webhook-url", HOOK, "--concurrency", "12"],
                          capture_output=True, text=True, timeout=180)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert kit.report_errors(report) == []
    assert report["summary"]["conformant"] and report["summary"]["must"]["fail"] == 0
    assert "CONFORMANT" in proc.stdout
    musts = [r for r in report["requirements"] if r["level"] == "MUST"]
    assert len(musts) >= 35 and all(r["status"] in ("pass", "not_applicable") for r in musts)
    # measured, not assumed: the invariants passed with evidence of what was measured
    assert "concurrent clients" in row(report, "Concurrency-safe enforcement")["detail"]
    assert "byte-identical" in row(report, "Idempotent commit and release")["detail"]
    assert int(row(report, "shared Amount, Subject, Balance")["detail"].split()[0]) > 50
    # v0.1.26 surfaces are reported, never counted against the run
    assert row(report, "listActionKinds")["level"] == "SHOULD"
    assert time.monotonic() - started < 60


def test_tenant_key_only_runs_what_it_can_and_says_what_it_skipped(server: Server, store_kind: str, tenant) -> None:
    if store_kind != "sqlite":
        pytest.skip("the tenant-key-only mode does not depend on the store")
    tenant.budget(amount=1_000_000)
    report = kit.run(server.base_url, tenant.key, None, tenant.tenant_id, only=["operations", "idempotency", "errors",
                                                                              "correlation", "atomic"])
    assert not failed(report), failed(report)
    assert row(report, "Idempotent commit and release")["status"] == "pass"
    assert row(report, "Atomic reservation")["status"] == "could_not_test"
    assert row(report, "BUDGET_EXCEEDED")["status"] == "could_not_test"
    assert any("admin-key" in s for s in report["skipped"])
    assert not report["summary"]["conformant"]  # incomplete is not conformant
    assert row(report, "listEvents")["status"] == "not_run"


def test_cli_refuses_bad_usage_in_one_line(server: Server, store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("usage errors do not depend on the store")
    from typer.testing import CliRunner

    from cycles.cli import app

    runner = CliRunner()
    for args, code, text in ((["run", server.base_url], 2, "--api-key"),
                             (["run", f"http://127.0.0.1:{free_port()}", "--api-key", "k"], 5, "cannot reach"),
                             (["run", server.base_url, "--api-key", "k", "--only", "nope"], 2, "unknown group"),
                             (["run", server.base_url, "--api-key", "k", "--json", "/nonexistent/dir/r.json"], 2,
                              "not writable"),
                             (["sdk", "--report-json", "/nonexistent/dir/r.json"], 2, "not writable")):
        res = runner.invoke(app, ["conformance", *args])
        assert res.exit_code == code and text in res.output and "Traceback" not in res.output, res.output


# ---------------------------------------------------------------------------------- broken servers


async def charge_replays_twice(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    """A replayed commit answers the stored response but charges the actual again (as a direct event)."""
    path = request.url.path
    if path.endswith("/commit") and resp.status_code == 200:
        sent = json.loads(body)
        seen = getattr(proxy, "seen_commit_keys", set())
        if sent["idempotency_key"] in seen:
            rid = path.split("/")[3]
            res = proxy.subjects[rid]
            await proxy.send("POST", "/v1/events", {"x-cycles-api-key": request.headers["x-cycles-api-key"],
                                                    "content-type": "application/json"},
                             json.dumps({"idempotency_key": uuid.uuid4().hex, "subject": res["subject"],
                                         "action": res["action"], "actual": sent["actual"]}).encode())
        seen.add(sent["idempotency_key"])
        proxy.seen_commit_keys = seen
    return resp


async def allow_every_reserve(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    """Concurrent reserves over budget are all allowed (an unlocked read-check-write race)."""
    if request.url.path == "/v1/reservations" and resp.status_code == 409 and resp.json()["error"] == "BUDGET_EXCEEDED":
        sent = json.loads(body)
        return _json(resp, 200, {"decision": "ALLOW", "reservation_id": f"rsv_{uuid.uuid4().hex}",
                                 "affected_scopes": ["tenant:" + sent["subject"]["tenant"]],
                                 "reserved": sent["estimate"], "expires_at_ms": int(time.time() * 1000) + 60_000})
    return resp


async def ok_for_unknown(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if resp.status_code == 404 and request.url.path.startswith("/v1/reservations/"):
        return _json(resp, 200, {"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": 1}})
    return resp


async def drop_request_id(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    del resp.headers["x-request-id"]
    return resp


async def finalized_as_400(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if resp.status_code == 409 and resp.json().get("error") == "RESERVATION_FINALIZED":
        return _json(resp, 400, dict(resp.json(), error="INVALID_REQUEST"))
    return resp


async def expired_commit_succeeds(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if resp.status_code == 410 and request.url.path.endswith("/commit"):
        return _json(resp, 200, {"status": "COMMITTED", "charged": json.loads(body)["actual"]})
    return resp


async def balances_without_remaining(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if request.url.path == "/v1/balances" and resp.status_code == 200:
        data = resp.json()
        for b in data["balances"]:
            b.pop("allocated", None)
            b["reserved"] = {"amount": b["reserved"]["amount"]}  # an Amount without its unit
        return _json(resp, 200, data)
    return resp


async def partial_lock_on_denial(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    """A denied multi-scope reservation leaves its amount locked on the outer scope."""
    if request.url.path == "/v1/reservations" and resp.status_code == 409:
        sent = json.loads(body)
        outer = {k: v for k, v in sent["subject"].items() if k in ("tenant", "workspace")}
        if outer != sent["subject"]:
            await proxy.send("POST", "/v1/reservations", {"x-cycles-api-key": request.headers["x-cycles-api-key"],
                                                          "content-type": "application/json"},
                             json.dumps(dict(sent, subject=outer, idempotency_key=uuid.uuid4().hex)).encode())
    return resp


async def rename_overdraft_error(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if resp.status_code == 409 and resp.json().get("error") == "OVERDRAFT_LIMIT_EXCEEDED":
        return _json(resp, 409, dict(resp.json(), error="BUDGET_EXCEEDED"))
    return resp


async def events_without_type(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if request.url.path == "/v1/events" and request.method == "GET" and resp.status_code == 200:
        data = resp.json()
        for e in data["events"]:
            e.pop("event_type", None)
        return _json(resp, 200, data)
    return resp


async def reserve_after_close(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    """A closed tenant's reservation is refused (401 or 409 TENANT_CLOSED) but answered as allowed."""
    if request.url.path == "/v1/reservations" and resp.status_code in (401, 409) and \
            resp.json().get("error") in ("UNAUTHORIZED", "TENANT_CLOSED"):
        sent = json.loads(body)
        return _json(resp, 200, {"decision": "ALLOW", "reservation_id": f"rsv_{uuid.uuid4().hex}",
                                 "affected_scopes": ["tenant:" + sent["subject"]["tenant"]],
                                 "reserved": sent["estimate"], "expires_at_ms": int(time.time() * 1000) + 60_000})
    return resp


def fill_empty_selectors(request: Request, headers: dict[str, str], body: bytes):
    """Persists a subscription with no selector by quietly giving it one."""
    if request.method == "POST" and request.url.path in ("/v1/webhooks", "/v1/admin/webhooks") and body:
        sent = json.loads(body)
        if not sent.get("event_types") and not sent.get("event_categories"):
            body = json.dumps(dict(sent, event_types=["budget.exhausted"])).encode()
    return headers, body


def convert_units(request: Request, headers: dict[str, str], body: bytes):
    """Silently converts a commit's unit to the reservation's instead of refusing it."""
    if request.url.path.endswith("/commit") and body:
        sent = json.loads(body)
        if sent.get("actual", {}).get("unit") != "USD_MICROCENTS":
            body = json.dumps(dict(sent, actual={"unit": "USD_MICROCENTS", "amount": sent["actual"]["amount"]})).encode()
    return headers, body


class AnonymousAsTenant:
    """Lets a request without a key through as the last tenant seen."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, request: Request, headers: dict[str, str], body: bytes):
        if "x-cycles-api-key" in headers and "x-admin-api-key" not in headers and len(headers["x-cycles-api-key"]) > 40:
            self.last = headers["x-cycles-api-key"]
        elif "x-cycles-api-key" not in headers and "x-admin-api-key" not in headers and self.last:
            headers = dict(headers, **{"x-cycles-api-key": self.last})
        return headers, body


BROKEN = [
    # (group, what breaks, response rewrite, request rewrite, the requirement that must fail)
    ("idempotency", charge_replays_twice, None, "Idempotent commit and release"),
    ("concurrency", allow_every_reserve, None, "Concurrency-safe enforcement"),
    ("errors", ok_for_unknown, None, "NOT_FOUND (404)"),
    ("errors", finalized_as_400, None, "RESERVATION_FINALIZED (409)"),
    ("correlation", drop_request_id, None, "X-Request-Id on every response"),
    ("ttl", expired_commit_succeeds, None, "RESERVATION_EXPIRED (410)"),
    ("operations", balances_without_remaining, None, "shared Amount, Subject, Balance"),
    ("atomic", partial_lock_on_denial, None, "Atomic reservation"),
    ("overdraft", rename_overdraft_error, None, "OVERDRAFT_LIMIT_EXCEEDED (409)"),
    ("events", events_without_type, None, "Event, EventType"),
    ("webhooks", None, fill_empty_selectors, "Selector presence"),
    ("units", None, convert_units, "UNIT_MISMATCH (400)"),
    ("auth", None, AnonymousAsTenant, "Authenticate via X-Cycles-API-Key"),
    ("closed", reserve_after_close, None, "TENANT_CLOSED (409)"),
]


@pytest.mark.parametrize("group,on_response,on_request,requirement", BROKEN,
                         ids=[f"{b[0]}-{(b[1] or b[2]).__name__}" for b in BROKEN])
def test_kit_fails_a_broken_server_naming_the_requirement(server: Server, store_kind: str, group, on_response,
                                                          on_request, requirement) -> None:
    if store_kind != "sqlite":
        pytest.skip("a broken proxy exercises the kit, not the store: one store is enough")
    if isinstance(on_request, type):
        on_request = on_request()
    with Proxy(server.base_url, on_response, on_request) as proxy:
        report = run_kit(proxy.url, server, [group])
    r = row(report, requirement)
    assert r["status"] == "fail", json.dumps(r, indent=1)[:2000]
    assert kit.report_errors(report) == []
    assert not report["summary"]["conformant"]
    assert r["detail"]
    if r["evidence"]:  # the evidence names the request, the answer and what was expected
        ev = r["evidence"][0]
        assert ev["request"]["path"].startswith("/v1/") and ev["response"]["status"] and ev["expected"]


def test_cli_names_the_broken_requirement_and_exits_1(server: Server, store_kind: str, tmp_path) -> None:
    if store_kind != "sqlite":
        pytest.skip("one store is enough")
    from typer.testing import CliRunner

    from cycles.cli import app

    out = tmp_path / "r.json"
    with Proxy(server.base_url, drop_request_id) as proxy:
        res = CliRunner().invoke(app, ["conformance", "run", proxy.url, "--admin-key", server.admin_key, "--only",
                                       "correlation", "--json", str(out)], terminal_width=200)
    assert res.exit_code == 1, res.output
    assert "✗ cycles-protocol-v0.yaml: CORRELATION AND TRACING (NORMATIVE) / X-Request-Id" in res.output
    assert "NOT CONFORMANT" in res.output and "expected: an X-Request-Id header" in res.output
    assert json.loads(out.read_text())["summary"]["must"]["fail"] == 1


async def no_decide(proxy: Proxy, request: Request, body: bytes, resp: httpx.Response):
    if request.url.path == "/v1/decide":
        return _json(resp, 404, {"error": "NOT_FOUND", "message": "no route", "request_id": "r"})
    return resp


def test_should_and_upcoming_gaps_are_reported_never_failing_the_run(server: Server, store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("one store is enough")
    with Proxy(server.base_url, no_decide) as proxy:
        report = kit.run(proxy.url, None, server.admin_key, None, only=["upcoming", "should", "correlation"])
    assert row(report, "Implement POST /v1/decide")["status"] == "fail"
    assert row(report, "listActionKinds")["status"] in ("fail", "pass")
    assert report["summary"]["should"]["fail"] >= 1
    assert report["summary"]["conformant"], failed(report)
