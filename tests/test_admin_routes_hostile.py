"""Hostile requests on the governance admin plane (cycles-governance-admin-v0.1.25.yaml).

Routes: tenant listing, API key list/patch/revoke, /v1/auth/validate and /introspect, budget
lookup/patch/freeze/unfreeze, policies (create/list/get/patch/delete) and the audit log query.

Every case goes to the real server (each store kind) and checks:
- missing or wrong credentials are 401 with the spec's ErrorResponse; admin-only routes read only
  X-Admin-API-Key, so a tenant key alone is "missing admin key" (401); a tenant key without the
  route's permission is 403;
- one tenant's key never sees or changes another tenant's policy or budget (404, no data leaked), and
  an admin query for one tenant returns nothing of another;
- malformed, oversized and out-of-range input is always a 4xx with an error body, never a 5xx, and
  a refused request changes nothing;
- retries of idempotent operations answer as the spec says.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from support import ADMIN_KEY, ALL_TENANT_PERMISSIONS, USD, Server, Tenant, new_tenant
from bodies import DELETE, Raw, encode, with_

# the spec's ErrorCode enum (cycles-governance-admin-v0.1.25.yaml components.schemas.ErrorCode)
SPEC_ERROR_CODES = {
    "INVALID_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "BUDGET_EXCEEDED", "RESERVATION_EXPIRED",
    "RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH", "UNIT_MISMATCH", "OVERDRAFT_LIMIT_EXCEEDED",
    "DEBT_OUTSTANDING", "INTERNAL_ERROR", "TENANT_NOT_FOUND", "TENANT_SUSPENDED", "TENANT_CLOSED",
    "BUDGET_NOT_FOUND", "BUDGET_FROZEN", "POLICY_VIOLATION", "INSUFFICIENT_PERMISSIONS", "KEY_REVOKED",
    "KEY_EXPIRED", "DUPLICATE_RESOURCE", "BUDGET_CLOSED", "WEBHOOK_NOT_FOUND", "WEBHOOK_URL_INVALID",
    "EVENT_NOT_FOUND", "REPLAY_IN_PROGRESS", "COUNT_MISMATCH", "LIMIT_EXCEEDED",
}
ERROR_KEYS = {"error", "message", "request_id", "trace_id", "details"}
MAX_BODY = 64 * 1024
INT64_MAX = 2**63 - 1

BAD = "INVALID_REQUEST"
UNAUTH = "UNAUTHORIZED"
FORBID = ("FORBIDDEN", "INSUFFICIENT_PERMISSIONS")
NOTFOUND = "NOT_FOUND"
ANY = None  # any spec error code

FULL = [*ALL_TENANT_PERMISSIONS, "policies:read", "policies:write"]
TOKENS = "TOKENS"


# ---------------------------------------------------------------------------------------------
# request building


def fill(obj: Any, names: dict[str, str]) -> Any:
    """Replace {a}, {b}, {a_policy}, ... placeholders in strings (keys and values)."""
    if isinstance(obj, str):
        for name, value in names.items():
            obj = obj.replace("{" + name + "}", value)
        return obj
    if isinstance(obj, dict):
        return {fill(k, names): fill(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, names) for v in obj]
    return obj


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(cursor: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


# ---------------------------------------------------------------------------------------------
# routes


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None  # a valid body (None: the route takes none)
    params: dict[str, str] | None = None
    admin_only: bool = True
    permission: str | None = None  # what a tenant key needs on a dual-auth route
    str_field: str | None = None  # a string field of the body (for encoding attacks)


SCOPE_A = {"scope": "tenant:{a}", "unit": USD}
SCOPE_WS = {"scope": "tenant:{a}/workspace:ws", "unit": USD}
POLICY = {"name": "hostile-test", "scope_pattern": "tenant:{a}/workspace:ws/*"}

ROUTES = {r.name: r for r in (
    Route("listTenants", "GET", "/v1/admin/tenants"),
    Route("listApiKeys", "GET", "/v1/admin/api-keys"),
    Route("updateApiKey", "PATCH", "/v1/admin/api-keys/{target_key_id}", {"name": "renamed"}, str_field="name"),
    Route("revokeApiKey", "DELETE", "/v1/admin/api-keys/{target_key_id}"),
    Route("validateApiKey", "POST", "/v1/auth/validate", {"key_secret": "{a_secret}"}, str_field="key_secret"),
    Route("introspectAuth", "GET", "/v1/auth/introspect", admin_only=False),
    Route("lookupBudget", "GET", "/v1/admin/budgets/lookup", params=SCOPE_A, admin_only=False,
          permission="budgets:read"),
    Route("updateBudget", "PATCH", "/v1/admin/budgets", {"commit_overage_policy": "ALLOW_IF_AVAILABLE"},
          params=SCOPE_A),
    Route("freezeBudget", "POST", "/v1/admin/budgets/freeze", {"reason": "test"}, params=SCOPE_WS,
          str_field="reason"),
    Route("unfreezeBudget", "POST", "/v1/admin/budgets/unfreeze", {"reason": "test"}, params=SCOPE_WS,
          str_field="reason"),
    Route("createPolicy", "POST", "/v1/admin/policies", POLICY, admin_only=False, permission="policies:write",
          str_field="name"),
    Route("listPolicies", "GET", "/v1/admin/policies", admin_only=False, permission="policies:read"),
    Route("getPolicy", "GET", "/v1/admin/policies/{a_policy}", admin_only=False, permission="policies:read"),
    Route("updatePolicy", "PATCH", "/v1/admin/policies/{a_policy}", {"priority": 7}, admin_only=False,
          permission="policies:write", str_field="name"),
    Route("deletePolicy", "DELETE", "/v1/admin/policies/{a_policy}", admin_only=False,
          permission="policies:write"),
    Route("listAuditLogs", "GET", "/v1/admin/audit/logs"),
)}
BODY_ROUTES = [r for r in ROUTES.values() if r.body is not None]
OPTIONAL_BODY = {"freezeBudget", "unfreezeBudget"}  # requestBody required: false
BUDGET_ROUTES = ("lookupBudget", "updateBudget", "freezeBudget", "unfreezeBudget")


@dataclass(frozen=True)
class Case:
    route: str
    status: int
    code: str | tuple[str, ...] | None
    body: Any = None  # dict (encoded with Raw support); None: the route's valid body
    content: bytes | None = None  # raw body, wins over `body`
    chunked: bool = False
    no_body: bool = False  # send no body at all
    params: dict[str, str] | None = None  # replaces the route's params
    extra_params: dict[str, str] | None = None  # merged into the route's params
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = None  # None: admin key on admin-only routes, tenant A's full key otherwise
    path: str | None = None  # replaces the route's path


# ---------------------------------------------------------------------------------------------
# the world


@dataclass
class World:
    server: Server
    http: httpx.Client
    a: Tenant  # full key incl. policies:*
    b: Tenant
    a_limited: str  # reservations:create only
    a_policies_ro: str  # policies:read only
    a_filtered: str  # budgets:read + policies:read, scope_filter workspace:ws
    a_revoked: str  # a revoked key of A
    target_key_id: str  # an A key the table's PATCH/DELETE cases aim at (never changed by them)
    a_policy: str
    a_policy2: str
    b_policy: str
    b_policy_name: str
    b_key_id: str

    def names(self) -> dict[str, str]:
        return {"a": self.a.tenant_id, "b": self.b.tenant_id, "a_policy": self.a_policy, "b_policy": self.b_policy,
                "target_key_id": self.target_key_id, "a_secret": self.a.key, "B": self.b.tenant_id.upper()}

    def admin_h(self) -> dict[str, str]:
        return {"X-Admin-API-Key": ADMIN_KEY}

    def headers_for(self, auth: str) -> dict[str, Any]:
        a = {"X-Cycles-API-Key": self.a.key}
        return {
            "admin": self.admin_h(),
            "a": a,
            "b": {"X-Cycles-API-Key": self.b.key},
            "none": {},
            "wrong-admin": {"X-Admin-API-Key": ADMIN_KEY + "-wrong"},
            "admin-prefix": {"X-Admin-API-Key": ADMIN_KEY[:-1]},
            "admin-uppercase": {"X-Admin-API-Key": ADMIN_KEY.upper()},
            "admin-padded": {"X-Admin-API-Key": ADMIN_KEY + " x"},
            "empty-admin": {"X-Admin-API-Key": ""},
            "admin-4k": {"X-Admin-API-Key": "k" * 4096},
            "admin-latin1": {"X-Admin-API-Key": b"\xff\xfe\xfd"},
            "admin-as-bearer": {"Authorization": f"Bearer {ADMIN_KEY}"},
            "admin-in-tenant-header": {"X-Cycles-API-Key": ADMIN_KEY},
            "wrong-tenant": {"X-Cycles-API-Key": "cyc_live_" + uuid.uuid4().hex},
            "tampered-tenant": {"X-Cycles-API-Key": self.a.key[:-4] + "AAAA"},
            "garbage-tenant": {"X-Cycles-API-Key": "x"},
            "tenant-600": {"X-Cycles-API-Key": self.a.key[:14] + "a" * 600},
            "tenant-latin1": {"X-Cycles-API-Key": self.a.key[:14].encode() + b"\xff" * 20},
            "revoked-tenant": {"X-Cycles-API-Key": self.a_revoked},
            "tenant+wrong-admin": {**a, "X-Admin-API-Key": ADMIN_KEY + "-wrong"},
            "limited": {"X-Cycles-API-Key": self.a_limited},
            "policies-ro": {"X-Cycles-API-Key": self.a_policies_ro},
            "filtered": {"X-Cycles-API-Key": self.a_filtered},
        }[auth]

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must not have changed (A's and B's policies, keys, budgets, tenants)."""
        out: dict[str, Any] = {}
        h = self.admin_h()
        for t in (self.a.tenant_id, self.b.tenant_id):
            pol = self.http.get("/v1/admin/policies", params={"tenant_id": t, "limit": 100}, headers=h)
            keys = self.http.get("/v1/admin/api-keys", params={"tenant_id": t, "limit": 100}, headers=h)
            bud = self.http.get("/v1/admin/budgets", params={"tenant_id": t, "limit": 100}, headers=h)
            ten = self.http.get(f"/v1/admin/tenants/{t}", headers=h)
            for r in (pol, keys, bud, ten):
                assert r.status_code == 200, r.text
            key_rows = [{k: v for k, v in row.items() if k != "last_used_at"} for row in keys.json()["keys"]]
            out[t] = {"policies": pol.json(), "keys": key_rows, "budgets": bud.json(), "tenant": ten.json()}
        return out


