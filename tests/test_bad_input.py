"""Bad input on every endpoint the server serves.

Every case sends one malformed, oversized, unauthenticated or otherwise invalid request to the real
server and checks that the answer is the spec's 4xx (cycles-protocol-v0 §ERROR SEMANTICS): the right
status and error code, an ErrorResponse body with exactly the allowed keys and no nulls, matching
X-Request-Id / X-Cycles-Trace-Id headers, and never a 5xx. Requests that could move money are also
checked to have left the tenant's ledgers, reservations and tenant record untouched.

The trace-id tests at the end cover §CORRELATION AND TRACING header precedence.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx
import pytest

from support import ADMIN_KEY, USD, Server, Tenant, new_tenant
from bodies import DELETE, Raw, encode, with_

ERROR_CODES = {
    "INVALID_REQUEST", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "BUDGET_EXCEEDED", "BUDGET_FROZEN",
    "BUDGET_CLOSED", "RESERVATION_EXPIRED", "RESERVATION_FINALIZED", "IDEMPOTENCY_MISMATCH", "UNIT_MISMATCH",
    "OVERDRAFT_LIMIT_EXCEEDED", "DEBT_OUTSTANDING", "MAX_EXTENSIONS_EXCEEDED", "LIMIT_EXCEEDED", "TENANT_CLOSED",
    "INTERNAL_ERROR",
    # governance-plane codes, allowed on /v1/admin routes (cycles-governance-admin ErrorCode)
    "TENANT_NOT_FOUND", "BUDGET_NOT_FOUND", "DUPLICATE_RESOURCE",
}
ERROR_KEYS = {"error", "message", "request_id", "trace_id", "details"}
TRACE_RE = re.compile(r"^[0-9a-f]{32}$")
INT64_MAX = 2**63 - 1
MAX_BODY = 64 * 1024

BAD = "INVALID_REQUEST"
UNAUTH = "UNAUTHORIZED"
FORBID = "FORBIDDEN"
NOTFOUND = "NOT_FOUND"


# ---------------------------------------------------------------------------------------------
# request building


def fill(obj: Any, names: dict[str, str]) -> Any:
    """Replace {tenant}, {rid}, ... placeholders in strings; {key} becomes a fresh idempotency key."""
    if isinstance(obj, str):
        if "{key}" in obj:
            obj = obj.replace("{key}", uuid.uuid4().hex)
        for name, value in names.items():
            obj = obj.replace("{" + name + "}", value)
        return obj
    if isinstance(obj, dict):
        return {fill(k, names): fill(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, names) for v in obj]
    return obj


# Valid bodies (placeholders are filled per request).
ACTION = {"kind": "llm.completion", "name": "test-model"}
RESERVE = {"idempotency_key": "{key}", "subject": {"tenant": "{tenant}"}, "action": ACTION,
           "estimate": {"unit": USD, "amount": 10}}
DECIDE = {"idempotency_key": "{key}", "subject": {"tenant": "{tenant}"}, "action": ACTION,
          "estimate": {"unit": USD, "amount": 10}}
EVENT = {"idempotency_key": "{key}", "subject": {"tenant": "{tenant}"}, "action": ACTION,
         "actual": {"unit": USD, "amount": 10}}
COMMIT = {"idempotency_key": "{key}", "actual": {"unit": USD, "amount": 10}}
RELEASE = {"idempotency_key": "{key}"}
EXTEND = {"idempotency_key": "{key}", "extend_by_ms": 1000}
TENANT_CREATE = {"tenant_id": "t-new-{key}", "name": "new tenant"}
TENANT_PATCH = {"name": "{tenant}"}
API_KEY = {"tenant_id": "{tenant}", "name": "bad-input-key"}
BUDGET = {"tenant_id": "{tenant}", "scope": "tenant:{tenant}/workspace:w{key}", "unit": USD,
          "allocated": {"unit": USD, "amount": 100}}
FUND = {"operation": "CREDIT", "amount": {"unit": USD, "amount": 1}}
FUND_PARAMS = {"tenant_id": "{tenant}", "scope": "tenant:{tenant}", "unit": USD}


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    tenant_auth: bool = True
    admin_auth: bool = False
    permission: str | None = None
    default_auth: str | None = None  # the principal cases use unless they say otherwise


ROUTES = {r.name: r for r in (
    Route("createReservation", "POST", "/v1/reservations", RESERVE, permission="reservations:create"),
    Route("listReservations", "GET", "/v1/reservations", admin_auth=True, permission="reservations:list",
          params={"tenant": "{tenant}"}),
    Route("getReservation", "GET", "/v1/reservations/{rid}", admin_auth=True, permission="reservations:list"),
    Route("commitReservation", "POST", "/v1/reservations/{rid}/commit", COMMIT, permission="reservations:commit"),
    Route("releaseReservation", "POST", "/v1/reservations/{rid}/release", RELEASE, admin_auth=True,
          permission="reservations:release"),
    Route("extendReservation", "POST", "/v1/reservations/{rid}/extend", EXTEND, permission="reservations:extend"),
    Route("decide", "POST", "/v1/decide", DECIDE, permission="reservations:create"),
    Route("getBalances", "GET", "/v1/balances", params={"tenant": "{tenant}"}, permission="balances:read"),
    Route("createEvent", "POST", "/v1/events", EVENT, permission="reservations:commit"),
    Route("createTenant", "POST", "/v1/admin/tenants", TENANT_CREATE, tenant_auth=False, admin_auth=True),
    Route("getTenant", "GET", "/v1/admin/tenants/{tenant}", tenant_auth=False, admin_auth=True),
    Route("updateTenant", "PATCH", "/v1/admin/tenants/{tenant}", TENANT_PATCH, tenant_auth=False, admin_auth=True),
    Route("createApiKey", "POST", "/v1/admin/api-keys", API_KEY, tenant_auth=False, admin_auth=True),
    Route("createBudget", "POST", "/v1/admin/budgets", BUDGET, admin_auth=True, permission="budgets:write",
          default_auth="admin"),
    Route("listBudgets", "GET", "/v1/admin/budgets", admin_auth=True, permission="budgets:read",
          params={"tenant_id": "{tenant}"}, default_auth="admin"),
    Route("fundBudget", "POST", "/v1/admin/budgets/fund", FUND, params=FUND_PARAMS, admin_auth=True,
          permission="budgets:write", default_auth="admin"),
)}
BODY_ROUTES = [r for r in ROUTES.values() if r.body is not None]


@dataclass(frozen=True)
class Case:
    route: str
    status: int
    code: str | tuple[str, ...]
    body: Any = None  # dict (encoded with Raw support) or None for the route's valid body
    content: bytes | None = None  # raw body, wins over `body`
    chunked: bool = False  # send `content` without Content-Length
    params: dict[str, str] | None = None  # replaces the route's params
    headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = None  # None: the route's natural principal (tenant key, else admin key)
    path: str | None = None  # replaces the route's path


# ---------------------------------------------------------------------------------------------
# the world every case runs against


@dataclass
class World:
    server: Server
    tenant: Tenant
    other: Tenant
    rid: str  # an ACTIVE reservation of `tenant`
    rid_key: str  # the idempotency key that created it
    other_rid: str  # an ACTIVE reservation of `other`
    limited_key: str  # a key of `tenant` with balances:read only
    http: httpx.Client  # one keep-alive client without credentials (a new client costs tens of ms)

    def names(self) -> dict[str, str]:
        return {"tenant": self.tenant.tenant_id, "rid": self.rid, "other_tenant": self.other.tenant_id,
                "other_rid": self.other_rid, "rid_key": self.rid_key}

    def headers_for(self, route: Route, auth: str | None) -> dict[str, str]:
        auth = auth or route.default_auth or ("tenant" if route.tenant_auth else "admin")
        return {
            "tenant": {"X-Cycles-API-Key": self.tenant.key},
            "admin": {"X-Admin-API-Key": ADMIN_KEY},
            "none": {},
            "wrong-tenant": {"X-Cycles-API-Key": "cyc_live_" + uuid.uuid4().hex},
            "tampered-tenant": {"X-Cycles-API-Key": self.tenant.key[:-4] + "AAAA"},
            "garbage-tenant": {"X-Cycles-API-Key": "x"},
            "wrong-admin": {"X-Admin-API-Key": ADMIN_KEY + "-wrong"},
            "limited": {"X-Cycles-API-Key": self.limited_key},
            "other": {"X-Cycles-API-Key": self.other.key},
        }[auth]

    def snapshot(self) -> dict[str, Any]:
        """Everything a rejected request must not have changed for the world tenant."""
        tid = self.tenant.tenant_id
        tk, ak = {"X-Cycles-API-Key": self.tenant.key}, {"X-Admin-API-Key": ADMIN_KEY}
        bal = self.http.get("/v1/balances", params={"tenant": tid, "include_children": "true", "limit": 200},
                            headers=tk)
        res = self.http.get("/v1/reservations", params={"limit": 200, "include": "metadata,committed_metadata"},
                            headers=tk)
        budgets = self.http.get("/v1/admin/budgets", params={"tenant_id": tid, "limit": 100}, headers=ak)
        tenant = self.http.get(f"/v1/admin/tenants/{tid}", headers=ak)
        for r in (bal, res, budgets, tenant):
            assert r.status_code == 200, r.text
        return {"balances": bal.json(), "reservations": res.json(), "budgets": budgets.json(),
                "tenant": tenant.json()}


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    tenant = new_tenant(server)
    tenant.budget("", 1_000_000)
    tenant.budget("workspace:ws", 500_000)
    other = new_tenant(server)
    other.budget("", 1_000)
    rid_key = "world-" + uuid.uuid4().hex
    with tenant.client() as c:
        r = c.post("/v1/reservations", json={**fill(RESERVE, {"tenant": tenant.tenant_id}),
                                             "idempotency_key": rid_key, "ttl_ms": 3_600_000})
        assert r.status_code == 200, r.text
        rid = r.json()["reservation_id"]
    with other.client() as c:
        r = c.post("/v1/reservations", json={**fill(RESERVE, {"tenant": other.tenant_id}), "ttl_ms": 3_600_000})
        assert r.status_code == 200, r.text
        other_rid = r.json()["reservation_id"]
    with server.admin() as a:
        r = a.post("/v1/admin/api-keys", json={"tenant_id": tenant.tenant_id, "name": "limited",
                                                "permissions": ["balances:read"]})
        assert r.status_code == 201, r.text
        limited = r.json()["key_secret"]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        yield World(server, tenant, other, rid, rid_key, other_rid, limited, http)


def assert_error(r: httpx.Response, status: int, code: str | tuple[str, ...]) -> dict[str, Any]:
    """The response is the spec's error: status, code, exact body keys, no nulls, correlation headers."""
    assert r.status_code < 500, f"server error {r.status_code}: {r.text}"
    codes = (code,) if isinstance(code, str) else code
    assert r.status_code == status, f"expected {status} {codes}, got {r.status_code}: {r.text}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict), body
    assert set(body) <= ERROR_KEYS, f"unexpected keys {set(body) - ERROR_KEYS}"
    assert {"error", "message", "request_id", "trace_id"} <= set(body), body
    assert all(v is not None for v in body.values()), f"null in error body: {body}"
    assert body["error"] in codes, f"expected {codes}, got {body['error']}: {body['message']}"
    assert body["error"] in ERROR_CODES
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert "details" not in body or isinstance(body["details"], dict)
    assert r.headers.get("x-request-id") == body["request_id"]
    assert r.headers.get("x-cycles-trace-id") == body["trace_id"]
    assert TRACE_RE.match(body["trace_id"]) and body["trace_id"] != "0" * 32, body["trace_id"]
    return body


