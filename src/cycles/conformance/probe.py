"""What every check uses: HTTP calls recorded as evidence, schema validation of each answer against the spec,
results keyed by requirement, and the budgets a check may spend (isolated ones with an admin key)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from . import specdocs
from .requirements import Requirement, req

PASS, FAIL, NA, UNTESTED = "pass", "fail", "not_applicable", "could_not_test"
UNIT = "USD_MICROCENTS"
OTHER_UNIT = "TOKENS"
USER_AGENT = "cycles-conformance/1"
TENANT_PERMISSIONS = [
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "webhooks:read", "webhooks:write", "events:read",
]
_REDACT = {"x-cycles-api-key", "x-admin-api-key", "authorization"}


class Untestable(Exception):
    """The check cannot run here (missing key, refused provisioning); the reason is reported."""


@dataclass
class Exchange:
    method: str
    path: str
    status: int
    headers: httpx.Headers
    content: bytes
    request_headers: dict[str, str]
    request_body: Any
    schema_errors: list[str] = field(default_factory=list)
    elapsed_ms: int = 0

    @property
    def body(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError:
            return None

    @property
    def error(self) -> str | None:
        b = self.body
        return b.get("error") if isinstance(b, dict) else None

    def evidence(self, expected: str) -> dict[str, Any]:
        text = self.content.decode("utf-8", "replace")
        return {
            "request": {"method": self.method, "path": self.path, "headers": self.request_headers,
                        "body": self.request_body},
            "response": {"status": self.status,
                         "headers": {k: v for k, v in self.headers.items()
                                     if k.lower().startswith("x-") or k.lower() in ("content-type", "retry-after")},
                         "body": text if len(text) <= 2000 else text[:2000] + "…"},
            "expected": expected,
            **({"schema_errors": self.schema_errors} if self.schema_errors else {}),
        }


@dataclass
class Finding:
    requirement: Requirement
    status: str
    detail: str
    evidence: list[dict[str, Any]] = field(default_factory=list)
    check: str = ""


class Context:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None, tenant: str | None,
                 run_id: str, timeout: float = 15.0, concurrency: int = 16,
                 webhook_url: str = "https://example.com/cycles/hook") -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_key = admin_key
        self.tenant = tenant
        self.run_id = run_id
        self.timeout = timeout
        self.concurrency = concurrency
        self.webhook_url = webhook_url
        self.findings: list[Finding] = []
        self.check_name = ""
        self.schema_checked = 0
        self.provisioned = False
        self.other_tenant: tuple[str, str] | None = None  # (tenant id, key) made for isolation checks
        self.cleanup: list[Callable[[], None]] = []
        self.spent_on_shared = 0
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers={"User-Agent": USER_AGENT})

    def close(self) -> None:
        self._http.close()

    # ---------------------------------------------------------------- HTTP

    def call(self, method: str, path: str, *, key: str | None = "tenant", json_body: Any = None,
             params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             validate: bool = True, client: httpx.Client | None = None) -> Exchange:
        """`key`: "tenant", "admin", None (no key) or a literal key value."""
        hdrs = dict(headers or {})
        if key == "tenant":
            if not self.api_key:
                raise Untestable("needs a tenant API key")
            hdrs["X-Cycles-API-Key"] = self.api_key
        elif key == "admin":
            if not self.admin_key:
                raise Untestable("needs --admin-key")
            hdrs["X-Admin-API-Key"] = self.admin_key
        elif key is not None:
            hdrs["X-Cycles-API-Key"] = key
        started = time.monotonic()
        resp = (client or self._http).request(method, path, json=json_body, params=params, headers=hdrs)
        ex = Exchange(method, resp.request.url.raw_path.decode(), resp.status_code, resp.headers,
                      resp.content, {k: ("<redacted>" if k.lower() in _REDACT else v) for k, v in hdrs.items()},
                      json_body, elapsed_ms=int((time.monotonic() - started) * 1000))
        if validate:
            self.validate(ex)
        return ex

    def validate(self, ex: Exchange) -> None:
        template = specdocs.match_template(ex.method, ex.path.split("?")[0])
        if template is None:
            return
        ref = specdocs.response_schema_ref(ex.method, template, ex.status)
        if ref is None or not ex.content:
            return
        body = ex.body
        self.schema_checked += 1
        if body is None:
            ex.schema_errors = ["the body is not JSON"]
        else:
            ex.schema_errors = specdocs.errors_against(ref, body)
        if ex.schema_errors:
            self.fail("shared Amount, Subject, Balance",
                      f"{ex.method} {template} {ex.status}: the body does not match the spec's schema", ex,
                      f"a body valid against {ref}")

    # ---------------------------------------------------------------- results

    def record(self, fragment: str, status: str, detail: str, evidence: list[dict[str, Any]] | None = None) -> None:
        self.findings.append(Finding(req(fragment), status, detail, evidence or [], self.check_name))

    def ok(self, fragment: str, detail: str = "") -> None:
        self.record(fragment, PASS, detail)

    def fail(self, fragment: str, detail: str, ex: Exchange | None = None, expected: str = "") -> None:
        self.record(fragment, FAIL, detail, [ex.evidence(expected)] if ex is not None else [])

    def expect(self, fragment: str, ex: Exchange, status: int, error: str | None = None, what: str = "") -> bool:
        """Pass/fail `fragment` on the answer's status (and error code); True when it matched."""
        want = f"HTTP {status}" + (f" error={error}" if error else "")
        if ex.status == status and (error is None or ex.error == error):
            self.ok(fragment, f"{what}: {want}" if what else want)
            return True
        got = f"HTTP {ex.status}" + (f" error={ex.error}" if ex.error else "")
        self.fail(fragment, f"{what}: expected {want}, got {got}" if what else f"expected {want}, got {got}", ex, want)
        return False

    # ---------------------------------------------------------------- provisioning

    def provision(self) -> None:
        """With an admin key: a tenant named for the run and a key for it (unless one was given). With a tenant
        key alone, the tenant is --tenant or what introspection reports (`tenant_id`, where the server says)."""
        if not self.admin_key:
            if not self.tenant:
                ex = self.call("GET", "/v1/auth/introspect", validate=False)
                tenant = (ex.body or {}).get("tenant_id") if ex.status == 200 else None
                if not isinstance(tenant, str) or not tenant:
                    raise Untestable("the key's tenant is unknown: give --tenant")
                self.tenant = tenant
            return
        tenant = self.tenant or f"conformance-{self.run_id}"
        ex = self.call("POST", "/v1/admin/tenants", key="admin", json_body={"tenant_id": tenant, "name": tenant},
                       validate=False)
        if ex.status not in (200, 201):
            raise Untestable(f"could not create tenant {tenant}: HTTP {ex.status} {ex.content[:200]!r}")
        if not self.api_key or not self.tenant:
            self.api_key = self._new_key(tenant)
        self.tenant = tenant
        self.provisioned = True

    def _new_key(self, tenant: str) -> str:
        ex = self.call("POST", "/v1/admin/api-keys", key="admin", validate=False,
                       json_body={"tenant_id": tenant, "name": f"conformance {self.run_id}",
                                  "permissions": TENANT_PERMISSIONS})
        if ex.status != 201 or not (ex.body or {}).get("key_secret"):
            raise Untestable(f"could not create an API key: HTTP {ex.status} {ex.content[:200]!r}")
        return ex.body["key_secret"]

    def second_tenant(self) -> tuple[str, str]:
        if self.other_tenant is None:
            if not self.admin_key:
                raise Untestable("needs --admin-key to create a second tenant")
            tid = f"conformance-{self.run_id}-b"
            ex = self.call("POST", "/v1/admin/tenants", key="admin", json_body={"tenant_id": tid, "name": tid},
                           validate=False)
            if ex.status not in (200, 201):
                raise Untestable(f"could not create tenant {tid}: HTTP {ex.status}")
            self.other_tenant = (tid, self._new_key(tid))
        return self.other_tenant

    def budget(self, name: str, amount: int, unit: str = UNIT, *, parent: dict[str, str] | None = None,
               level: str = "workspace", overdraft_limit: int | None = None,
               overage_policy: str | None = None) -> dict[str, str]:
        """A fresh budget of `amount` at its own scope; returns the subject that targets it."""
        if not self.provisioned:
            raise Untestable("needs --admin-key to create an isolated budget")
        subject = dict(parent or {"tenant": self.tenant})
        subject[level] = f"{name}-{uuid.uuid4().hex[:6]}" if parent is None else name
        scope = "/".join(f"{k}:{v}" for k, v in subject.items())
        body: dict[str, Any] = {"tenant_id": self.tenant, "scope": scope, "unit": unit,
                                "allocated": {"unit": unit, "amount": amount}}
        if overdraft_limit is not None:
            body["overdraft_limit"] = {"unit": unit, "amount": overdraft_limit}
        if overage_policy is not None:
            body["commit_overage_policy"] = overage_policy
        ex = self.call("POST", "/v1/admin/budgets", key="admin", json_body=body, validate=False)
        if ex.status not in (200, 201):
            raise Untestable(f"could not create a budget at {scope}: HTTP {ex.status} {ex.content[:300]!r}")
        return subject

    def shared_subject(self, need: int) -> dict[str, str]:
        """Tenant key only: the subject of an existing budget with at least `need` remaining."""
        ex = self.call("GET", "/v1/balances", params={"tenant": self.tenant, "include_children": "true",
                                                      "limit": 200} if self.tenant else {"limit": 200})
        for b in (ex.body or {}).get("balances", []) if ex.status == 200 else []:
            if b.get("remaining", {}).get("unit") == UNIT and b["remaining"].get("amount", 0) >= need * 4:
                subject = dict(part.split(":", 1) for part in b["scope"].split("/"))
                self.tenant = self.tenant or subject.get("tenant")
                return subject
        raise Untestable(f"no existing {UNIT} budget with {need * 4} remaining (give --admin-key to create one)")

    def subject_for(self, name: str, amount: int, small: int) -> dict[str, str]:
        """An isolated budget when provisioning is possible, else an existing one spending at most `small`."""
        if self.provisioned:
            return self.budget(name, amount)
        subject = self.shared_subject(small)
        self.spent_on_shared += small
        return subject

    def balance(self, subject: dict[str, str], unit: str = UNIT) -> dict[str, Any]:
        scope = "/".join(f"{k}:{v}" for k, v in subject.items())
        ex = self.call("GET", "/v1/balances", params={"tenant": subject["tenant"], "include_children": "true",
                                                      "limit": 200})
        for b in (ex.body or {}).get("balances", []) if ex.status == 200 else []:
            if b.get("scope") == scope and b.get("remaining", {}).get("unit") == unit:
                return b
        raise Untestable(f"GET /v1/balances did not list {scope} ({ex.status})")


def reserve_body(subject: dict[str, str], amount: int, unit: str = UNIT, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"idempotency_key": f"conf-{uuid.uuid4().hex}", "subject": subject,
                            "action": {"kind": "llm.completion", "name": "conformance"},
                            "estimate": {"unit": unit, "amount": amount}}
    body.update(extra)
    return body


def key() -> str:
    return f"conf-{uuid.uuid4().hex}"


def amount_of(balance: dict[str, Any], field_: str) -> int:
    return int((balance.get(field_) or {}).get("amount", 0))


__all__ = ["Context", "Exchange", "Finding", "Untestable", "reserve_body", "key", "amount_of"]
