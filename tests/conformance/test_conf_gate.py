"""Self-checks of the conformance harness: the SDK is isolated in its own venv, and the response gate
(drivers/validate.py, the SDK's own validators) really rejects the violations it is meant to catch."""

from __future__ import annotations

import copy
import importlib.util
import subprocess

import pytest

from .conftest import SDK_VERSION, validate_exchanges


def test_sdk_is_isolated_in_its_own_virtualenv(sdk_python):
    assert importlib.util.find_spec("runcycles") is None, "runcycles must not be importable next to our package"
    probe = ("import importlib.util, runcycles; "
             "print(runcycles.__version__, importlib.util.find_spec('cycles') is None)")
    out = subprocess.run([sdk_python, "-c", probe], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [SDK_VERSION, "True"]


def _mutations(create, commit):
    """(label, list of exchanges) pairs, each a real recorded exchange broken in one way."""
    def mutate(ex, fn, status=None):
        ex = copy.deepcopy(ex)
        fn(ex["response_json"])
        if status is not None:
            ex["status"] = status
        return ex

    def set_(key, value):
        return lambda body: body.__setitem__(key, value)

    return [
        ("create answered 201", mutate(create, lambda b: None, status=201)),
        ("unknown field in create", mutate(create, set_("server_debug", "x"))),
        ("null caps in create", mutate(create, set_("caps", None))),
        ("float amount in create", mutate(create, lambda b: b["reserved"].__setitem__("amount", 1000.0))),
        ("float remaining_ttl_ms", mutate(create, set_("remaining_ttl_ms", 59000.0))),
        ("null nested in balance", mutate(commit, lambda b: b["balances"][0].__setitem__("debt", None))),
        ("commit released null", mutate(commit, set_("released", None))),
        ("commit answered 201", mutate(commit, lambda b: None, status=201)),
        ("commit without charged", mutate(commit, lambda b: b.pop("charged"))),
        ("error body with extra key", mutate(create, lambda b: (b.clear(), b.update(
            error="BUDGET_EXCEEDED", message="m", request_id=create["response_headers"]["x-request-id"],
            trace_id=create["response_headers"]["x-cycles-trace-id"], server_debug="x")), status=409)),
        ("error body without trace_id", mutate(create, lambda b: (b.clear(), b.update(
            error="BUDGET_EXCEEDED", message="m", request_id=create["response_headers"]["x-request-id"])),
            status=409)),
        ("error body with unknown code", mutate(create, lambda b: (b.clear(), b.update(
            error="TOTALLY_NEW", message="m", request_id=create["response_headers"]["x-request-id"],
            trace_id=create["response_headers"]["x-cycles-trace-id"])), status=409)),
        ("server error", mutate(create, lambda b: (b.clear(), b.update(
            error="INTERNAL_ERROR", message="m", request_id=create["response_headers"]["x-request-id"],
            trace_id=create["response_headers"]["x-cycles-trace-id"])), status=500)),
    ]


def test_gate_rejects_each_violation(sdk, tenant, sdk_python, tmp_path):
    tenant.budget("", 1_000_000)
    out = sdk.run("decorator", mode="happy", estimate=1000, actual=700)
    assert out["error"] is None
    recorded = sdk.proxy.dump()
    create = next(e for e in recorded if e["path"] == "/v1/reservations")
    commit = next(e for e in recorded if e["path"].endswith("/commit"))

    clean = validate_exchanges(sdk_python, recorded, tmp_path / "clean")
    assert clean["checked"] == 2 and clean["problems"] == []
    assert clean["kinds"] == {"create": 1, "commit": 1}

    mutations = _mutations(create, commit)
    broken = []
    for i, (label, ex) in enumerate(mutations):
        ex["seq"] = i
        broken.append(ex)
    report = validate_exchanges(sdk_python, broken, tmp_path / "broken")
    flagged = {p["seq"] for p in report["problems"]}
    missed = [label for i, (label, _) in enumerate(mutations) if i not in flagged]
    assert missed == [], f"the gate let these through: {missed}"


@pytest.mark.xfail(strict=True, reason=(
    "Known conflict, shown with trace_id forced into error bodies (CYCLES_ERROR_TRACE_ID=1, the session server's "
    "setting; the default leaves it out for this SDK: test_conf_default_errors): cycles-protocol-v0 (CORRELATION "
    "AND TRACING) says ErrorResponse bodies MUST carry trace_id, but runcycles 0.5.3's ErrorResponse model has "
    "extra='forbid', so "
    "CyclesResponse.get_error_response() returns None for our error bodies and SDK exceptions lose "
    "request_id and details (error_code still comes from the raw 'error' field). If this starts passing, "
    "the server dropped trace_id or the SDK learned it: revisit the trace_id handling in drivers/validate.py."))
def test_sdk_parses_our_error_bodies_completely(sdk, tenant):
    tenant.budget("", 500)
    out = sdk.run("lowlevel", case="error_parse")
    assert out["create"]["status"] == 409 and out["create"]["body"]["error"] == "BUDGET_EXCEEDED"
    # what works despite the conflict
    assert out["exception"] is not None and out["exception"]["error_code"] == "BUDGET_EXCEEDED"
    # what the conflict breaks
    assert out["parsed"] is not None
    assert out["exception"]["request_id"] == out["create"]["headers"]["x-request-id"]