def send(world: World, case: Case) -> httpx.Response:
    route = ROUTES[case.route]
    names = world.names()
    path = fill(case.path or route.path, names)
    params = fill(case.params if case.params is not None else (route.params or {}), names)
    headers = {**world.headers_for(route, case.auth), **fill(case.headers, names)}
    content: Any = None
    if case.content is not None:
        content = case.content
        if case.chunked:
            data = content
            content = iter([data[i:i + 8192] for i in range(0, len(data), 8192)])
    elif route.body is not None or case.body is not None:
        content = encode(fill(case.body if case.body is not None else route.body, names))
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return world.http.request(route.method, path, params=params, headers=headers, content=content)


def run_case(world: World, case: Case) -> dict[str, Any]:
    before = world.snapshot()
    r = send(world, case)
    body = assert_error(r, case.status, case.code)
    after = world.snapshot()
    assert after["balances"] == before["balances"], "a rejected request changed balances"
    assert after["reservations"] == before["reservations"], "a rejected request changed reservations"
    assert after["budgets"] == before["budgets"], "a rejected request changed budget ledgers"
    assert after["tenant"] == before["tenant"], "a rejected request changed the tenant"
    return body


# ---------------------------------------------------------------------------------------------
# the cases


def P(name: str, case: Case) -> Any:
    return pytest.param(case, id=name)


