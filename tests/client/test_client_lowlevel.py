"""The low-level clients against the real server: every runtime endpoint, typed errors, retry policy."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from cycles.client import (Action, Amount, AsyncCyclesClient, AuthenticationError, BudgetExceededError,
                           CommitRequest, CyclesClient, CyclesConfig, CyclesProtocolError, CyclesTransportError,
                           IdempotencyMismatchError, InvalidResponseError, RateLimitedError,
                           ReservationCreateRequest, ReservationFinalizedError, ServerError, Subject,
                           UnitMismatchError)
from cycles.protocol import models as m
from faults import FaultTransport, Script


def create_req(tenant, amount=1000, key=None, **kw):
    return ReservationCreateRequest(idempotency_key=key or uuid.uuid4().hex, subject=Subject(tenant=tenant.tenant_id),
                                    action=Action(kind="llm.completion", name="m"),
                                    estimate=Amount(unit="USD_MICROCENTS", amount=amount), **kw)


def test_every_endpoint_typed(tenant, client):
    tenant.budget(amount=100_000)
    r = client.create_reservation(create_req(tenant, 1000))
    assert isinstance(r, m.ReservationCreateResponse) and r.decision == "ALLOW" and r.remaining_ttl_ms
    got = client.get_reservation(r.reservation_id)
    assert got.status == "ACTIVE" and got.reserved.amount == 1000
    ext = client.extend_reservation(r.reservation_id, {"idempotency_key": "x1", "extend_by_ms": 1000})
    assert ext.status == "ACTIVE" and ext.expires_at_ms > r.expires_at_ms
    c = client.commit_reservation(r.reservation_id, CommitRequest(idempotency_key="c1",
                                                                  actual=Amount(unit="USD_MICROCENTS", amount=700)))
    assert c.status == "COMMITTED" and c.charged.amount == 700
    r2 = client.create_reservation(create_req(tenant, 500))
    rel = client.release_reservation(r2.reservation_id, {"idempotency_key": "r1", "reason": "done"})
    assert rel.released.amount == 500
    d = client.decide({"idempotency_key": "d1", "subject": {"tenant": tenant.tenant_id},
                       "action": {"kind": "k", "name": "n"}, "estimate": {"unit": "USD_MICROCENTS", "amount": 5}})
    assert d.decision == "ALLOW"
    ev = client.create_event({"idempotency_key": "e1", "subject": {"tenant": tenant.tenant_id},
                              "action": {"kind": "k", "name": "n"}, "actual": {"unit": "USD_MICROCENTS", "amount": 50}})
    assert ev.status == "APPLIED"
    lst = client.list_reservations(tenant=tenant.tenant_id, status="COMMITTED")
    assert [x.reservation_id for x in lst.reservations] == [r.reservation_id]
    bal = client.get_balances(tenant=tenant.tenant_id)
    assert bal.balances[0].spent.amount == 750 and isinstance(bal.balances[0].spent.amount, int)
    with pytest.raises(ValueError):
        client.get_balances()


def test_budget_exceeded_is_typed_and_never_retried(tenant, client, script):
    tenant.budget(amount=100, commit_overage_policy="REJECT")
    with pytest.raises(BudgetExceededError) as exc:
        client.create_reservation(create_req(tenant, 1000, overage_policy="REJECT"))
    err = exc.value
    assert err.status == 409 and err.error_code == "BUDGET_EXCEEDED" and err.request_id and err.trace_id
    assert err.is_budget_exceeded() and not err.is_retryable()
    assert script.ops() == ["create"]  # no retry on 409


def test_other_codes_map_to_classes(tenant, client, make_config):
    tenant.budget(amount=100_000)
    r = client.create_reservation(create_req(tenant, 10, key="same"))
    with pytest.raises(IdempotencyMismatchError):
        client.create_reservation(create_req(tenant, 11, key="same"))
    with pytest.raises(UnitMismatchError):
        client.commit_reservation(r.reservation_id, {"idempotency_key": "u", "actual": {"unit": "TOKENS", "amount": 1}})
    client.commit_reservation(r.reservation_id, {"idempotency_key": "ok", "actual": {"unit": "USD_MICROCENTS", "amount": 1}})
    with pytest.raises(ReservationFinalizedError):
        client.extend_reservation(r.reservation_id, {"idempotency_key": "late", "extend_by_ms": 1000})
    with CyclesClient(make_config(api_key="wrong-key")) as bad:
        with pytest.raises(AuthenticationError) as exc:
            bad.get_balances(tenant=tenant.tenant_id)
        assert exc.value.status == 401


def test_retries_5xx_transport_and_invalid_2xx_with_same_key(tenant, client, script):
    tenant.budget(amount=100_000)
    script.rules += [("create", "status", (503, {"error": "INTERNAL_ERROR", "message": "x", "request_id": "r"})),
                     ("create", "connect_error"), ("create", "lose_response"),
                     ("create", "after", (200, b"{not json", None))]
    r = client.create_reservation(create_req(tenant, 1000, key="k-retry"))
    assert r.decision == "ALLOW"
    creates = script.of("create")
    assert len(creates) == 5 and {s.key for s in creates} == {"k-retry"}
    assert {s.body["idempotency_key"] for s in creates} == {"k-retry"}
    assert len(client.list_reservations(tenant=tenant.tenant_id).reservations) == 1  # applied once


def test_429_honours_retry_after_then_gives_up_when_too_long(tenant, make_client):
    tenant.budget(amount=100_000)
    s = Script([("create", "status", (429, {"error": "LIMIT_EXCEEDED", "message": "slow", "request_id": "r"},
                                      {"Retry-After": "1", "content-type": "application/json"}))])
    c = make_client(s)
    t0 = time.monotonic()
    assert c.create_reservation(create_req(tenant, 1)).decision == "ALLOW"
    assert time.monotonic() - t0 >= 0.95
    s.rules.append(("create", "status", (429, {"error": "LIMIT_EXCEEDED", "message": "slow", "request_id": "r"},
                                         {"Retry-After": "3600"})))
    with pytest.raises(RateLimitedError) as exc:
        c.create_reservation(create_req(tenant, 1))
    assert exc.value.retry_after_ms == 3_600_000 and exc.value.is_retryable()


def test_exhausted_retries_raise_typed(tenant, make_client):
    s = Script([("get", "status", (500, b"oops", None))] * 3)
    c = make_client(s, retry_max_attempts=3)
    with pytest.raises(ServerError) as exc:
        c.get_reservation("nope")
    assert exc.value.status == 500 and len(s.of("get")) == 3
    s.rules += [("get", "connect_error")] * 3
    with pytest.raises(CyclesTransportError) as exc2:
        c.get_reservation("nope")
    assert exc2.value.status == -1
    s.rules += [("get", "status", (202, b"{}", None))] * 3
    with pytest.raises(InvalidResponseError):
        c.get_reservation("nope")


def test_unknown_response_fields_are_tolerated(tenant, make_client):
    tenant.budget(amount=100_000)
    body = {"decision": "ALLOW", "affected_scopes": [f"tenant:{tenant.tenant_id}"], "reservation_id": "r-x",
            "expires_at_ms": 1, "remaining_ttl_ms": 60000, "cycles_evidence": {"evidence_id": "a" * 64, "cycles_evidence_url": "/v1/evidence/" + "a" * 64},
            "future_field": 1}
    c = make_client(Script([("create", "status", (200, body, None))]))
    r = c.create_reservation(create_req(tenant, 1))
    assert r.reservation_id == "r-x"


def test_config_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CYCLES_BASE_URL", "http://example:7878/")
    monkeypatch.setenv("CYCLES_API_KEY", "k")
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    monkeypatch.setenv("CYCLES_TOOLSET", "tools")
    monkeypatch.setenv("CYCLES_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("CYCLES_RETRY_ENABLED", "false")
    monkeypatch.setenv("CYCLES_JOURNAL_DIR", str(tmp_path))
    cfg = CyclesConfig.from_env()
    assert (cfg.base_url, cfg.tenant, cfg.toolset, cfg.connect_timeout, cfg.retry_enabled) == (
        "http://example:7878", "acme", "tools", 2.5, False)
    assert cfg.default_subject() == {"tenant": "acme", "toolset": "tools"}
    monkeypatch.delenv("CYCLES_API_KEY")
    with pytest.raises(ValueError, match="api_key"):
        CyclesConfig.from_env()
    monkeypatch.setenv("CYCLES_API_KEY", "k")
    monkeypatch.setenv("CYCLES_READ_TIMEOUT", "abc")
    with pytest.raises(ValueError, match="CYCLES_READ_TIMEOUT"):
        CyclesConfig.from_env()


def test_async_client_endpoints(tenant, make_async_client):
    tenant.budget(amount=100_000)

    async def main():
        async with make_async_client() as c:
            r = await c.create_reservation(create_req(tenant, 300))
            await c.commit_reservation(r.reservation_id, {"idempotency_key": "c", "actual": {"unit": "USD_MICROCENTS",
                                                                                              "amount": 200}})
            with pytest.raises(CyclesProtocolError) as exc:
                await c.get_reservation("missing-id")
            assert exc.value.error_code == "NOT_FOUND"
            return await c.get_balances(tenant=tenant.tenant_id)

    bal = asyncio.run(main())
    assert bal.balances[0].spent.amount == 200


def test_connection_reuse(tenant, make_config):
    """One connection for many calls (keep-alive through the shared httpx pool)."""
    import httpx

    opened = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            return super().handle_request(request)

    t = Counting()
    with CyclesClient(make_config(), transport=t) as c:
        for _ in range(5):
            c.get_balances(tenant=tenant.tenant_id)
        pool = t._pool
        opened.append(len(pool.connections))
    assert opened == [1]
