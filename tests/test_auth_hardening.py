"""Requests without a valid key cannot slow the server: key checks run off the event loop, once per
presented secret; failed attempts are throttled per source and key prefix (429 + Retry-After); failed
authentications leave a bounded number of audit rows."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support import Server, new_tenant, start_server


@pytest.fixture(scope="module")
def throttled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("throttled")
    srv = start_server(f"sqlite:///{tmp / 'c.db'}", tmp, extra_env={"CYCLES_AUTH_FAILURES_PER_MINUTE": "5"})
    yield srv
    srv.stop()


def test_failed_key_checks_are_throttled_per_source_then_429(throttled: Server) -> None:
    tenant = new_tenant(throttled)
    tenant.budget(amount=10**6)
    with tenant.client() as c:  # a working key, checked once before the flood
        assert c.get("/v1/balances", params={"tenant": tenant.tenant_id}).status_code == 200
    wrong = tenant.key[:14] + "x" * (len(tenant.key) - 14)  # the real prefix, a wrong secret
    codes = []
    with httpx.Client(base_url=throttled.base_url, headers={"X-Cycles-API-Key": wrong}) as c:
        for _ in range(8):
            r = c.get("/v1/balances", params={"tenant": tenant.tenant_id})
            codes.append(r.status_code)
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
    assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "LIMIT_EXCEEDED"
    with tenant.client() as c:  # the valid, already verified key is not throttled
        assert c.get("/v1/balances", params={"tenant": tenant.tenant_id}).status_code == 200
    with httpx.Client(base_url=throttled.base_url, headers={"X-Admin-API-Key": "not-the-key"}) as c:
        assert c.get("/v1/admin/tenants").status_code == 429  # same source: admin guesses too
    with throttled.admin() as c:  # the real operator key still works
        assert c.get("/v1/admin/tenants").status_code == 200
    metrics = httpx.get(throttled.base_url + "/metrics").text
    assert 'cycles_auth_failures_total{outcome="throttled"}' in metrics


def test_bogus_admin_keys_do_not_stall_other_requests(tmp_path: Path) -> None:
    # a generated operator key is stored as a scrypt hash: every wrong X-Admin-API-Key costs a verification
    srv = start_server(f"sqlite:///{tmp_path / 'c.db'}", tmp_path, admin_key=None)
    try:
        admin_key = next(line.strip() for line in srv.log().splitlines() if line.strip().startswith("cyc_admin_"))
        srv.admin_key = admin_key
        tenant = new_tenant(srv)
        stop = threading.Event()

        def flood() -> None:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                while not stop.is_set():
                    c.get("/v1/admin/tenants", headers={"X-Admin-API-Key": "bogus-" + uuid.uuid4().hex})

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        latencies = []
        with tenant.client() as c:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                assert c.get("/v1/balances", params={"tenant": tenant.tenant_id}).status_code in (200, 404)
                latencies.append(time.perf_counter() - t0)
        stop.set()
        for t in threads:
            t.join(30)
        # before: every bogus key ran scrypt on the event loop (p50 of normal requests ~1 s)
        assert statistics.median(latencies) < 0.15, statistics.median(latencies)
    finally:
        srv.stop()


def test_failed_authentications_leave_a_bounded_number_of_audit_rows(tmp_path: Path) -> None:
    server = start_server(f"sqlite:///{tmp_path / 'c.db'}", tmp_path,
                          extra_env={"CYCLES_AUTH_FAILURE_RECORDS_PER_MINUTE": "10"})
    try:
        with httpx.Client(base_url=server.base_url) as c:
            for _ in range(40):
                assert c.get("/v1/balances", headers={"X-Cycles-API-Key": f"cyc_live_{uuid.uuid4().hex}"}
                             ).status_code == 401
        with server.admin() as c:
            rows = c.get("/v1/admin/audit/logs", params={"tenant_id": "__unauth__", "limit": 100}).json()["logs"]
            events = c.get("/v1/admin/events", params={"event_type": "api_key.auth_failed", "limit": 100}).json()
        # 10 a minute per source (one more window if the minute turned during the test)
        assert 1 <= len(rows) <= 20 and len(events["events"]) <= 20
        metrics = httpx.get(server.base_url + "/metrics").text
        assert 'cycles_auth_failures_total{outcome="unrecorded"}' in metrics
    finally:
        server.stop()


def test_a_key_of_the_wrong_kind_is_told_where_it_belongs(server: Server) -> None:
    tenant = new_tenant(server)
    r = httpx.get(server.base_url + "/v1/admin/tenants", headers={"X-Admin-API-Key": tenant.key})
    assert r.status_code == 401 and "X-Cycles-API-Key" in r.json()["message"]
    r = httpx.get(server.base_url + "/v1/balances", params={"tenant": tenant.tenant_id},
                  headers={"X-Cycles-API-Key": "cyc_admin_" + "x" * 40})
    assert r.status_code == 401 and "X-Admin-API-Key" in r.json()["message"]


def test_key_hashing_stays_off_the_event_loop_and_a_new_key_needs_no_check(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """scrypt (tens of ms) never runs on the event loop: creating a key, validating one, checking one. A key
    this process just created is answered at once: it hashed the secret itself, so no scrypt check is needed."""
    import asyncio

    from cycles.server import auth
    from cycles.server.app import create_app

    admin_key = "auth-hardening-admin-" + uuid.uuid4().hex
    ran_on: list[tuple[str, threading.Thread]] = []
    real_hash, real_verify = auth.hash_secret, auth.verify_secret

    def hash_secret(secret: str) -> str:
        ran_on.append(("hash", threading.current_thread()))
        return real_hash(secret)

    def verify_secret(secret: str, stored: str) -> bool:
        ran_on.append(("verify", threading.current_thread()))
        return real_verify(secret, stored)

    monkeypatch.setattr(auth, "hash_secret", hash_secret)
    monkeypatch.setattr(auth, "verify_secret", verify_secret)
    monkeypatch.setenv("CYCLES_EMBEDDED_WORKER", "0")

    async def main() -> None:
        app = create_app(store_url=f"sqlite:///{tmp_path / 'c.db'}", admin_key=admin_key, sweep_interval_s=0)
        lifespan = app.router.lifespan_context(app.app)
        await lifespan.__aenter__()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cycles") as c:
                admin = {"X-Admin-API-Key": admin_key}
                assert (await c.post("/v1/admin/tenants", json={"tenant_id": "acme-hash", "name": "acme"},
                                     headers=admin)).status_code == 201
                key = (await c.post("/v1/admin/api-keys", json={"tenant_id": "acme-hash", "name": "k"},
                                    headers=admin)).json()["key_secret"]
                assert [what for what, _ in ran_on] == ["hash"]
                r = await c.post("/v1/admin/budgets", headers=admin, json={
                    "tenant_id": "acme-hash", "scope": "tenant:acme-hash", "unit": "TOKENS",
                    "allocated": {"unit": "TOKENS", "amount": 100}})
                assert r.status_code == 201, r.text
                r = await c.post("/v1/reservations", headers={"X-Cycles-API-Key": key}, json={
                    "idempotency_key": "k1", "subject": {"tenant": "acme-hash"}, "action": {"kind": "llm.completion",
                    "name": "m"}, "estimate": {"unit": "TOKENS", "amount": 10}})
                assert r.status_code == 200, r.text
                assert [what for what, _ in ran_on] == ["hash"]  # the new key needed no scrypt check
                r = await c.post("/v1/auth/validate", headers=admin, json={"key_secret": key})
                assert r.json()["valid"] is True
                assert [what for what, _ in ran_on] == ["hash", "verify"]
        finally:
            await lifespan.__aexit__(None, None, None)

    asyncio.run(main())
    assert all(thread is not threading.main_thread() for _, thread in ran_on), ran_on