def generic_body_cases() -> Iterator[Any]:
    """Bodies no endpoint accepts, on every endpoint with a body."""
    big = b'{"idempotency_key": "' + b"k" * (MAX_BODY + 10) + b'"}'
    deep = b"[" * 10_000 + b"]" * 10_000
    deep_obj = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    for route in BODY_ROUTES:
        n = route.name
        yield P(f"{n}-malformed-json", Case(n, 400, BAD, content=b"{bad json"))
        yield P(f"{n}-truncated-json", Case(n, 400, BAD, content=b'{"idempotency_key": "x"'))
        yield P(f"{n}-trailing-garbage", Case(n, 400, BAD, content=encode(route.body)[:-1] + b"} trailing"))
        yield P(f"{n}-empty-body", Case(n, 400, BAD, content=b""))
        yield P(f"{n}-whitespace-body", Case(n, 400, BAD, content=b"   \n"))
        for label, raw in (("array", b"[]"), ("null", b"null"), ("string", b'"x"'), ("number", b"1"),
                           ("bool", b"true")):
            yield P(f"{n}-non-object-{label}", Case(n, 400, BAD, content=raw))
        yield P(f"{n}-invalid-utf8", Case(n, 400, BAD, content=b'{"idempotency_key": "\xff\xfe"}'))
        yield P(f"{n}-over-64KiB", Case(n, 400, BAD, content=big))
        yield P(f"{n}-over-64KiB-chunked", Case(n, 400, BAD, content=big, chunked=True))
        yield P(f"{n}-deep-array-10000", Case(n, 400, BAD, content=deep))
        yield P(f"{n}-deep-object-10000", Case(n, 400, BAD, content=deep_obj))
        yield P(f"{n}-unknown-field", Case(n, 400, BAD, body=with_(route.body, "bogus_field", 1)))


def amount_cases(route: str, base: dict[str, Any], fld: str) -> Iterator[Any]:
    """Bad Amount objects at `fld`."""
    for label, value in (
        ("float-1.5", 1.5), ("float-1.0", Raw("1.0")), ("float-1e6", Raw("1e6")), ("float-0.0", Raw("0.0")),
        ("bool-true", True), ("bool-false", False), ("negative", -1), ("int64-max-plus-1", Raw(str(INT64_MAX + 1))),
        ("huge-int", Raw("1" + "0" * 30)), ("string", "10"), ("null", None), ("missing", DELETE),
        ("object", {"v": 1}),
    ):
        yield P(f"{route}-{fld}-amount-{label}", Case(route, 400, BAD, body=with_(base, f"{fld}.amount", value)))
    for label, value in (("unknown", "EUR"), ("lowercase", "usd_microcents"), ("number", 3), ("null", None),
                         ("missing", DELETE)):
        yield P(f"{route}-{fld}-unit-{label}", Case(route, 400, BAD, body=with_(base, f"{fld}.unit", value)))
    yield P(f"{route}-{fld}-not-object", Case(route, 400, BAD, body=with_(base, fld, 10)))
    yield P(f"{route}-{fld}-missing", Case(route, 400, BAD, body=with_(base, fld, DELETE)))
    yield P(f"{route}-{fld}-unknown-field", Case(route, 400, BAD, body=with_(base, f"{fld}.currency", "USD")))


def key_cases(route: str, base: dict[str, Any]) -> Iterator[Any]:
    for label, value in (("empty", ""), ("257-chars", "k" * 257), ("number", 5), ("null", None),
                         ("missing", DELETE)):
        yield P(f"{route}-idempotency-key-{label}", Case(route, 400, BAD, body=with_(base, "idempotency_key", value)))


def metadata_cases(route: str, base: dict[str, Any]) -> Iterator[Any]:
    yield P(f"{route}-metadata-deep-array", Case(route, 400, BAD, body=with_(base, "metadata", {
        "x": Raw("[" * 10_000 + "]" * 10_000)})))
    yield P(f"{route}-metadata-deep-object", Case(route, 400, BAD, body=with_(base, "metadata", Raw(
        '{"a":' * 10_000 + "1" + "}" * 10_000))))
    yield P(f"{route}-metadata-list", Case(route, 400, BAD, body=with_(base, "metadata", [1, 2])))
    yield P(f"{route}-metadata-string", Case(route, 400, BAD, body=with_(base, "metadata", "x")))


def subject_action_cases(route: str, base: dict[str, Any]) -> Iterator[Any]:
    for label, value in (
        ("129-chars", "a" * 129), ("space", "a b"), ("slash", "a/b"), ("colon", "a:b"), ("non-ascii", "é"),
        ("trailing-newline", "{tenant}\n"), ("empty", ""), ("number", 5),
    ):
        yield P(f"{route}-subject-tenant-{label}", Case(route, 400, BAD, body=with_(base, "subject.tenant", value)))
    for level in ("workspace", "app", "workflow", "agent", "toolset"):
        yield P(f"{route}-subject-{level}-trailing-newline",
                Case(route, 400, BAD, body=with_(base, f"subject.{level}", "w1\n")))
        yield P(f"{route}-subject-{level}-129-chars",
                Case(route, 400, BAD, body=with_(base, f"subject.{level}", "w" * 129)))
        yield P(f"{route}-subject-{level}-bad-charset",
                Case(route, 400, BAD, body=with_(base, f"subject.{level}", "w*w")))
    yield P(f"{route}-subject-tenant-null-only", Case(route, 400, BAD, body=with_(base, "subject", {"tenant": None})))
    yield P(f"{route}-subject-only-dimensions",
            Case(route, 400, BAD, body=with_(base, "subject", {"dimensions": {"region": "eu"}})))
    yield P(f"{route}-subject-empty", Case(route, 400, BAD, body=with_(base, "subject", {})))
    yield P(f"{route}-subject-string", Case(route, 400, BAD, body=with_(base, "subject", "{tenant}")))
    yield P(f"{route}-subject-missing", Case(route, 400, BAD, body=with_(base, "subject", DELETE)))
    yield P(f"{route}-subject-unknown-level", Case(route, 400, BAD, body=with_(base, "subject.region", "eu")))
    yield P(f"{route}-subject-17-dimensions", Case(route, 400, BAD, body=with_(
        base, "subject.dimensions", {f"d{i}": "v" for i in range(17)})))
    yield P(f"{route}-subject-dimension-key-65", Case(route, 400, BAD, body=with_(
        base, "subject.dimensions", {"k" * 65: "v"})))
    yield P(f"{route}-subject-dimension-value-257", Case(route, 400, BAD, body=with_(
        base, "subject.dimensions", {"k": "v" * 257})))
    yield P(f"{route}-subject-dimension-value-number", Case(route, 400, BAD, body=with_(
        base, "subject.dimensions", {"k": 1})))
    yield P(f"{route}-subject-other-tenant", Case(route, 403, FORBID, body=with_(base, "subject.tenant",
                                                                                "{other_tenant}")))
    yield P(f"{route}-action-kind-65", Case(route, 400, BAD, body=with_(base, "action.kind", "k" * 65)))
    yield P(f"{route}-action-kind-number", Case(route, 400, BAD, body=with_(base, "action.kind", 1)))
    yield P(f"{route}-action-name-257", Case(route, 400, BAD, body=with_(base, "action.name", "n" * 257)))
    yield P(f"{route}-action-name-missing", Case(route, 400, BAD, body=with_(base, "action.name", DELETE)))
    yield P(f"{route}-action-11-tags", Case(route, 400, BAD, body=with_(base, "action.tags",
                                                                        [f"t{i}" for i in range(11)])))
    yield P(f"{route}-action-tag-65", Case(route, 400, BAD, body=with_(base, "action.tags", ["t" * 65])))
    yield P(f"{route}-action-unknown-field", Case(route, 400, BAD, body=with_(base, "action.risk", "high")))
    yield P(f"{route}-action-missing", Case(route, 400, BAD, body=with_(base, "action", DELETE)))


