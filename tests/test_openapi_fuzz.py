"""Schemathesis against a real `cycles serve` (SQLite, loopback): the OpenAPI document is exact.

Every operation is fuzzed from the served /openapi.json with the tenant key and with the admin key, in
positive and negative modes; every response must be documented (status code, content type, headers,
body schema) and none may be a 5xx. Then the stateful phase follows the document's links and must
cover reserve → commit / release / extend. CYCLES_FUZZ_EXAMPLES (default 3 examples per operation, mode
and key) and CYCLES_FUZZ_STEPS (default 30 stateful scenarios) run it deeper; docs/security.md.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from typing import Any, Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis import checks as core_checks
from schemathesis.specs.openapi import checks as oa_checks

from support import ADMIN_KEY, Server, new_tenant, start_server

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CYCLES_FUZZ_EXAMPLES", "3"))
SCENARIOS = int(os.environ.get("CYCLES_FUZZ_STEPS", "30"))
CHECKS = [core_checks.not_a_server_error, oa_checks.status_code_conformance, oa_checks.content_type_conformance,
          oa_checks.response_headers_conformance, oa_checks.response_schema_conformance,
          oa_checks.negative_data_rejection]
TENANT_PERMISSIONS = ["reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
                      "reservations:list", "balances:read", "budgets:read", "budgets:write", "policies:read",
                      "policies:write", "webhooks:read", "webhooks:write", "events:read"]
# Turning the bootstrap key off would end the admin half of the run; its own tests cover it.
# the event streams stay open for minutes (tests/test_dashboard_api.py covers them)
NOT_FUZZED = {"disableBootstrapKey", "streamEvents", "streamTenantEvents"}
UNITS = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")


class Target:
    def __init__(self, server: Server, tenant_id: str, tenant_key: str, links: Any = None) -> None:
        self.server, self.tenant_id, self.tenant_key = server, tenant_id, tenant_key
        self.links = links  # the stateful half's tenant

    def headers(self, kind: str) -> dict[str, str]:
        return {"X-Cycles-API-Key": self.tenant_key} if kind == "tenant" else {"X-Admin-API-Key": ADMIN_KEY}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A server of its own: the admin half changes global settings (webhook security, bulk actions)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    # A low failed-auth limit: the fuzzer's bogus keys then meet the throttle's 429 + Retry-After too.
    server = start_server(f"sqlite:///{tmp / 'cycles.db'}", tmp, extra_env={"CYCLES_AUTH_FAILURES_PER_MINUTE": "5"})
    try:
        tenant = new_tenant(server, TENANT_PERMISSIONS, tenant_id=f"fuzz-{uuid.uuid4().hex[:8]}")
        # The stateful half's tenant, with budgets the stateless half never debits or freezes; its key is
        # used once now: after the fuzzer's bogus keys the failed-auth throttle refuses this source any key
        # it has not verified yet (429 for a minute), which would starve the walk of every link.
        links = new_tenant(server, TENANT_PERMISSIONS, tenant_id=f"links-{uuid.uuid4().hex[:8]}")
        for t in (tenant, links):
            for unit in UNITS:
                t.budget("", 10**15, unit)
            with t.client() as c:
                assert c.get("/v1/balances", params={"tenant": t.tenant_id}).status_code == 200
        yield Target(server, tenant.tenant_id, tenant.key, links)
    finally:
        server.stop()


def load(target: Target, kind: str, pins: dict[str, Any] | None = None) -> Any:
    schema = schemathesis.openapi.from_url(target.server.base_url + "/openapi.json")
    schema.config.update(headers=target.headers(kind), request_timeout=30,
                         # The tenant the key acts on (a tenant key may name only its own; the admin key must
                         # name one): the fuzzer then reaches the operations' logic instead of 403/404.
                         parameters={"tenant": target.tenant_id, "tenant_id": target.tenant_id,
                                     "body.subject.tenant": target.tenant_id,
                                     # the admin key names the tenant its creates act for (a tenant key must not)
                                     **({"body.tenant_id": target.tenant_id} if kind == "admin" else {}),
                                     **(pins or {})})
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=EXAMPLES)
    scheme = "ApiKeyAuth" if kind == "tenant" else "AdminKeyAuth"

    def selected(ctx: Any) -> bool:
        raw = ctx.operation.definition.raw
        security = [name for req in raw.get("security", []) for name in req]
        # public operations (evidence, health) in the tenant-key run
        return raw.get("operationId") not in NOT_FUZZED and (scheme in security or (kind == "tenant" and not security))

    return schema.include(func=selected)


def fuzz_operation(operation: Any, mode: GenerationMode) -> str | None:
    """Run the checks on EXAMPLES generated requests of one operation; the failure's text, if any."""
    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure of every operation is reported together
        return f"{operation.label} [{mode.value}]:\n{describe(exc)}"
    return None