def _key(server: Server, tenant_id: str, permissions: list[str], **extra: Any) -> tuple[str, str]:
    with server.admin() as c:
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant_id, "name": "hostile", "permissions": permissions,
                                                **extra})
    assert r.status_code == 201, r.text
    return r.json()["key_id"], r.json()["key_secret"]


def _policy(server: Server, tenant: Tenant, **body: Any) -> dict[str, Any]:
    with tenant.client() as c:
        r = c.post("/v1/admin/policies", json=body)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    a = new_tenant(server, FULL)
    b = new_tenant(server, FULL)
    a.budget("")
    a.budget("workspace:ws")
    b.budget("")
    b.budget("workspace:ws")
    _, limited = _key(server, a.tenant_id, ["reservations:create"])
    _, ro = _key(server, a.tenant_id, ["policies:read"])
    _, filtered = _key(server, a.tenant_id, ["budgets:read", "policies:read"], scope_filter=["workspace:ws"])
    revoked_id, revoked = _key(server, a.tenant_id, ["policies:read", "budgets:read"])
    target_id, _ = _key(server, a.tenant_id, ["balances:read"])
    b_key_id, _ = _key(server, b.tenant_id, ["balances:read"])
    with server.admin() as c:
        assert c.delete(f"/v1/admin/api-keys/{revoked_id}").status_code == 200
    a_policy = _policy(server, a, name="a-policy", scope_pattern=f"tenant:{a.tenant_id}/*", priority=1)["policy_id"]
    a_policy2 = _policy(server, a, name="a-policy-2", scope_pattern="agent:*")["policy_id"]
    b_name = "b-secret-" + uuid.uuid4().hex
    b_policy = _policy(server, b, name=b_name, scope_pattern=f"tenant:{b.tenant_id}/workspace:secret/*",
                       caps={"max_tokens": 987654321})["policy_id"]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield World(server, http, a, b, limited, ro, filtered, revoked, target_id, a_policy, a_policy2, b_policy,
                    b_name, b_key_id)


# ---------------------------------------------------------------------------------------------
# assertions


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | tuple[str, ...] | None) -> dict[str, Any]:
    """The spec's ErrorResponse: never a 5xx, the expected status and code, required keys, no nulls."""
    assert r.status_code < 500, f"server error {r.status_code}: {r.text}"
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, f"expected {statuses} {code}, got {r.status_code}: {r.text}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict), body
    assert {"error", "message", "request_id"} <= set(body), body
    assert set(body) <= ERROR_KEYS, f"unexpected keys {set(body) - ERROR_KEYS}"
    assert all(v is not None for v in body.values()), f"null in error body: {body}"
    assert body["error"] in SPEC_ERROR_CODES, body
    if code is not None:
        codes = (code,) if isinstance(code, str) else code
        assert body["error"] in codes, f"expected {codes}, got {body['error']}: {body['message']}"
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert r.headers.get("x-request-id") == body["request_id"]
    return body


def send(world: World, case: Case) -> httpx.Response:
    route = ROUTES[case.route]
    names = world.names()
    path = fill(case.path or route.path, names)
    params = fill(case.params if case.params is not None else {**(route.params or {}), **(case.extra_params or {})},
                  names)
    auth = case.auth or ("admin" if route.admin_only else "a")
    headers = {**world.headers_for(auth), **fill(case.headers, names)}
    content: Any = None
    if not case.no_body:
        if case.content is not None:
            content = case.content
            if case.chunked:
                data = content
                content = iter([data[i:i + 8192] for i in range(0, len(data), 8192)])
        elif case.body is not None or route.body is not None:
            content = encode(fill(case.body if case.body is not None else route.body, names))
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return world.http.request(route.method, path, params=params or None, headers=headers, content=content)


def run_case(world: World, case: Case) -> dict[str, Any]:
    before = world.snapshot()
    r = send(world, case)
    body = assert_error(r, case.status, case.code)
    after = world.snapshot()
    assert after == before, "a refused request changed state"
    return body


def P(name: str, case: Case) -> Any:
    return pytest.param(case, id=name)


# ---------------------------------------------------------------------------------------------
# 1 + 2: authentication and permissions on every route

ALWAYS_401 = ("none", "wrong-admin", "admin-prefix", "admin-uppercase", "admin-padded", "empty-admin", "admin-4k",
              "admin-latin1", "admin-as-bearer", "admin-in-tenant-header", "wrong-tenant", "tampered-tenant",
              "garbage-tenant", "tenant-600", "tenant-latin1", "revoked-tenant")


def auth_cases() -> Iterator[Any]:
    for route in ROUTES.values():
        n = route.name
        for auth in ALWAYS_401:
            yield P(f"{n}-{auth}", Case(n, 401, UNAUTH, auth=auth))
        if route.admin_only:
            # admin-only routes authenticate X-Admin-API-Key only: a tenant key is a missing admin key
            for auth in ("a", "tenant+wrong-admin", "limited", "policies-ro", "filtered"):
                yield P(f"{n}-tenant-key-{auth}", Case(n, 401, UNAUTH, auth=auth))
        elif route.permission is not None:
            yield P(f"{n}-lacks-{route.permission}", Case(n, 403, FORBID, auth="limited"))
            if route.permission.endswith(":write") or route.permission == "budgets:read":
                yield P(f"{n}-policies-read-only-key", Case(n, 403, FORBID, auth="policies-ro"))


def permission_cases() -> Iterator[Any]:
    # a tenant key cannot get around the permission check with an admin-only body field or a query override
    yield P("createPolicy-limited-with-tenant-id", Case("createPolicy", 403, FORBID, auth="limited",
                                                       body=with_(POLICY, "tenant_id", "{a}")))
    yield P("listPolicies-limited-with-tenant-id", Case("listPolicies", 403, FORBID, auth="limited",
                                                       params={"tenant_id": "{a}"}))
    # scope_filter: a key limited to workspace:ws may not read the tenant-level budget
    yield P("lookupBudget-outside-scope-filter", Case("lookupBudget", 403, FORBID, auth="filtered"))