def runtime_body_cases() -> Iterator[Any]:
    n = "createReservation"
    yield from key_cases(n, RESERVE)
    yield from amount_cases(n, RESERVE, "estimate")
    yield from subject_action_cases(n, RESERVE)
    yield from metadata_cases(n, RESERVE)
    for fld, label, value in (
        ("ttl_ms", "999", 999), ("ttl_ms", "86400001", 86_400_001), ("ttl_ms", "float", 1500.5),
        ("ttl_ms", "float-1.0", Raw("1000.0")), ("ttl_ms", "string", "1000"), ("ttl_ms", "negative", -1000),
        ("grace_period_ms", "negative", -1), ("grace_period_ms", "60001", 60_001), ("grace_period_ms", "bool", True),
        ("overage_policy", "unknown", "NOPE"), ("overage_policy", "lowercase", "reject"),
        ("overage_policy", "number", 1), ("dry_run", "string", "true"), ("dry_run", "number", 1),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(RESERVE, fld, value)))

    n = "decide"
    yield from key_cases(n, DECIDE)
    yield from amount_cases(n, DECIDE, "estimate")
    yield from subject_action_cases(n, DECIDE)
    yield from metadata_cases(n, DECIDE)
    yield P(f"{n}-ttl-not-a-decide-field", Case(n, 400, BAD, body=with_(DECIDE, "ttl_ms", 1000)))
    yield P(f"{n}-dry-run-not-a-decide-field", Case(n, 400, BAD, body=with_(DECIDE, "dry_run", True)))

    n = "createEvent"
    yield from key_cases(n, EVENT)
    yield from amount_cases(n, EVENT, "actual")
    yield from subject_action_cases(n, EVENT)
    yield from metadata_cases(n, EVENT)
    for fld, label, value in (
        ("overage_policy", "unknown", "NOPE"), ("client_time_ms", "negative", -1), ("client_time_ms", "float", 1.5),
        ("client_time_ms", "string", "now"), ("metrics.tokens_input", "float", 1.5),
        ("metrics.tokens_output", "negative", -1), ("metrics.latency_ms", "bool", True),
        ("metrics.model_version", "129-chars", "m" * 129), ("metrics.unknown", "unknown-field", 1),
        ("metrics", "not-object", 5),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(EVENT, fld, value)))

    n = "commitReservation"
    yield from key_cases(n, COMMIT)
    yield from amount_cases(n, COMMIT, "actual")
    yield from metadata_cases(n, COMMIT)
    for fld, label, value in (("metrics.tokens_input", "float", 1.0), ("metrics.custom", "list", [1]),
                              ("metrics.unknown", "unknown-field", 1)):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(COMMIT, fld, value)))
    yield P(f"{n}-actual-unit-mismatch", Case(n, 400, "UNIT_MISMATCH", body=with_(COMMIT, "actual.unit", "TOKENS")))

    n = "releaseReservation"
    yield from key_cases(n, RELEASE)
    for label, value in (("257-chars", "r" * 257), ("number", 5), ("object", {"a": 1})):
        yield P(f"{n}-reason-{label}", Case(n, 400, BAD, body=with_(RELEASE, "reason", value)))
    yield P(f"{n}-metadata-not-a-release-field", Case(n, 400, BAD, body=with_(RELEASE, "metadata", {})))

    n = "extendReservation"
    yield from key_cases(n, EXTEND)
    yield from metadata_cases(n, EXTEND)
    for label, value in (("zero", 0), ("negative", -1), ("86400001", 86_400_001), ("float-1.5", 1.5),
                         ("float-1.0", Raw("1000.0")), ("float-1e6", Raw("1e6")), ("bool", True),
                         ("string", "1000"), ("null", None), ("missing", DELETE),
                         ("int64-max-plus-1", Raw(str(INT64_MAX + 1)))):
        yield P(f"{n}-extend-by-ms-{label}", Case(n, 400, BAD, body=with_(EXTEND, "extend_by_ms", value)))


def header_key_cases() -> Iterator[Any]:
    """X-Idempotency-Key present and different from body.idempotency_key (§IDEMPOTENCY)."""
    for n in ("createReservation", "decide", "createEvent", "commitReservation", "releaseReservation",
              "extendReservation"):
        yield P(f"{n}-idempotency-header-mismatch",
                Case(n, 400, BAD, body=with_(ROUTES[n].body, "idempotency_key", "body-key"),
                     headers={"X-Idempotency-Key": "header-key"}))
        yield P(f"{n}-idempotency-header-case-differs",
                Case(n, 400, BAD, body=with_(ROUTES[n].body, "idempotency_key", "Key-A"),
                     headers={"X-Idempotency-Key": "key-a"}))


def reservation_id_cases() -> Iterator[Any]:
    long_id = "r" * 129
    for n, suffix in (("getReservation", ""), ("commitReservation", "/commit"), ("releaseReservation", "/release"),
                      ("extendReservation", "/extend")):
        yield P(f"{n}-unknown-id", Case(n, 404, NOTFOUND, path=f"/v1/reservations/rsv_{'0' * 24}{suffix}"))
        yield P(f"{n}-unknown-id-odd-chars", Case(n, 404, NOTFOUND, path=f"/v1/reservations/no%20such%20id{suffix}"))
        yield P(f"{n}-id-129-chars", Case(n, 400, BAD, path=f"/v1/reservations/{long_id}{suffix}"))
        yield P(f"{n}-id-5000-chars", Case(n, 400, BAD, path=f"/v1/reservations/{'r' * 5000}{suffix}"))
        yield P(f"{n}-other-tenants-reservation", Case(n, 403, FORBID, path=f"/v1/reservations/{{other_rid}}{suffix}"))
    # the idempotency key of the world reservation reused with a different payload
    yield P("createReservation-idempotency-mismatch",
            Case("createReservation", 409, "IDEMPOTENCY_MISMATCH",
                 body=with_(with_(RESERVE, "idempotency_key", "{rid_key}"), "estimate.amount", 11)))


