"""The runtime routes cache a key's principal and its tenant's policies; a change made through another
server process (sharing the store) takes effect on the very next request: revoked keys, narrowed
permissions and scope filters, suspended tenants, new or changed policies."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from conftest import store_url
from support import Server, Tenant, new_tenant, reserve_body, start_server


@pytest.fixture(scope="module")
def pair(store_kind: str, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    """Two server processes on one store: A serves the agent, B is where operators change things."""
    tmp = tmp_path_factory.mktemp(f"pair-{store_kind}")
    url = store_url(store_kind, tmp, request)
    a = start_server(url, tmp)
    b = start_server(url, tmp)
    yield a, b
    a.stop()
    b.stop()


def _on(server: Server, tenant: Tenant) -> Tenant:
    return Tenant(server, tenant.tenant_id, tenant.key)


def _reserve(t: Tenant, **extra: object) -> httpx.Response:
    with t.client() as c:
        return c.post("/v1/reservations", json=reserve_body(t, 1, **extra))


def _warmed(pair: tuple[Server, Server]) -> tuple[Server, Tenant, Tenant]:
    """B (the operators' server), a funded tenant provisioned there, and the same tenant's agent on A, whose
    key principal and policies A has cached."""
    a, b = pair
    tenant = new_tenant(b)
    tenant.budget(amount=10**6)
    agent = _on(a, tenant)
    for _ in range(3):
        assert _reserve(agent).status_code == 200
    return b, tenant, agent


def _key_id(b: Server, tenant: Tenant) -> str:
    with b.admin() as c:
        return c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id}).json()["keys"][0]["key_id"]


def test_revoked_key_is_refused_at_once(pair: tuple[Server, Server]) -> None:
    b, tenant, agent = _warmed(pair)
    with b.admin() as c:
        assert c.delete(f"/v1/admin/api-keys/{_key_id(b, tenant)}").status_code == 200
    r = _reserve(agent)
    assert r.status_code == 401, r.text
    with agent.client() as c:  # every runtime route, not only reserve
        assert c.post("/v1/decide", json=reserve_body(agent, 1)).status_code == 401


def test_permission_and_scope_filter_changes_apply_both_ways(pair: tuple[Server, Server]) -> None:
    b, tenant, agent = _warmed(pair)
    key_id = _key_id(b, tenant)
    with b.admin() as c:
        c.patch(f"/v1/admin/api-keys/{key_id}", json={"permissions": ["balances:read"]})
    assert _reserve(agent).status_code == 403
    with b.admin() as c:  # granted again: a refusal decided on the old cache must not stick
        c.patch(f"/v1/admin/api-keys/{key_id}", json={"permissions": ["reservations:create", "balances:read"],
                                                       "scope_filter": ["workspace:eng"]})
    assert _reserve(agent, subject=agent.subject(workspace="ops")).status_code == 403
    assert _reserve(agent, subject=agent.subject(workspace="eng")).status_code == 200


def test_suspended_tenant_is_refused_at_once_and_reactivated(pair: tuple[Server, Server]) -> None:
    b, tenant, agent = _warmed(pair)
    with b.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"status": "SUSPENDED"}).status_code == 200
    assert _reserve(agent).status_code == 403
    with b.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"status": "ACTIVE"}).status_code == 200
    assert _reserve(agent).status_code == 200


def test_policy_created_changed_and_deleted_elsewhere_applies_to_the_next_reserve(pair: tuple[Server, Server]) -> None:
    b, tenant, agent = _warmed(pair)
    assert _reserve(agent).json()["decision"] == "ALLOW"
    with b.admin() as c:
        r = c.post("/v1/admin/policies", json={"tenant_id": tenant.tenant_id, "name": "caps",
                                               "scope_pattern": f"tenant:{tenant.tenant_id}", "caps": {"max_tokens": 64}})
        assert r.status_code == 201, r.text
        pid = r.json()["policy_id"]
    body = _reserve(agent).json()
    assert body["decision"] == "ALLOW_WITH_CAPS" and body["caps"]["max_tokens"] == 64
    with b.admin() as c:
        assert c.patch(f"/v1/admin/policies/{pid}", json={"caps": {"max_tokens": 8}}).status_code == 200
    assert _reserve(agent).json()["caps"]["max_tokens"] == 8
    with b.admin() as c:
        assert c.delete(f"/v1/admin/policies/{pid}").status_code == 204
    assert _reserve(agent).json()["decision"] == "ALLOW"


def test_commit_with_a_revoked_key_is_refused_at_once(pair: tuple[Server, Server]) -> None:
    b, tenant, agent = _warmed(pair)
    rid = _reserve(agent).json()["reservation_id"]
    with b.admin() as c:
        assert c.delete(f"/v1/admin/api-keys/{_key_id(b, tenant)}").status_code == 200
    with agent.client() as c:
        r = c.post(f"/v1/reservations/{rid}/commit", json={"idempotency_key": "k1", "actual": {
            "unit": "USD_MICROCENTS", "amount": 1}})
    assert r.status_code == 401, r.text