@pytest.mark.parametrize("case", [*auth_cases(), *permission_cases()])
def test_auth(world: World, case: Case) -> None:
    run_case(world, case)


def test_introspect_limited_key_reports_no_admin_capabilities(world: World) -> None:
    r = world.http.get("/v1/auth/introspect", headers=world.headers_for("limited"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["auth_type"] == "tenant" and body["tenant_id"] == world.a.tenant_id
    assert body["permissions"] == ["reservations:create"]
    assert not any(body["capabilities"][c] for c in ("manage_policies", "view_policies", "manage_tenants",
                                                     "manage_api_keys", "view_audit", "view_api_keys"))
    assert world.b.tenant_id not in r.text


def test_admin_key_is_not_a_tenant_key_on_introspect(world: World) -> None:
    """A tenant key wins over an admin key sent alongside it: the tenant's view, never the admin's."""
    r = world.http.get("/v1/auth/introspect", headers={**world.headers_for("limited"), **world.admin_h()})
    assert r.status_code == 200, r.text
    assert r.json()["auth_type"] == "tenant" and r.json()["permissions"] == ["reservations:create"]


# ---------------------------------------------------------------------------------------------
# 3: cross-tenant isolation


def _no_leak(world: World, r: httpx.Response) -> None:
    for secret in (world.b_policy_name, "workspace:secret", "987654321", world.b.tenant_id):
        assert secret not in r.text, f"B's data in a response to A: {r.text}"


@pytest.mark.parametrize("method,body", [("GET", None), ("PATCH", {"priority": 99}),
                                         ("PATCH", {"status": "DISABLED"}), ("DELETE", None)])
def test_tenant_cannot_touch_other_tenants_policy(world: World, method: str, body: Any) -> None:
    before = world.snapshot()
    h = world.headers_for("a")
    r = world.http.request(method, f"/v1/admin/policies/{world.b_policy}", headers=h, json=body)
    err = assert_error(r, 404, NOTFOUND)
    _no_leak(world, r)
    # indistinguishable from an id that does not exist
    ghost = "pol_" + "0" * 20
    r2 = world.http.request(method, f"/v1/admin/policies/{ghost}", headers=h, json=body)
    err2 = assert_error(r2, 404, NOTFOUND)
    assert err["message"].replace(world.b_policy, "ID") == err2["message"].replace(ghost, "ID")
    assert world.snapshot() == before


def test_tenant_policy_list_is_own_only(world: World) -> None:
    for params in ({}, {"tenant_id": world.b.tenant_id}, {"scope_pattern": f"tenant:{world.b.tenant_id}/workspace:secret/*"}):
        r = world.http.get("/v1/admin/policies", params={**params, "limit": 100}, headers=world.headers_for("a"))
        assert r.status_code == 200, r.text
        assert all(p["tenant_id"] == world.a.tenant_id for p in r.json()["policies"]), r.text
        _no_leak(world, r)
    # even with a valid admin key alongside, the tenant key decides whose policies are listed
    r = world.http.get("/v1/admin/policies", params={"tenant_id": world.b.tenant_id},
                       headers={**world.headers_for("a"), **world.admin_h()})
    assert r.status_code == 200, r.text
    _no_leak(world, r)


@pytest.mark.parametrize("unit", [USD, TOKENS])
@pytest.mark.parametrize("suffix", ["", "/workspace:ws", "/workspace:nope"])
def test_tenant_cannot_look_up_other_tenants_budget(world: World, suffix: str, unit: str) -> None:
    scope = f"tenant:{world.b.tenant_id}{suffix}"
    r = world.http.get("/v1/admin/budgets/lookup", params={"scope": scope, "unit": unit},
                       headers=world.headers_for("a"))
    err = assert_error(r, 404, NOTFOUND)
    # (the request id is left out: a random hex part ending in 1 before the zero-padded counter reads 1000000)
    said = json.dumps({k: v for k, v in err.items() if k != "request_id"})
    for leak in ("ledger_id", "allocated", "remaining", "1000000"):
        assert leak not in said, r.text
    # the same answer as for a tenant that does not exist at all
    ghost = "tenant:ghost-" + uuid.uuid4().hex[:8] + suffix
    r2 = world.http.get("/v1/admin/budgets/lookup", params={"scope": ghost, "unit": unit},
                        headers=world.headers_for("a"))
    err2 = assert_error(r2, 404, NOTFOUND)
    assert err["message"].replace(scope, "S") == err2["message"].replace(ghost, "S")


def test_tenant_can_look_up_own_budget(world: World) -> None:
    r = world.http.get("/v1/admin/budgets/lookup", params={"scope": f"tenant:{world.a.tenant_id}", "unit": USD},
                       headers=world.headers_for("a"))
    assert r.status_code == 200, r.text
    assert r.json()["tenant_id"] == world.a.tenant_id
    r = world.http.get("/v1/admin/budgets/lookup",
                       params={"scope": f"tenant:{world.a.tenant_id}/workspace:ws", "unit": USD},
                       headers=world.headers_for("filtered"))
    assert r.status_code == 200, r.text


def test_admin_policy_list_for_one_tenant_shows_nothing_of_another(world: World) -> None:
    h = world.admin_h()
    r = world.http.get("/v1/admin/policies", params={"tenant_id": world.a.tenant_id, "limit": 100}, headers=h)
    assert r.status_code == 200, r.text
    assert {p["tenant_id"] for p in r.json()["policies"]} == {world.a.tenant_id}
    _no_leak(world, r)
    for ghost in ("no-such-tenant", world.b.tenant_id.upper(), world.b.tenant_id + " ", world.b.tenant_id[:-1],
                  "%", "*", world.b.tenant_id + "\x00"):
        r = world.http.get("/v1/admin/policies", params={"tenant_id": ghost}, headers=h)
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert r.json()["policies"] == [], f"tenant_id={ghost!r}: {r.text}"
        else:
            assert_error(r, 400, BAD)


def test_admin_key_list_for_one_tenant_shows_nothing_of_another(world: World) -> None:
    h = world.admin_h()
    r = world.http.get("/v1/admin/api-keys", params={"tenant_id": world.a.tenant_id, "limit": 100}, headers=h)
    assert r.status_code == 200, r.text
    keys = r.json()["keys"]
    assert keys and {k["tenant_id"] for k in keys} == {world.a.tenant_id}
    assert world.b_key_id not in r.text and world.b.tenant_id not in r.text
    assert all("key_secret" not in k and "secret_hash" not in k for k in keys)
    assert world.a.key not in r.text
    for ghost in ("no-such-tenant", world.b.tenant_id.upper(), world.b.tenant_id[:-1], "%"):
        r = world.http.get("/v1/admin/api-keys", params={"tenant_id": ghost}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["keys"] == [], f"tenant_id={ghost!r}: {r.text}"


def test_admin_audit_for_one_tenant_shows_nothing_of_another(world: World) -> None:
    # give both tenants fresh audited activity
    _policy(world.server, world.b, name="audit-b", scope_pattern="agent:*")
    _policy(world.server, world.a, name="audit-a", scope_pattern="agent:*")
    h = world.admin_h()
    r = world.http.get("/v1/admin/audit/logs", params={"tenant_id": world.a.tenant_id, "limit": 200}, headers=h)
    assert r.status_code == 200, r.text
    logs = r.json()["logs"]
    assert logs and {row["tenant_id"] for row in logs} == {world.a.tenant_id}
    assert world.b.tenant_id not in json.dumps([{k: v for k, v in row.items() if k != "resource_id"} for row in logs])
    for ghost in ("no-such-tenant", world.b.tenant_id.upper(), world.b.tenant_id[:-1]):
        r = world.http.get("/v1/admin/audit/logs", params={"tenant_id": ghost}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["logs"] == [], f"tenant_id={ghost!r}: {r.text}"


def cross_tenant_body_cases() -> Iterator[Any]:
    n = "createPolicy"
    for label, pattern in (("other-tenant-subtree", "tenant:{b}/*"), ("other-tenant-exact", "tenant:{b}"),
                           ("other-tenant-deep", "tenant:{b}/workspace:secret/agent:x"),
                           ("other-tenant-uppercase", "tenant:{B}/*"), ("any-tenant", "tenant:*"),
                           ("any-tenant-subtree", "tenant:*/*"), ("any-tenant-agent", "tenant:*/agent:x")):
        yield P(f"{n}-scope-{label}", Case(n, 400, BAD, body=with_(POLICY, "scope_pattern", pattern)))
    yield P(f"{n}-tenant-id-other", Case(n, 400, BAD, body=with_(POLICY, "tenant_id", "{b}")))
    yield P(f"{n}-tenant-id-own", Case(n, 400, BAD, body=with_(POLICY, "tenant_id", "{a}")))
    # the admin key, too, keeps a policy inside the tenant it is created for
    yield P(f"{n}-admin-scope-other-tenant", Case(n, 400, BAD, auth="admin", body={
        **POLICY, "tenant_id": "{a}", "scope_pattern": "tenant:{b}/*"}))
    yield P(f"{n}-admin-no-tenant-id", Case(n, 400, BAD, auth="admin"))
    # a create naming a tenant that does not exist: 400, as key and budget creates answer
    yield P(f"{n}-admin-unknown-tenant", Case(n, 400, BAD, auth="admin", body={**POLICY, "tenant_id": "no-such-tenant-x"}))
    yield P(f"{n}-admin-traversal-tenant", Case(n, (400, 404), ANY, auth="admin",
                                               body={**POLICY, "tenant_id": "../{a}"}))
    n = "updatePolicy"
    yield P(f"{n}-move-to-other-tenant", Case(n, 400, BAD, body={"tenant_id": "{b}"}))
    yield P(f"{n}-rewrite-scope-pattern", Case(n, 400, BAD, body={"scope_pattern": "tenant:{b}/*"}))
    yield P("listPolicies-admin-without-tenant-id", Case("listPolicies", 400, BAD, auth="admin"))


# ---------------------------------------------------------------------------------------------
# 4: malformed and hostile input


def generic_body_cases() -> Iterator[Any]:
    big = b'{"name": "' + b"n" * (MAX_BODY + 10) + b'"}'
    deep = b"[" * 10_000 + b"]" * 10_000
    deep_obj = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    for route in BODY_ROUTES:
        n = route.name
        optional = n in OPTIONAL_BODY
        valid = encode(route.body)
        yield P(f"{n}-malformed-json", Case(n, 400, BAD, content=b"{bad json"))
        yield P(f"{n}-truncated-json", Case(n, 400, BAD, content=valid[:-1]))
        yield P(f"{n}-trailing-garbage", Case(n, 400, BAD, content=valid + b" trailing"))
        yield P(f"{n}-two-objects", Case(n, 400, BAD, content=valid + valid))
        if not optional:
            yield P(f"{n}-empty-body", Case(n, 400, BAD, no_body=True))
            yield P(f"{n}-empty-object", Case(n, 400, BAD, body={}))
        for label, raw in (("array", b"[]"), ("array-of-valid", b"[" + valid + b"]"), ("null", b"null"),
                           ("string", b'"x"'), ("number", b"1"), ("bool", b"true"), ("nan", b"NaN")):
            yield P(f"{n}-non-object-{label}", Case(n, 400, BAD, content=raw))
        yield P(f"{n}-invalid-utf8", Case(n, 400, BAD, content=b'{"x": "\xff\xfe"}'))
        yield P(f"{n}-over-64KiB", Case(n, 400, BAD, content=big))
        yield P(f"{n}-over-64KiB-chunked", Case(n, 400, BAD, content=big, chunked=True))
        yield P(f"{n}-deep-array", Case(n, 400, BAD, content=deep))
        yield P(f"{n}-deep-object", Case(n, 400, BAD, content=deep_obj))
        yield P(f"{n}-unknown-field", Case(n, 400, BAD, body=with_(route.body, "bogus_field", 1)))
        yield P(f"{n}-unknown-field-only", Case(n, 400, BAD, body={"__proto__": {"admin": True}}))
        if route.str_field:
            f = route.str_field
            yield P(f"{n}-{f}-lone-surrogate", Case(n, 400, BAD, content=b'{"' + f.encode() + b'": "\\udc00x"}'))
            for label, value in (("number", 5), ("list", ["x"]), ("object", {"x": 1}), ("10k-chars", "x" * 10_000)):
                yield P(f"{n}-{f}-{label}", Case(n, 400, BAD, body=with_(route.body, f, value)))


def metadata_cases(n: str, base: dict[str, Any]) -> Iterator[Any]:
    yield P(f"{n}-metadata-list", Case(n, 400, BAD, body=with_(base, "metadata", [1, 2])))
    yield P(f"{n}-metadata-string", Case(n, 400, BAD, body=with_(base, "metadata", "x")))
    yield P(f"{n}-metadata-65-keys", Case(n, 400, BAD, body=with_(base, "metadata", {f"k{i}": i for i in range(65)})))
    yield P(f"{n}-metadata-key-129", Case(n, 400, BAD, body=with_(base, "metadata", {"k" * 129: 1})))
    yield P(f"{n}-metadata-float-overflow", Case(n, 400, BAD, body=with_(base, "metadata", {"x": Raw("1e400")})))
    yield P(f"{n}-metadata-deep", Case(n, 400, BAD, body=with_(base, "metadata", {
        "x": Raw("[" * 10_000 + "]" * 10_000)})))


SCOPE_PATTERN_ATTACKS = (
    ("empty", ""), ("space", " "), ("tab", "\t"), ("newline", "\n"), ("leading-space", " tenant:{a}/*"),
    ("trailing-space", "tenant:{a}/* "), ("trailing-newline", "agent:*\n"), ("foo-bar", "foo:bar"),
    ("no-colon", "tenant"), ("empty-value", "tenant:"), ("empty-level", ":x"), ("double-tenant", "tenant:{a}/tenant:{b}"),
    ("repeated-level", "tenant:{a}/workspace:x/workspace:y"), ("out-of-order", "agent:x/workspace:y"),
    ("star-then-x", "*/x"), ("star-star", "*/*"), ("star-in-middle", "tenant:{a}/*/agent:x"),
    ("double-slash", "tenant:{a}//agent:x"), ("trailing-slash", "tenant:{a}/"), ("leading-slash", "/tenant:{a}"),
    ("dotdot", "../"), ("dotdot-escape", "tenant:{a}/../tenant:{b}"), ("dotdot-etc", "../../etc/passwd"),
    ("pct-dotdot", "tenant:{a}/%2e%2e/tenant:{b}"), ("backslash", "tenant:{a}\\..\\tenant:{b}"),
    ("nul", "tenant:{a}\x00/*"), ("nul-value", "agent:a\x00b"), ("rtl", "agent:\u202eabc"),
    ("rtl-tenant", "tenant:{a}\u202e/*"), ("zero-width", "agent:a\u200bb"), ("fullwidth", "agent:\uff41"),
    ("emoji", "agent:\U0001f600"), ("space-in-value", "agent:a b"), ("glob-partial", "agent:summ*"),
    ("regex", "agent:.*"), ("sql", "agent:x' OR '1'='1"), ("value-129", "agent:" + "a" * 129),
    ("5000-chars", "agent:" + "a" * 5000), ("1025-chars", "tenant:{a}/" + "workspace:" + "w" * 1015),
    ("unknown-level", "region:eu"), ("uppercase-level", "TENANT:{a}"), ("number", 5), ("list", ["agent:*"]),
    ("null", None), ("missing", DELETE),
)


def policy_body_cases() -> Iterator[Any]:
    n = "createPolicy"
    for label, value in SCOPE_PATTERN_ATTACKS:
        yield P(f"{n}-scope-pattern-{label}", Case(n, 400, BAD, body=with_(POLICY, "scope_pattern", value)))
    yield from policy_field_cases(n, POLICY)
    for label, value in (("257-chars", "n" * 257), ("null", None), ("missing", DELETE)):
        yield P(f"{n}-name-{label}", Case(n, 400, BAD, body=with_(POLICY, "name", value)))
    yield P(f"{n}-tenant-id-65", Case(n, 400, BAD, auth="admin", body={**POLICY, "tenant_id": "t" * 65}))
    yield P(f"{n}-status-not-a-create-field", Case(n, 400, BAD, body=with_(POLICY, "status", "ACTIVE")))
    yield P(f"{n}-policy-id-not-a-create-field", Case(n, 400, BAD, body=with_(POLICY, "policy_id", "pol_x")))

    n = "updatePolicy"
    base: dict[str, Any] = {}
    yield from policy_field_cases(n, base)
    for label, value in (("bogus", "BOGUS"), ("lowercase", "active"), ("deleted", "DELETED"), ("number", 1)):
        yield P(f"{n}-status-{label}", Case(n, 400, BAD, body={"status": value}))
    for fld in ("policy_id", "created_at", "updated_at", "version", "effective_from_ms"):
        yield P(f"{n}-immutable-{fld}", Case(n, 400, BAD, body={fld: "x"}))
    yield P(f"{n}-all-null", Case(n, 400, BAD, body={"name": None, "priority": None}))
    for label, pid in (("pct-dotdot", "%2e%2e"), ("pct-dotdot-slash", "%2e%2e%2f%2e%2e%2fapi-keys"),
                       ("nul", "%00"), ("rtl", "%E2%80%AE"), ("10k", "p" * 10_000), ("other-tenant", "{b_policy}"),
                       ("unknown", "pol_00000000000000000000")):
        for route in ("getPolicy", "updatePolicy", "deletePolicy"):
            yield P(f"{route}-id-{label}", Case(route, 404, NOTFOUND, path=f"/v1/admin/policies/{pid}"))


def policy_field_cases(n: str, base: dict[str, Any]) -> Iterator[Any]:
    def c(label: str, path: str, value: Any) -> Any:
        return P(f"{n}-{label}", Case(n, 400, BAD, body=with_(base, path, value)))

    for label, value in (("neg", -1), ("huge", Raw(str(10**30))), ("int64-plus-1", Raw(str(INT64_MAX + 1))),
                         ("1000001", 1_000_001), ("float", 1.5), ("float-1.0", Raw("1.0")), ("string", "5"),
                         ("bool", True)):
        yield c(f"priority-{label}", "priority", value)
    yield c("name-10k", "name", "n" * 10_000)
    yield c("description-1025", "description", "d" * 1025)
    for fld in ("max_tokens", "max_steps_remaining", "cooldown_ms"):
        for label, value in (("neg", -5), ("huge", Raw(str(10**30))), ("float", 1.5), ("string", "5")):
            yield c(f"caps-{fld}-{label}", f"caps.{fld}", value)
    yield c("caps-list", "caps", [1])
    yield c("caps-unknown-field", "caps.max_cost", 5)
    yield c("caps-allowlist-string", "caps.tool_allowlist", "search")
    yield c("caps-allowlist-item-257", "caps.tool_allowlist", ["t" * 257])
    yield c("caps-allowlist-item-number", "caps.tool_allowlist", [1])
    for label, value in (("bogus", "BOGUS"), ("lowercase", "reject"), ("number", 0)):
        yield c(f"overage-{label}", "commit_overage_policy", value)
    for fld, label, value in (("default_ttl_ms", "999", 999), ("default_ttl_ms", "86400001", 86_400_001),
                              ("max_ttl_ms", "0", 0), ("max_ttl_ms", "neg", -1000),
                              ("max_extensions", "neg", -1), ("max_extensions", "huge", Raw(str(10**30))),
                              ("bogus", "unknown", 1)):
        yield c(f"ttl-override-{fld}-{label}", f"reservation_ttl_override.{fld}", value)
    yield c("ttl-override-default-above-max", "reservation_ttl_override",
            {"default_ttl_ms": 60_000, "max_ttl_ms": 10_000})
    for fld in ("max_reservations_per_minute", "max_commits_per_minute"):
        for label, value in (("zero", 0), ("neg", -1), ("huge", 10_000_001), ("float", 1.5), ("string", "10")):
            yield c(f"rate-limits-{fld}-{label}", f"rate_limits.{fld}", value)
    yield c("rate-limits-unknown-field", "rate_limits.max_per_second", 1)
    yield c("rate-limits-list", "rate_limits", [1])
    for fld in ("effective_from", "effective_until"):
        for label, value in (("garbage", "not-a-date"), ("month-13", "2026-13-01T00:00:00Z"),
                             ("bad-offset", "2026-01-01T00:00:00+25:00"), ("epoch-ms", "1767225600000"),
                             ("65-chars", "2026-01-01T00:00:00Z" + " " * 45), ("number", 1767225600000),
                             ("empty", "")):
            yield c(f"{fld}-{label}", fld, value)
    yield P(f"{n}-effective-until-before-from", Case(n, 400, BAD, body={
        **base, "effective_from": "2026-02-01T00:00:00Z", "effective_until": "2026-01-01T00:00:00Z"}))
    yield P(f"{n}-effective-until-equals-from", Case(n, 400, BAD, body={
        **base, "effective_from": "2026-01-01T00:00:00Z", "effective_until": "2026-01-01T00:00:00Z"}))


def api_key_cases() -> Iterator[Any]:
    n = "updateApiKey"
    for label, value in (("bogus", ["bogus"]), ("admin-star", ["*"]), ("admin-wildcard", ["admin:*"]),
                         ("uppercase", ["POLICIES:READ"]), ("string", "policies:read"), ("null-item", [None]),
                         ("65-items", ["balances:read"] * 65), ("trailing-space", ["policies:read "])):
        yield P(f"{n}-permissions-{label}", Case(n, 400, BAD, body={"permissions": value}))
    for label, value in (("foo-bar", ["foo:bar"]), ("empty", [""]), ("space", [" "]), ("star", ["*"]),
                         ("no-value", ["workspace:"]), ("leading-space", [" workspace:x"]),
                         ("double-tenant", ["tenant:x/tenant:y"]), ("star-then-x", ["*/x"]),
                         ("dotdot", ["../"]), ("nul", ["workspace:x\x00"]), ("rtl", ["workspace:\u202ex"]),
                         ("1025-chars", ["workspace:" + "w" * 1015]), ("65-entries", [f"workspace:w{i}" for i in range(65)]),
                         ("string", "workspace:x"), ("number-item", [5])):
        yield P(f"{n}-scope-filter-{label}", Case(n, 400, BAD, body={"scope_filter": value}))
    yield P(f"{n}-name-257", Case(n, 400, BAD, body={"name": "n" * 257}))
    yield P(f"{n}-description-1025", Case(n, 400, BAD, body={"description": "d" * 1025}))
    yield from metadata_cases(n, {})
    for fld, value in (("status", "ACTIVE"), ("tenant_id", "{b}"), ("expires_at", "2099-01-01T00:00:00Z"),
                       ("key_prefix", "cyc_live_xxxxx"), ("key_id", "key_x"), ("secret_hash", "x"),
                       ("revoked_at", "x")):
        yield P(f"{n}-immutable-{fld}", Case(n, 400, BAD, body={fld: value}))
    yield P(f"{n}-all-null", Case(n, 400, BAD, body={"name": None}))
    for route, method_path in (("updateApiKey", "/v1/admin/api-keys/"), ("revokeApiKey", "/v1/admin/api-keys/")):
        for label, kid in (("pct-dotdot", "%2e%2e"), ("pct-dotdot-slash", "%2e%2e%2f%2e%2e%2ftenants"),
                           ("nul", "%00"), ("rtl", "%E2%80%AE"), ("10k", "k" * 10_000),
                           ("unknown", "key_0000000000000000"), ("prefix-not-id", "cyc_live_")):
            yield P(f"{route}-id-{label}", Case(route, 404, NOTFOUND, path=method_path + kid))
    n = "revokeApiKey"
    yield P(f"{n}-reason-513", Case(n, 400, BAD, params={"reason": "r" * 513}))
    n = "validateApiKey"
    for label, value in (("513-chars", "k" * 513), ("null", None), ("missing", DELETE), ("list", ["x"])):
        yield P(f"{n}-key-secret-{label}", Case(n, 400, BAD, body=with_({"key_secret": "x"}, "key_secret", value)))
    yield P(f"{n}-tenant-id-field", Case(n, 400, BAD, body={"key_secret": "x", "tenant_id": "{a}"}))


BAD_SCOPES = (
    ("missing-scope", {"unit": USD}), ("missing-unit", {"scope": "tenant:{a}"}), ("missing-both", {}),
    ("unit-bogus", {"scope": "tenant:{a}", "unit": "BOGUS"}), ("unit-lowercase", {"scope": "tenant:{a}", "unit": "usd_microcents"}),
    ("unit-eur", {"scope": "tenant:{a}", "unit": "EUR"}), ("unit-list", {"scope": "tenant:{a}", "unit": f"{USD},{TOKENS}"}),
    ("scope-workspace-first", {"scope": "workspace:ws", "unit": USD}),
    ("scope-agent-only", {"scope": "agent:x", "unit": USD}), ("scope-foo-bar", {"scope": "foo:bar", "unit": USD}),
    ("scope-space", {"scope": " ", "unit": USD}), ("scope-leading-space", {"scope": " tenant:{a}", "unit": USD}),
    ("scope-trailing-newline", {"scope": "tenant:{a}\n", "unit": USD}),
    ("scope-double-tenant", {"scope": "tenant:{a}/tenant:{b}", "unit": USD}),
    ("scope-dotdot", {"scope": "tenant:{a}/../tenant:{b}", "unit": USD}),
    ("scope-dotdot-only", {"scope": "../", "unit": USD}), ("scope-star", {"scope": "*", "unit": USD}),
    ("scope-tenant-star", {"scope": "tenant:*", "unit": USD}), ("scope-pattern", {"scope": "tenant:{a}/*", "unit": USD}),
    ("scope-nul", {"scope": "tenant:{a}\x00", "unit": USD}), ("scope-rtl", {"scope": "tenant:\u202e{a}", "unit": USD}),
    ("scope-1025", {"scope": "tenant:{a}/workspace:" + "w" * 1020, "unit": USD}),
    ("scope-value-129", {"scope": "tenant:{a}/workspace:" + "w" * 129, "unit": USD}),
    ("scope-empty-value", {"scope": "tenant:", "unit": USD}), ("scope-trailing-slash", {"scope": "tenant:{a}/", "unit": USD}),
)


def budget_cases() -> Iterator[Any]:
    for n in BUDGET_ROUTES:
        for label, params in BAD_SCOPES:
            yield P(f"{n}-{label}", Case(n, 400, BAD, params=params))
        yield P(f"{n}-no-such-budget-unit", Case(n, 404, (NOTFOUND, "BUDGET_NOT_FOUND"),
                                                 params={"scope": "tenant:{a}", "unit": TOKENS}))
        yield P(f"{n}-no-such-budget-scope", Case(n, 404, (NOTFOUND, "BUDGET_NOT_FOUND"),
                                                  params={"scope": "tenant:{a}/workspace:nope", "unit": USD}))
        yield P(f"{n}-no-such-tenant", Case(n, 404, (NOTFOUND, "BUDGET_NOT_FOUND", "TENANT_NOT_FOUND"),
                                            params={"scope": "tenant:no-such-tenant-zz", "unit": USD}))
    # the tenant key sees the same 400s (validated before the cross-tenant check)
    for label, params in BAD_SCOPES[:12]:
        yield P(f"lookupBudget-tenant-key-{label}", Case("lookupBudget", 400, BAD, params=params, auth="a"))
    n = "updateBudget"
    base = {"commit_overage_policy": "REJECT"}
    yield P(f"{n}-overdraft-other-unit", Case(n, 400, "UNIT_MISMATCH", body={"overdraft_limit": {"unit": TOKENS,
                                                                                                  "amount": 10}}))
    for label, value in (("neg", -1), ("huge", Raw(str(10**30))), ("int64-plus-1", Raw(str(INT64_MAX + 1))),
                         ("float", 1.5), ("string", "10"), ("null", None), ("missing", DELETE)):
        yield P(f"{n}-overdraft-amount-{label}", Case(n, 400, BAD, body=with_(
            {"overdraft_limit": {"unit": USD, "amount": 10}}, "overdraft_limit.amount", value)))
    for label, value in (("bogus-unit", {"unit": "EUR", "amount": 1}), ("number", 10), ("string", "10"),
                         ("unknown-field", {"unit": USD, "amount": 1, "currency": "x"})):
        yield P(f"{n}-overdraft-{label}", Case(n, 400, BAD, body={"overdraft_limit": value}))
    for label, value in (("bogus", "BOGUS"), ("lowercase", "reject"), ("number", 1)):
        yield P(f"{n}-overage-{label}", Case(n, 400, BAD, body={"commit_overage_policy": value}))
    for fld, value in (("allocated", {"unit": USD, "amount": 1}), ("status", "FROZEN"), ("scope", "tenant:{b}"),
                       ("tenant_id", "{b}"), ("unit", TOKENS), ("debt", {"unit": USD, "amount": 0})):
        yield P(f"{n}-not-patchable-{fld}", Case(n, 400, BAD, body={**base, fld: value}))
    yield P(f"{n}-all-null", Case(n, 400, BAD, body={"overdraft_limit": None, "commit_overage_policy": None}))
    yield from metadata_cases(n, base)
    for n in ("freezeBudget", "unfreezeBudget"):
        yield P(f"{n}-reason-513", Case(n, 400, BAD, body={"reason": "r" * 513}))
        yield P(f"{n}-status-field", Case(n, 400, BAD, body={"status": "ACTIVE"}))
        yield from metadata_cases(n, {"reason": "x"})


def list_query_cases() -> Iterator[Any]:
    lists = {"listTenants": 100, "listApiKeys": 100, "listPolicies": 100, "listAuditLogs": 200}
    for n, hi in lists.items():
        for label, value in (("0", "0"), ("neg", "-1"), ("max-plus-1", str(hi + 1)), ("1e9", str(10**9)),
                             ("huge", "9" * 40), ("5000-digits", "9" * 5000), ("abc", "abc"), ("float", "1.5"),
                             ("exp", "1e2"), ("hex", "0x10")):
            yield P(f"{n}-limit-{label}", Case(n, 400, BAD, extra_params={"limit": value}))
        for label, value in garbage_cursors():
            yield P(f"{n}-cursor-{label}", Case(n, 400, BAD, extra_params={"cursor": value}))
        yield P(f"{n}-status-bogus", Case(n, 400, BAD, extra_params={"status": "BOGUS"}))
    yield P("listTenants-status-lowercase", Case("listTenants", 400, BAD, extra_params={"status": "active"}))
    yield P("listTenants-sort-by-bogus", Case("listTenants", 400, BAD, extra_params={"sort_by": "name; DROP TABLE"}))
    for n in ("listTenants", "listAuditLogs"):
        yield P(f"{n}-sort-dir-sideways", Case(n, 400, BAD, extra_params={"sort_dir": "sideways"}))
        yield P(f"{n}-sort-dir-uppercase", Case(n, 400, BAD, extra_params={"sort_dir": "DESC"}))
    for n in ("listTenants", "listApiKeys", "listAuditLogs"):
        yield P(f"{n}-search-129", Case(n, 400, BAD, extra_params={"search": "s" * 129}))
    yield P("listTenants-parent-65", Case("listTenants", 400, BAD, extra_params={"parent_tenant_id": "p" * 65}))
    yield P("listApiKeys-tenant-id-65", Case("listApiKeys", 400, BAD, extra_params={"tenant_id": "t" * 65}))
    yield P("listApiKeys-status-lowercase", Case("listApiKeys", 400, BAD, extra_params={"status": "revoked"}))
    yield P("listPolicies-status-lowercase", Case("listPolicies", 400, BAD, extra_params={"status": "active"}))
    yield P("listPolicies-scope-pattern-1025", Case("listPolicies", 400, BAD,
                                                    extra_params={"scope_pattern": "a" * 1025}))
    yield P("listPolicies-admin-tenant-id-65", Case("listPolicies", 400, BAD, auth="admin",
                                                    params={"tenant_id": "t" * 65}))
    n = "listAuditLogs"
    for label, params in (
        ("status-with-min", {"status": "200", "status_min": "100"}),
        ("status-with-max", {"status": "200", "status_max": "599"}),
        ("status-with-both", {"status": "200", "status_min": "100", "status_max": "599"}),
        ("min-above-max", {"status_min": "500", "status_max": "400"}),
        ("status-99", {"status": "99"}), ("status-600", {"status": "600"}), ("status-abc", {"status": "abc"}),
        ("status-huge", {"status": str(10**30)}), ("status-float", {"status": "200.0"}),
        ("min-99", {"status_min": "99"}), ("max-600", {"status_max": "600"}), ("min-neg", {"status_min": "-1"}),
        ("26-operations", {"operation": ",".join(f"op{i}" for i in range(26))}),
        ("26-resource-types", {"resource_type": ",".join(f"r{i}" for i in range(26))}),
        ("26-error-codes", {"error_code": ",".join(f"E{i}" for i in range(26))}),
        ("26-error-code-excludes", {"error_code_exclude": ",".join(f"E{i}" for i in range(26))}),
        ("trace-id-short", {"trace_id": "abc"}), ("trace-id-uppercase", {"trace_id": "A" * 32}),
        ("trace-id-33", {"trace_id": "a" * 33}), ("trace-id-non-hex", {"trace_id": "g" * 32}),
        ("trace-id-traceparent", {"trace_id": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}),
        ("from-not-a-date", {"from": "not-a-date"}), ("to-not-a-date", {"to": "yesterday"}),
        ("from-month-13", {"from": "2026-13-01T00:00:00Z"}), ("from-bad-offset", {"from": "2026-01-01T00:00:00+25:00"}),
        ("from-epoch-ms", {"from": "1767225600000"}), ("from-five-digit-year", {"from": "20261-01-01T00:00:00Z"}),
        ("sort-by-bogus", {"sort_by": "bogus"}), ("key-id-257", {"key_id": "k" * 257}),
        ("resource-id-257", {"resource_id": "r" * 257}), ("request-id-257", {"request_id": "r" * 257}),
        ("tenant-id-65", {"tenant_id": "t" * 65}),
    ):
        yield P(f"{n}-{label}", Case(n, 400, BAD, params=params))
    # the repeated form counts towards the 25-value limit too
    yield P(f"{n}-26-operations-repeated", Case(n, 400, BAD, params={}, path="/v1/admin/audit/logs?" + "&".join(
        f"operation=op{i}" for i in range(26))))


def garbage_cursors() -> Iterator[tuple[str, str]]:
    rnd = base64.urlsafe_b64encode(os.urandom(24)).decode()
    yield "random-base64", rnd
    yield "random-base64-unpadded", rnd.rstrip("=")[:-1]
    yield "not-base64", "!!!not a cursor!!!"
    yield "single-char", "a"
    yield "base64-not-json", base64.urlsafe_b64encode(b"\x00\xffgarbage").decode()
    yield "base64-not-utf8", b64(b'{"f": "\xff\xfe"}')
    yield "json-list", b64([1, 2])
    yield "json-string", b64("cursor")
    yield "json-null", b64(None)
    yield "json-empty-object", b64({})
    yield "no-filter-hash", b64({"k": ["a", "b"]})
    yield "other-filter-hash", b64({"k": ["a", "b"], "f": "0000000000000000"})
    yield "filter-hash-list", b64({"k": ["a", "b"], "f": ["x"]})
    yield "very-long", "A" * 5000
    yield "unicode", "\u202e\u00e9\U0001f600"
    yield "deep-json", b64(b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize("case", [*cross_tenant_body_cases(), *generic_body_cases(), *policy_body_cases(),
                                  *api_key_cases(), *budget_cases(), *list_query_cases()])
def test_hostile_input(world: World, case: Case) -> None:
    run_case(world, case)


def test_case_ids_are_unique() -> None:
    ids: list[str] = []
    for gen in (auth_cases, permission_cases, cross_tenant_body_cases, generic_body_cases, policy_body_cases,
                api_key_cases, budget_cases, list_query_cases):
        ids += [p.id for p in gen()]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, dupes


def _sized_policy(size: int) -> bytes:
    """A valid policy body of exactly `size` bytes (padded with tool names of at most 256 characters)."""
    body: dict[str, Any] = {"name": "boundary", "scope_pattern": "agent:*", "caps": {"tool_allowlist": []}}
    tools = body["caps"]["tool_allowlist"]
    while len(encode(body)) + 260 <= size:
        tools.append("t" * 256)
    tools.append("")
    tools[-1] = "t" * (size - len(encode(body)))
    raw = encode(body)
    assert len(raw) == size and len(tools[-1]) <= 256
    return raw


@pytest.mark.parametrize("size,status", [(MAX_BODY - 1, 201), (MAX_BODY, 201), (MAX_BODY + 1, 400)])
def test_policy_body_size_boundary(world: World, size: int, status: int) -> None:
    tenant = new_tenant(world.server, FULL)
    headers = {"X-Cycles-API-Key": tenant.key, "Content-Type": "application/json"}
    raw = _sized_policy(size)
    for chunked in (False, True):
        content: Any = iter([raw[i:i + 8192] for i in range(0, len(raw), 8192)]) if chunked else raw
        r = world.http.post("/v1/admin/policies", content=content, headers=headers)
        if status == 201:
            # policy names are unique per tenant: the second upload of the same body is a duplicate
            if chunked:
                assert r.status_code == 409 and r.json()["error"] == "DUPLICATE_RESOURCE", r.text[:300]
                continue
            assert r.status_code == 201, r.text[:300]
        else:
            assert_error(r, 400, BAD)


# ---------------------------------------------------------------------------------------------
# cursors: issued for one filter (or tenant) and replayed with another, or forged


def _cursor(world: World, path: str, params: dict[str, Any], headers: dict[str, Any]) -> str:
    r = world.http.get(path, params={**params, "limit": 1}, headers=headers)
    assert r.status_code == 200, r.text
    cursor = r.json().get("next_cursor")
    assert cursor, f"expected a second page: {r.text}"
    return cursor


CURSOR_ROUTES = ["tenants", "api-keys", "policies", "audit"]


def _cursor_route(world: World, name: str) -> tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(path, params, headers, other filters that must refuse the route's cursor)"""
    a, b = world.a.tenant_id, world.b.tenant_id
    return {
        "tenants": ("/v1/admin/tenants", {}, world.admin_h(),
                    [{"status": "ACTIVE"}, {"sort_dir": "desc"}, {"sort_by": "name"}, {"search": "t-"}]),
        "api-keys": ("/v1/admin/api-keys", {"tenant_id": a}, world.admin_h(),
                     [{"tenant_id": b}, {}, {"tenant_id": a, "status": "ACTIVE"}, {"tenant_id": a, "search": "key"}]),
        "policies": ("/v1/admin/policies", {}, world.headers_for("a"),
                     [{"status": "ACTIVE"}, {"scope_pattern": "agent:*"}]),
        "audit": ("/v1/admin/audit/logs", {}, world.admin_h(),
                  [{"tenant_id": a}, {"sort_dir": "asc"}, {"status_min": "100"}, {"operation": "createPolicy"},
                   {"from": "2020-01-01T00:00:00Z"}]),
    }[name]


@pytest.mark.parametrize("name", CURSOR_ROUTES)
def test_cursor_from_a_different_filter_is_refused(world: World, name: str) -> None:
    path, params, headers, others = _cursor_route(world, name)
    cursor = _cursor(world, path, params, headers)
    # the same filter accepts it
    r = world.http.get(path, params={**params, "limit": 1, "cursor": cursor}, headers=headers)
    assert r.status_code == 200, r.text
    for other in others:
        r = world.http.get(path, params={**other, "limit": 1, "cursor": cursor}, headers=headers)
        assert_error(r, 400, BAD)


def test_policy_cursor_of_one_tenant_is_refused_for_another(world: World) -> None:
    cursor = _cursor(world, "/v1/admin/policies", {}, world.headers_for("a"))
    r = world.http.get("/v1/admin/policies", params={"limit": 1, "cursor": cursor}, headers=world.headers_for("b"))
    assert_error(r, 400, BAD)
    _no_leak(world, r)
    r = world.http.get("/v1/admin/policies", params={"limit": 1, "cursor": cursor, "tenant_id": world.b.tenant_id},
                       headers=world.admin_h())
    assert_error(r, 400, BAD)


FORGED_KEYS = [
    pytest.param([1, 2], id="ints"), pytest.param([None, None], id="nulls"), pytest.param([{"a": 1}], id="object"),
    pytest.param([[1], [2]], id="nested-lists"), pytest.param([True, "x"], id="bool-str"),
    pytest.param([10**30, "x"], id="huge-int-str"), pytest.param([-(10**30), "x"], id="neg-huge-int-str"),
    pytest.param([INT64_MAX + 1, "x"], id="int64-plus-1-str"), pytest.param(["a", "b", "c", "d"], id="four-strs"),
    pytest.param([1.5, "x"], id="float-str"), pytest.param(7, id="int"), pytest.param("x", id="str"),
    pytest.param({"a": 1}, id="dict"), pytest.param(None, id="null"), pytest.param([], id="empty-list"),
]


@pytest.mark.parametrize("forged", FORGED_KEYS)
@pytest.mark.parametrize("name", CURSOR_ROUTES)
def test_forged_cursor_position_is_400_never_500(world: World, name: str, forged: Any) -> None:
    """A cursor whose filter hash is genuine but whose position is not one the server wrote: the
    server may page from it or refuse it with 400, never fail with a 5xx."""
    path, params, headers, _ = _cursor_route(world, name)
    payload = unb64(_cursor(world, path, params, headers))
    payload["k"] = forged
    r = world.http.get(path, params={**params, "limit": 1, "cursor": b64(payload)}, headers=headers)
    assert r.status_code < 500, f"cursor k={forged!r} -> {r.status_code} {r.text}"
    if r.status_code != 200:
        assert_error(r, 400, BAD)
    if name == "policies":
        _no_leak(world, r)


# ---------------------------------------------------------------------------------------------
# budget state transitions and unit checks


def _fresh_budget(world: World) -> dict[str, str]:
    suffix = "workspace:fz" + uuid.uuid4().hex[:10]
    world.a.budget(suffix)
    return {"scope": f"tenant:{world.a.tenant_id}/{suffix}", "unit": USD}


def test_freeze_twice_is_409_and_unfreeze_active_is_409(world: World) -> None:
    h = world.admin_h()
    params = _fresh_budget(world)
    r = world.http.post("/v1/admin/budgets/unfreeze", params=params, headers=h)
    assert_error(r, 409, ANY)
    r = world.http.post("/v1/admin/budgets/freeze", params=params, headers=h, json={"reason": "incident"})
    assert r.status_code == 200 and r.json()["status"] == "FROZEN", r.text
    r = world.http.post("/v1/admin/budgets/freeze", params=params, headers=h)
    assert_error(r, 409, ANY)
    r = world.http.get("/v1/admin/budgets/lookup", params=params, headers=h)
    assert r.json()["status"] == "FROZEN", r.text
    r = world.http.post("/v1/admin/budgets/unfreeze", params=params, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "ACTIVE", r.text
    r = world.http.post("/v1/admin/budgets/unfreeze", params=params, headers=h)
    assert_error(r, 409, ANY)


@pytest.mark.parametrize("content", [b"", b"   ", b"{}"])
def test_freeze_accepts_an_absent_or_empty_body(world: World, content: bytes) -> None:
    params = _fresh_budget(world)
    r = world.http.post("/v1/admin/budgets/freeze", params=params, headers=world.admin_h(), content=content)
    assert r.status_code == 200, r.text


def test_patch_budget_overdraft_in_other_unit_changes_nothing(world: World) -> None:
    h = world.admin_h()
    params = _fresh_budget(world)
    before = world.http.get("/v1/admin/budgets/lookup", params=params, headers=h).json()
    for unit in (TOKENS, "CREDITS", "RISK_POINTS"):
        r = world.http.patch("/v1/admin/budgets", params=params, headers=h,
                             json={"overdraft_limit": {"unit": unit, "amount": 5}, "commit_overage_policy": "REJECT"})
        assert_error(r, 400, "UNIT_MISMATCH")
    assert world.http.get("/v1/admin/budgets/lookup", params=params, headers=h).json() == before


def test_patch_budget_same_body_twice(world: World) -> None:
    h = world.admin_h()
    params = _fresh_budget(world)
    body = {"overdraft_limit": {"unit": USD, "amount": 500}, "commit_overage_policy": "ALLOW_WITH_OVERDRAFT"}
    r1 = world.http.patch("/v1/admin/budgets", params=params, headers=h, json=body)
    r2 = world.http.patch("/v1/admin/budgets", params=params, headers=h, json=body)
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    for r in (r1, r2):
        assert r.json()["overdraft_limit"] == {"unit": USD, "amount": 500}


# ---------------------------------------------------------------------------------------------
# 5: idempotent retries and revocation


def test_revoke_twice_answers_key_revoked(world: World) -> None:
    h = world.admin_h()
    key_id, secret = _key(world.server, world.a.tenant_id, ["policies:read"])
    r = world.http.get("/v1/admin/policies", headers={"X-Cycles-API-Key": secret})
    assert r.status_code == 200, r.text
    r = world.http.delete(f"/v1/admin/api-keys/{key_id}", params={"reason": "rotated"}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "REVOKED" and r.json()["revoked_reason"] == "rotated"
    assert secret not in r.text
    r = world.http.delete(f"/v1/admin/api-keys/{key_id}", headers=h)
    assert_error(r, 409, "KEY_REVOKED")
    r = world.http.patch(f"/v1/admin/api-keys/{key_id}", headers=h, json={"name": "resurrect"})
    assert_error(r, 409, "KEY_REVOKED")
    # revocation is immediate and permanent
    r = world.http.get("/v1/admin/policies", headers={"X-Cycles-API-Key": secret})
    assert_error(r, 401, UNAUTH)
    r = world.http.post("/v1/auth/validate", headers=h, json={"key_secret": secret})
    assert r.status_code == 200 and r.json()["valid"] is False and r.json()["reason"] == "REVOKED", r.text
    r = world.http.get("/v1/admin/api-keys", params={"tenant_id": world.a.tenant_id, "status": "REVOKED"}, headers=h)
    assert key_id in {k["key_id"] for k in r.json()["keys"]}


def test_revoke_with_bad_reason_does_not_revoke(world: World) -> None:
    h = world.admin_h()
    key_id, secret = _key(world.server, world.a.tenant_id, ["policies:read"])
    r = world.http.delete(f"/v1/admin/api-keys/{key_id}", params={"reason": "r" * 513}, headers=h)
    assert_error(r, 400, BAD)
    assert world.http.get("/v1/admin/policies", headers={"X-Cycles-API-Key": secret}).status_code == 200


def test_tenant_create_twice(world: World) -> None:
    h = world.admin_h()
    tid = "t-hostile-" + uuid.uuid4().hex[:10]
    body = {"tenant_id": tid, "name": "Hostile"}
    r1 = world.http.post("/v1/admin/tenants", headers=h, json=body)
    assert r1.status_code == 201, r1.text
    r2 = world.http.post("/v1/admin/tenants", headers=h, json=body)
    assert r2.status_code == 200, r2.text
    assert r2.json() == r1.json()
    r3 = world.http.post("/v1/admin/tenants", headers=h, json={**body, "name": "Someone else"})
    assert_error(r3, 409, "DUPLICATE_RESOURCE")
    assert world.http.get(f"/v1/admin/tenants/{tid}", headers=h).json()["name"] == "Hostile"


def test_delete_policy_twice(world: World) -> None:
    pid = _policy(world.server, world.a, name="to-delete", scope_pattern="agent:*")["policy_id"]
    h = world.headers_for("a")
    r = world.http.delete(f"/v1/admin/policies/{pid}", headers=h)
    assert r.status_code == 204, r.text
    assert r.content == b""
    r = world.http.delete(f"/v1/admin/policies/{pid}", headers=h)
    assert_error(r, 404, NOTFOUND)
    assert_error(world.http.get(f"/v1/admin/policies/{pid}", headers=h), 404, NOTFOUND)


def test_patch_policy_same_body_twice(world: World) -> None:
    pid = _policy(world.server, world.a, name="patch-twice", scope_pattern="agent:*")["policy_id"]
    h = world.headers_for("a")
    body = {"priority": 9, "caps": {"max_tokens": 100}, "rate_limits": {"max_reservations_per_minute": 1}}
    r1 = world.http.patch(f"/v1/admin/policies/{pid}", headers=h, json=body)
    r2 = world.http.patch(f"/v1/admin/policies/{pid}", headers=h, json=body)
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    for r in (r1, r2):
        assert r.json()["priority"] == 9 and r.json()["caps"] == {"max_tokens": 100}


def test_validate_answers_without_leaking(world: World) -> None:
    h = world.admin_h()
    for secret in ("", "x", "cyc_live_", world.a.key[:14], world.a.key[:-1], world.a.key + "x",
                   world.a.key[:14] + "\x00" * 20, "\u202e" * 20, "k" * 512):
        r = world.http.post("/v1/auth/validate", headers=h, json={"key_secret": secret})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["valid"] is False, (secret, body)
        assert body.get("tenant_id") in ("", None) and "permissions" not in body and "key_id" not in body, body
    r = world.http.post("/v1/auth/validate", headers=h, json={"key_secret": world.a.key})
    assert r.status_code == 200 and r.json()["valid"] is True and r.json()["tenant_id"] == world.a.tenant_id, r.text