def garbage_cursors() -> Iterator[tuple[str, str]]:
    def b64(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    yield "not-base64", "!!!not a cursor!!!"
    yield "base64-not-json", base64.urlsafe_b64encode(b"\x00\xffgarbage").decode()
    yield "json-list", b64([1, 2])
    yield "json-empty-object", b64({})
    yield "other-filters", b64({"f": "0000000000000000", "id": "x", "v": 1, "s": "x", "u": "x", "k": ["a", "b", "c"]})
    yield "very-long", "A" * 5000


def query_cases() -> Iterator[Any]:
    n = "listReservations"
    base = {"tenant": "{tenant}"}
    for label, value in (("0", "0"), ("abc", "abc"), ("10000", "10000"), ("201", "201"), ("negative", "-1"),
                         ("float", "1.5"), ("huge", "9" * 40)):
        yield P(f"{n}-limit-{label}", Case(n, 400, BAD, params={**base, "limit": value}))
    for label, value in (("unknown", "PENDING"), ("lowercase", "active")):
        yield P(f"{n}-status-{label}", Case(n, 400, BAD, params={**base, "status": value}))
    yield P(f"{n}-sort-by-unknown", Case(n, 400, BAD, params={**base, "sort_by": "amount; DROP TABLE"}))
    yield P(f"{n}-sort-dir-unknown", Case(n, 400, BAD, params={**base, "sort_dir": "sideways"}))
    for lo, hi in (("from", "to"), ("expires_from", "expires_to"), ("finalized_from", "finalized_to")):
        yield P(f"{n}-{lo}-after-{hi}", Case(n, 400, BAD, params={
            **base, lo: "2026-01-02T00:00:00Z", hi: "2026-01-01T00:00:00Z"}))
        for name in (lo, hi):
            for label, value in (("garbage", "yesterday"), ("month-13", "2026-13-01T00:00:00Z"),
                                 ("five-digit-year", "20261-01-01T00:00:00Z"), ("epoch-ms", "1767225600000"),
                                 ("bad-offset", "2026-01-01T00:00:00+25:00")):
                yield P(f"{n}-{name}-{label}", Case(n, 400, BAD, params={**base, name: value}))
    for label, value in garbage_cursors():
        yield P(f"{n}-cursor-{label}", Case(n, 400, BAD, params={**base, "cursor": value}))
    yield P(f"{n}-tenant-129", Case(n, 400, BAD, params={"tenant": "t" * 129}))
    yield P(f"{n}-idempotency-key-257", Case(n, 400, BAD, params={**base, "idempotency_key": "k" * 257}))
    yield P(f"{n}-workspace-129", Case(n, 400, BAD, params={**base, "workspace": "w" * 129}))
    yield P(f"{n}-other-tenant", Case(n, 403, FORBID, params={"tenant": "{other_tenant}"}))
    yield P(f"{n}-admin-without-tenant", Case(n, 400, BAD, params={}, auth="admin"))

    n = "getBalances"
    yield P(f"{n}-no-subject-filter", Case(n, 400, BAD, params={}))
    yield P(f"{n}-only-include-children", Case(n, 400, BAD, params={"include_children": "true"}))
    yield P(f"{n}-blank-subject-filters", Case(n, 400, BAD, params={"tenant": "", "workspace": ""}))
    yield P(f"{n}-only-dimension-like-filter", Case(n, 400, BAD, params={"region": "eu"}))
    for label, value in (("0", "0"), ("abc", "abc"), ("201", "201"), ("10000", "10000"), ("float", "2.0")):
        yield P(f"{n}-limit-{label}", Case(n, 400, BAD, params={"tenant": "{tenant}", "limit": value}))
    yield P(f"{n}-include-children-maybe", Case(n, 400, BAD, params={"tenant": "{tenant}", "include_children": "maybe"}))
    for label, value in garbage_cursors():
        yield P(f"{n}-cursor-{label}", Case(n, 400, BAD, params={"tenant": "{tenant}", "cursor": value}))
    yield P(f"{n}-other-tenant", Case(n, 403, FORBID, params={"tenant": "{other_tenant}"}))
    yield P(f"{n}-workspace-129", Case(n, 400, BAD, params={"workspace": "w" * 129}))

    n = "listBudgets"
    base = {"tenant_id": "{tenant}"}
    for label, value in (("0", "0"), ("101", "101"), ("abc", "abc"), ("negative", "-5"), ("float", "1.5")):
        yield P(f"{n}-limit-{label}", Case(n, 400, BAD, params={**base, "limit": value}, auth="admin"))
    for fld, value in (("unit", "EUR"), ("status", "DELETED"), ("over_limit", "maybe"), ("has_debt", "2")):
        yield P(f"{n}-{fld}-bad", Case(n, 400, BAD, params={**base, fld: value}, auth="admin"))
    for label, value in garbage_cursors():
        yield P(f"{n}-cursor-{label}", Case(n, 400, BAD, params={**base, "cursor": value}, auth="admin"))
    yield P(f"{n}-scope-prefix-1025", Case(n, 400, BAD, params={**base, "scope_prefix": "s" * 1025}, auth="admin"))
    yield P(f"{n}-tenant-id-65", Case(n, 400, BAD, params={"tenant_id": "t" * 65}, auth="admin"))
    yield P(f"{n}-tenant-key-limit-0", Case(n, 400, BAD, params={"limit": "0"}, auth="tenant"))


def admin_cases() -> Iterator[Any]:
    n = "createTenant"
    for label, value in (("too-short", "ab"), ("uppercase", "Upper-Case"), ("65-chars", "t" * 65),
                         ("underscore", "bad_tenant"), ("trailing-newline", "t-newline-{key}\n"), ("number", 12345),
                         ("empty", ""), ("missing", DELETE)):
        yield P(f"{n}-tenant-id-{label}", Case(n, 400, BAD, body=with_(TENANT_CREATE, "tenant_id", value)))
    for fld, label, value in (
        ("name", "missing", DELETE), ("name", "number", 5), ("name", "257-chars", "n" * 257),
        ("default_commit_overage_policy", "unknown", "NOPE"), ("default_reservation_ttl_ms", "999", 999),
        ("default_reservation_ttl_ms", "float", 1500.5), ("max_reservation_ttl_ms", "too-big", 86_400_001),
        ("max_reservation_extensions", "negative", -1), ("max_reservation_extensions", "bool", True),
        ("reservation_expiry_policy", "unknown", "NOPE"), ("metadata", "non-string-value", {"k": 5}),
        ("metadata", "33-entries", {f"k{i}": "v" for i in range(33)}), ("parent_tenant_id", "65-chars", "p" * 65),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(TENANT_CREATE, fld, value)))
    yield P(f"{n}-existing-id-other-name", Case(n, 409, "DUPLICATE_RESOURCE", body={
        "tenant_id": "{tenant}", "name": "a different name"}))

    n = "updateTenant"
    for fld, label, value in (
        ("status", "unknown", "DELETED"), ("status", "lowercase", "closed"), ("status", "null-string", "null"),
        ("name", "number", 5), ("name", "257-chars", "n" * 257), ("tenant_id", "not-patchable", "other"),
        ("default_reservation_ttl_ms", "zero", 0), ("max_reservation_extensions", "float", 1.5),
        ("default_commit_overage_policy", "unknown", "NOPE"), ("metadata", "list", ["a"]),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(TENANT_PATCH, fld, value)))
    yield P(f"{n}-unknown-tenant", Case(n, 404, (NOTFOUND, "TENANT_NOT_FOUND"),
                                        path="/v1/admin/tenants/no-such-tenant-x"))
    yield P(f"{n}-tenant-id-300-chars", Case(n, 404, (NOTFOUND, "TENANT_NOT_FOUND"),
                                             path="/v1/admin/tenants/" + "t" * 300))

    n = "getTenant"
    yield P(f"{n}-unknown-tenant", Case(n, 404, (NOTFOUND, "TENANT_NOT_FOUND"),
                                        path="/v1/admin/tenants/no-such-tenant-x"))
    yield P(f"{n}-tenant-id-300-chars", Case(n, 404, (NOTFOUND, "TENANT_NOT_FOUND"),
                                             path="/v1/admin/tenants/" + "t" * 300))
    yield P(f"{n}-tenant-id-odd-chars", Case(n, 404, (NOTFOUND, "TENANT_NOT_FOUND"),
                                             path="/v1/admin/tenants/%C3%A9%00x"))

    n = "createApiKey"
    for fld, label, value in (
        ("tenant_id", "missing", DELETE), ("tenant_id", "bad-pattern", "Bad Tenant"),
        ("tenant_id", "trailing-newline", "{tenant}\n"),
        ("tenant_id", "unknown", "no-such-tenant-x"), ("name", "missing", DELETE), ("name", "number", 1),
        ("permissions", "unknown", ["reservations:create", "root:everything"]), ("permissions", "string", "all"),
        ("permissions", "65-entries", ["balances:read"] * 65), ("expires_at", "garbage", "tomorrow"),
        ("expires_at", "past", "2000-01-01T00:00:00Z"), ("expires_at", "65-chars", "2" * 65),
        ("scope_filter", "65-entries", ["tenant:x"] * 65), ("description", "1025-chars", "d" * 1025),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, BAD, body=with_(API_KEY, fld, value)))

    n = "createBudget"
    for label, value in (
        ("no-tenant-level", "workspace:x"), ("other-tenant", "tenant:{other_tenant}"),
        ("bad-charset", "tenant:{tenant}/workspace:a b"), ("empty-segment", "tenant:{tenant}//app:x"),
        ("out-of-order", "tenant:{tenant}/app:x/workspace:y"), ("repeated-level", "tenant:{tenant}/app:x/app:y"),
        ("unknown-level", "tenant:{tenant}/region:eu"), ("leading-space", " tenant:{tenant}/workspace:x"),
        ("newline-inside", "tenant:{tenant}/workspace:x\n/app:y"), ("trailing-slash", "tenant:{tenant}/"),
        ("empty", ""), ("1025-chars", "tenant:{tenant}/workspace:" + "w" * 1010), ("value-129", "tenant:{tenant}/workspace:" + "w" * 129),
    ):
        yield P(f"{n}-scope-{label}", Case(n, 400, BAD, body=with_(BUDGET, "scope", value), auth="admin"))
    yield from amount_cases(n, BUDGET, "allocated")
    for fld, label, value, code in (
        ("unit", "unknown", "EUR", BAD), ("allocated.unit", "mismatch", "TOKENS", "UNIT_MISMATCH"),
        ("overdraft_limit", "unit-mismatch", {"unit": "TOKENS", "amount": 5}, "UNIT_MISMATCH"),
        ("overdraft_limit", "float", {"unit": USD, "amount": 5.5}, BAD),
        ("overdraft_limit", "negative", {"unit": USD, "amount": -5}, BAD),
        ("commit_overage_policy", "unknown", "NOPE", BAD), ("rollover_policy", "unknown", "NOPE", BAD),
        ("tenant_id", "missing-with-admin-key", DELETE, BAD), ("tenant_id", "bad-pattern", "Not Valid", BAD),
        ("tenant_id", "trailing-newline", "{tenant}\n", BAD),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, code, body=with_(BUDGET, fld, value), auth="admin"))
    # the spec's 400 ("Invalid scope or tenant not found"), the same answer as createApiKey's
    yield P(f"{n}-unknown-tenant", Case(n, 400, BAD, body={
        **BUDGET, "tenant_id": "no-such-tenant-x", "scope": "tenant:no-such-tenant-x"}, auth="admin"))
    yield P(f"{n}-duplicate", Case(n, 409, "DUPLICATE_RESOURCE", body=with_(BUDGET, "scope", "tenant:{tenant}"),
                                   auth="admin"))
    yield P(f"{n}-tenant-key-with-tenant-id", Case(n, 400, BAD, body=BUDGET, auth="tenant"))

    n = "fundBudget"
    for label, params in (
        ("missing-scope", {"tenant_id": "{tenant}", "unit": USD}),
        ("missing-unit", {"tenant_id": "{tenant}", "scope": "tenant:{tenant}"}),
        ("missing-tenant-id", {"scope": "tenant:{tenant}", "unit": USD}),
        ("unknown-unit", {**FUND_PARAMS, "unit": "EUR"}),
        ("lowercase-unit", {**FUND_PARAMS, "unit": "usd_microcents"}),
        ("bad-scope", {**FUND_PARAMS, "scope": "tenant:{tenant}/workspace:a b"}),
        ("other-tenants-scope", {**FUND_PARAMS, "scope": "tenant:{other_tenant}"}),
        ("scope-1025", {**FUND_PARAMS, "scope": "s" * 1025}),
        ("tenant-id-65", {**FUND_PARAMS, "tenant_id": "t" * 65}),
    ):
        yield P(f"{n}-params-{label}", Case(n, 400, BAD, params=params))
    yield P(f"{n}-no-budget-at-scope", Case(n, 404, (NOTFOUND, "BUDGET_NOT_FOUND"),
                                            params={**FUND_PARAMS, "scope": "tenant:{tenant}/workspace:nobudget"}))
    yield P(f"{n}-tenant-key-bad-scope", Case(n, 400, BAD, auth="tenant", params={
        "scope": "tenant:{tenant}/workspace:a b", "unit": USD}))
    yield P(f"{n}-tenant-key-other-tenants-scope", Case(n, 400, BAD, auth="tenant", params={
        "scope": "tenant:{other_tenant}", "unit": USD}))
    yield from amount_cases(n, FUND, "amount")
    for fld, label, value, code in (
        ("operation", "unknown", "TRANSFER", BAD), ("operation", "lowercase", "credit", BAD),
        ("operation", "missing", DELETE, BAD), ("amount.unit", "mismatch", "TOKENS", "UNIT_MISMATCH"),
        ("spent", "unit-mismatch", {"unit": "TOKENS", "amount": 1}, "UNIT_MISMATCH"),
        ("spent", "float", {"unit": USD, "amount": 1.5}, BAD), ("reason", "513-chars", "r" * 513, BAD),
        ("idempotency_key", "empty", "", BAD), ("idempotency_key", "257-chars", "k" * 257, BAD),
        ("amount.amount", "credit-overflows-int64", INT64_MAX, BAD),
    ):
        yield P(f"{n}-{fld}-{label}", Case(n, 400, code, body=with_(FUND, fld, value)))
    yield P(f"{n}-debit-beyond-remaining", Case(n, 409, "BUDGET_EXCEEDED", body={
        "operation": "DEBIT", "amount": {"unit": USD, "amount": 10**15}}))