def describe(exc: BaseException) -> str:
    """The leaf failures of a (possibly nested) exception group, e.g. Hypothesis' FlakyFailure."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "\n".join(describe(e) for e in inner)
    return f"{type(exc).__name__}: {exc}"[:3000]


@pytest.mark.parametrize("kind", ["tenant", "admin"])
def test_every_operation_answers_as_documented(target: Target, kind: str) -> None:
    api = load(target, kind)
    failures, tested = [], 0
    for result in api.get_all_operations():
        operation = result.ok()
        tested += 1
        security = {name for req in operation.definition.raw.get("security", []) for name in req}
        # Schema-invalid input is refused before the key matters: an operation both keys may call
        # gets its negative examples in the tenant-key run only (the budget of the suite).
        negative = kind == "tenant" or "ApiKeyAuth" not in security
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:2 if negative else 1]:
            failure = fuzz_operation(operation, mode)
            if failure:
                failures.append(failure)
    assert tested > 20
    assert not failures, f"{len(failures)} of {tested} operations failed:\n\n" + "\n\n".join(failures)


def whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole(v) for v in value]
    return value


def test_stateful_links_cover_the_reservation_lifecycle(target: Target) -> None:
    tenant = target.links
    # The reservation operations only, so the budgeted scenarios are spent on the lifecycle's links.
    api = load(Target(target.server, tenant.tenant_id, tenant.key), "tenant", {"body.dry_run": False})
    # (an exclude: a second include widens the selection of load()'s include instead of narrowing it)
    api = api.exclude(func=lambda ctx: not ctx.operation.path.startswith("/v1/reservations"))
    seen: Counter[str] = Counter()
    failures: list[str] = []

    class Machine(api.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            # JSON Schema counts 129.0 as an integer and schemathesis sends it; the server refuses it
            # (documented, and checked by the stateless half). Here it would only starve the links.
            case.body = whole(case.body)
            # The documented rule no schema can state: a sent X-Idempotency-Key equals the body's key.
            # (the header is optional: one that differs is left out).
            if case.headers and isinstance(case.body, dict) and \
                    case.headers.get("X-Idempotency-Key") != case.body.get("idempotency_key"):
                case.headers.pop("X-Idempotency-Key", None)

        def step(self, input: Any) -> Any:
            if input.transition is not None and input.is_applied:
                seen[input.transition.id] += 1
            return super().step(input)

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            try:
                case.validate_response(response, checks=CHECKS[:5])
            except BaseException as exc:  # kept: a replay below may end in a different error
                failures.append(f"{case.operation.label}:\n{describe(exc)}")
                raise

    def covered(op: str) -> bool:
        return any(k.startswith("POST /v1/reservations ->") and f"] {op} ->" in k for k in seen)

    lifecycle = ("commitReservation", "releaseReservation", "extendReservation")
    # The walk is random (the server's ids differ on every run): a run that happens to miss a link is
    # followed by another, up to three, so coverage does not hang on one draw.
    for _ in range(3):
        try:
            Machine.run(settings=hypothesis.settings(max_examples=SCENARIOS, deadline=None, database=None,
                                                     phases=[hypothesis.Phase.generate], stateful_step_count=6,
                                                     suppress_health_check=list(hypothesis.HealthCheck)))
        except hypothesis.errors.FlakyStrategyDefinition:
            pass  # schemathesis' adaptive link weights differ when Hypothesis replays; findings are in `failures`
        assert not failures, "\n\n".join(failures)
        if all(covered(op) for op in lifecycle):
            break
    for op in lifecycle:
        assert covered(op), (op, seen)


def test_document_states_what_the_server_enforces() -> None:
    """The facts a fuzzer needs, checked on the document itself (fast; the fuzzing above checks them
    against the server)."""
    from cycles.server import openapi

    doc = openapi.build()
    ops = {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}
    for op_id, op in ops.items():
        if op["security"]:
            assert op["responses"]["429"]["headers"]["Retry-After"]["required"], op_id
    links = ops["createReservation"]["responses"]["200"]["links"]
    for target in ("getReservation", "commitReservation", "releaseReservation", "extendReservation"):
        assert links[target]["parameters"] == {"reservation_id": "$response.body#/reservation_id"}
    params = {p["name"]: p for p in ops["listReservations"]["parameters"]}
    assert params["tenant"]["x-required-with"] == ["AdminKeyAuth"]
    assert params["limit"]["schema"]["anyOf"][0] == {"type": "integer", "format": "int64", "minimum": 1,
                                                      "maximum": 200}
    assert params["status"]["schema"]["enum"] == ["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED", ""]
    lookup = {p["name"]: p for p in ops["lookupBudget"]["parameters"]}
    assert lookup["scope"]["required"] and lookup["unit"]["required"]
    assert lookup["unit"]["schema"]["enum"] == list(UNITS)
    integers: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                integers.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert integers and all(node.get("format") == "int64" for node in integers)
    subject = doc["components"]["schemas"]["Subject"]
    levels = ("tenant", "workspace", "app", "workflow", "agent", "toolset")
    assert [b["required"] for b in subject["anyOf"]] == [[level] for level in levels]
    scope = re.compile(openapi.TENANT_SCOPE_PATTERN)
    assert scope.search("tenant:acme/workspace:prod/agent:a1")
    for bad in ("workspace:prod", "tenant:acme/agent:a/workspace:w", "tenant:acme/", "tenant:a//app:b"):
        assert not scope.search(bad), bad