def auth_cases() -> Iterator[Any]:
    for route in ROUTES.values():
        n = route.name
        yield P(f"{n}-no-auth-header", Case(n, 401, UNAUTH, auth="none"))
        if route.tenant_auth:
            yield P(f"{n}-unknown-tenant-key", Case(n, 401, UNAUTH, auth="wrong-tenant"))
            yield P(f"{n}-tampered-tenant-key", Case(n, 401, UNAUTH, auth="tampered-tenant"))
            yield P(f"{n}-garbage-tenant-key", Case(n, 401, UNAUTH, auth="garbage-tenant"))
        else:
            # tenant keys are not accepted on operator-only routes
            yield P(f"{n}-tenant-key-on-admin-route", Case(n, 401, (UNAUTH, FORBID), auth="tenant"))
        if route.admin_auth:
            yield P(f"{n}-wrong-admin-key", Case(n, 401, UNAUTH, auth="wrong-admin"))
        else:
            yield P(f"{n}-admin-key-on-tenant-route", Case(n, 401, (UNAUTH, FORBID), auth="admin"))
        if route.permission and route.permission != "balances:read":
            yield P(f"{n}-missing-permission", Case(n, 403, FORBID, auth="limited"))


ALL_CASES = [*generic_body_cases(), *runtime_body_cases(), *header_key_cases(), *reservation_id_cases(),
             *query_cases(), *admin_cases(), *auth_cases()]


def test_case_ids_are_unique() -> None:
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_input(world: World, case: Case) -> None:
    run_case(world, case)


# ---------------------------------------------------------------------------------------------
# things that look odd but are valid: they must be accepted


def test_same_key_same_payload_replays(world: World) -> None:
    """Control for the IDEMPOTENCY_MISMATCH case: the identical request replays without holding again."""
    before = world.snapshot()
    body = {**fill(RESERVE, world.names()), "idempotency_key": world.rid_key, "ttl_ms": 3_600_000}
    with world.tenant.client() as c:
        r = c.post("/v1/reservations", json=body, headers={"X-Idempotency-Key": world.rid_key})
    assert r.status_code == 200, r.text
    assert r.json()["reservation_id"] == world.rid
    assert world.snapshot() == before


def test_world_reservation_still_active(world: World) -> None:
    """The reservation every case aimed at survived them all (cases are order-independent)."""
    with world.tenant.client() as c:
        r = c.get(f"/v1/reservations/{world.rid}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ACTIVE"


@pytest.mark.parametrize("params", [
    {"from": ""}, {"to": ""}, {"from": "  ", "to": ""}, {"expires_from": "", "expires_to": " "},
    {"finalized_from": "", "finalized_to": ""}, {"from": "", "to": "2100-01-01T00:00:00Z"},
    {"limit": ""}, {"status": ""}, {"sort_by": "", "sort_dir": ""}, {"cursor": ""},
], ids=lambda p: "-".join(f"{k}={v.strip() or 'blank'}" for k, v in p.items()))
def test_blank_query_values_are_unset(world: World, params: dict[str, str]) -> None:
    with world.tenant.client() as c:
        r = c.get("/v1/reservations", params=params)
        baseline = c.get("/v1/reservations", params={k: v for k, v in params.items() if v.strip()})
    assert r.status_code == 200, r.text
    assert baseline.status_code == 200, baseline.text
    assert r.json() == baseline.json()
    assert world.rid in [x["reservation_id"] for x in r.json()["reservations"]]


def test_blank_balance_filters_are_unset(world: World) -> None:
    with world.tenant.client() as c:
        r = c.get("/v1/balances", params={"tenant": world.tenant.tenant_id, "workspace": "", "limit": "",
                                          "cursor": "", "include_children": ""})
    assert r.status_code == 200, r.text
    assert [b["scope"] for b in r.json()["balances"]] == [f"tenant:{world.tenant.tenant_id}"]


@pytest.mark.parametrize("size,status", [(MAX_BODY, 200), (MAX_BODY + 1, 400)], ids=["exactly-64KiB", "64KiB-plus-1"])
def test_body_size_boundary(world: World, size: int, status: int) -> None:
    body = fill(DECIDE, world.names())
    body["metadata"] = {"pad": ""}
    raw = encode(body)
    body["metadata"]["pad"] = "p" * (size - len(raw))
    raw = encode(body)
    assert len(raw) == size
    with world.tenant.client() as c:
        r = c.post("/v1/decide", content=raw, headers={"Content-Type": "application/json"})
    if status == 200:
        assert r.status_code == 200, r.text
        assert r.json()["decision"] == "ALLOW"
    else:
        assert_error(r, 400, BAD)


def test_subject_at_limits_is_accepted(world: World) -> None:
    body = fill(DECIDE, world.names())
    body["subject"] = {"tenant": world.tenant.tenant_id.upper(), "workspace": "w" * 128,
                       "dimensions": {f"d{i}": "v" * 256 for i in range(16)}}
    body["action"] = {"kind": "k" * 64, "name": "n" * 256, "tags": ["t" * 64] * 10}
    body["idempotency_key"] = "k" * 256
    with world.tenant.client() as c:
        r = c.post("/v1/decide", json=body, headers={"X-Idempotency-Key": "k" * 256})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# correlation ids (§CORRELATION AND TRACING)

TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FLAT_TRACE = "0af7651916cd43dd8448eb211c80319c"


def _tp(trace: str = TP_TRACE, span: str = "00f067aa0ba902b7", version: str = "00", flags: str = "01") -> str:
    return f"{version}-{trace}-{span}-{flags}"


def _probe(world: World, headers: dict[str, str], kind: str) -> httpx.Response:
    headers = {"X-Cycles-API-Key": world.tenant.key, **headers}
    if kind == "ok":
        r = world.http.get("/v1/balances", params={"tenant": world.tenant.tenant_id}, headers=headers)
        assert r.status_code == 200, r.text
    else:
        r = world.http.get("/v1/balances", headers=headers)  # no subject filter: 400
        assert_error(r, 400, BAD)
    return r


def _trace_of(r: httpx.Response) -> str:
    header = r.headers.get("x-cycles-trace-id")
    assert header is not None and TRACE_RE.match(header), header
    if r.status_code >= 400:
        assert r.json()["trace_id"] == header
    return header


@pytest.mark.parametrize("kind", ["ok", "error"])
def test_valid_traceparent_wins_over_flat_header(world: World, kind: str) -> None:
    r = _probe(world, {"traceparent": _tp(), "X-Cycles-Trace-Id": FLAT_TRACE}, kind)
    assert _trace_of(r) == TP_TRACE


@pytest.mark.parametrize("kind", ["ok", "error"])
def test_valid_traceparent_alone(world: World, kind: str) -> None:
    assert _trace_of(_probe(world, {"traceparent": _tp()}, kind)) == TP_TRACE


MALFORMED_TRACEPARENTS = {
    "garbage": "not-a-traceparent",
    "empty": "",
    "uppercase-hex": _tp(trace=TP_TRACE.upper()),
    "short-trace-id": _tp(trace=TP_TRACE[:31]),
    "long-trace-id": _tp(trace=TP_TRACE + "0"),
    "all-zero-trace-id": _tp(trace="0" * 32),
    "all-zero-span-id": _tp(span="0" * 16),
    "short-span-id": _tp(span="00f067aa0ba902b"),
    "version-ff": _tp(version="ff"),
    "non-hex": _tp(trace="g" * 32),
    "missing-flags": f"00-{TP_TRACE}-00f067aa0ba902b7",
    "extra-field": _tp() + "-extra",
}


@pytest.mark.parametrize("kind", ["ok", "error"])
@pytest.mark.parametrize("name", list(MALFORMED_TRACEPARENTS))
def test_malformed_traceparent_falls_through_to_flat_header(world: World, name: str, kind: str) -> None:
    r = _probe(world, {"traceparent": MALFORMED_TRACEPARENTS[name], "X-Cycles-Trace-Id": FLAT_TRACE}, kind)
    assert _trace_of(r) == FLAT_TRACE


@pytest.mark.parametrize("kind", ["ok", "error"])
@pytest.mark.parametrize("name", ["all-zero-trace-id", "all-zero-span-id", "garbage"])
def test_malformed_traceparent_alone_generates(world: World, name: str, kind: str) -> None:
    r = _probe(world, {"traceparent": MALFORMED_TRACEPARENTS[name]}, kind)
    trace = _trace_of(r)
    assert trace not in (TP_TRACE, "0" * 32)


MALFORMED_FLAT = {
    "all-zero": "0" * 32, "uppercase": FLAT_TRACE.upper(), "short": FLAT_TRACE[:31], "long": FLAT_TRACE + "a",
    "non-hex": "z" * 32, "with-dashes": "0af76519-16cd-43dd-8448-eb211c80319c", "empty": "",
}


@pytest.mark.parametrize("kind", ["ok", "error"])
@pytest.mark.parametrize("name", list(MALFORMED_FLAT))
def test_malformed_flat_trace_id_is_ignored(world: World, name: str, kind: str) -> None:
    value = MALFORMED_FLAT[name]
    r = _probe(world, {"X-Cycles-Trace-Id": value}, kind)
    trace = _trace_of(r)
    assert trace not in ("0" * 32, FLAT_TRACE, value)


def test_all_zero_traceparent_and_flat_generate_fresh_ids(world: World) -> None:
    seen = set()
    for _ in range(5):
        r = _probe(world, {"traceparent": _tp(trace="0" * 32), "X-Cycles-Trace-Id": "0" * 32}, "error")
        seen.add(_trace_of(r))
    assert "0" * 32 not in seen
    assert len(seen) == 5, "generated trace ids must be fresh per request"


@pytest.mark.parametrize("kind", ["ok", "error"])
def test_flat_header_used_without_traceparent(world: World, kind: str) -> None:
    assert _trace_of(_probe(world, {"X-Cycles-Trace-Id": FLAT_TRACE}, kind)) == FLAT_TRACE


def test_generated_ids_on_every_route(world: World) -> None:
    """No correlation headers sent: every route's response (success or error) carries fresh ids."""
    request_ids, trace_ids = set(), set()
    for route in ROUTES.values():
        for auth in ("none", None):
            case = Case(route.name, 0, BAD, auth=auth)
            if route.method != "GET" and auth is None:
                continue  # do not run valid mutations against the world
            r = send(world, case)
            assert r.status_code < 500, r.text
            trace = r.headers.get("x-cycles-trace-id")
            rid = r.headers.get("x-request-id")
            assert trace and TRACE_RE.match(trace) and trace != "0" * 32, (route.name, trace)
            assert rid, route.name
            if r.status_code >= 400:
                assert r.json()["trace_id"] == trace and r.json()["request_id"] == rid
            request_ids.add(rid)
            trace_ids.add(trace)
    # unrouted paths and wrong methods are answered the same way
    with httpx.Client(base_url=world.server.base_url, timeout=30) as c:
        for method, path, status in (("GET", "/v1/no-such-route", 404), ("DELETE", "/v1/reservations", 405),
                                     ("PUT", "/v1/decide", 405)):
            r = c.request(method, path)
            assert r.status_code == status, r.text
            body = r.json()
            assert set(body) <= ERROR_KEYS and all(v is not None for v in body.values())
            assert TRACE_RE.match(r.headers["x-cycles-trace-id"]) and body["trace_id"] == r.headers["x-cycles-trace-id"]
            assert body["request_id"] == r.headers["x-request-id"]
            request_ids.add(body["request_id"])
            trace_ids.add(body["trace_id"])
    n = len(ROUTES) + sum(1 for r in ROUTES.values() if r.method == "GET") + 3
    assert len(request_ids) == n and len(trace_ids) == n, "ids must be unique per request"
