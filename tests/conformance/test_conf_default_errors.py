"""A server with default settings and the published runcycles 0.5.3: every error classified out of the box.

By default (errors_compat.trace_in_error_body) an error body leaves trace_id out for the SDK's request
signature (User-Agent python-httpx/*, no trace headers), so its strict ErrorResponse parses; every other
client gets the spec's body, and the X-Cycles-Trace-Id header always carries the id.

These tests need src/cycles/server/http.py to ask errors_compat (see README, Decisions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from support import Server, reserve_body, start_server

from .test_conf_decorator import run_reject_overage

TRACE = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def server(store_kind: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    from conftest import store_url

    tmp: Path = tmp_path_factory.mktemp(f"default-errors-{store_kind}")
    # literally the default: CYCLES_ERROR_TRACE_ID unset (support.start_server sets it for the other tests)
    srv = start_server(store_url(store_kind, tmp, request), tmp, extra_env={"CYCLES_ERROR_TRACE_ID": None})
    srv.no_trace_in_errors = True  # every recorded exchange comes from the SDK: no trace_id in its error bodies
    yield srv
    srv.stop()


def test_trace_id_left_out_for_the_sdk_signature_only(server: Server, tenant) -> None:
    tenant.budget("", 500)
    body = reserve_body(tenant, 1000)
    for agent, traced in [("python-httpx/0.28.1", False), ("curl/8.5.0", True), ("cycles-python-sdk", True)]:
        r = httpx.post(server.base_url + "/v1/reservations", json={**body, "idempotency_key": agent},
                       headers={"X-Cycles-API-Key": tenant.key, "User-Agent": agent})
        assert r.status_code == 409 and r.json()["error"] == "BUDGET_EXCEEDED", r.text
        assert TRACE.match(r.headers["x-cycles-trace-id"])
        assert ("trace_id" in r.json()) is traced, (agent, r.json())
        if traced:
            assert r.json()["trace_id"] == r.headers["x-cycles-trace-id"]
    # the SDK's agent with trace context: a trace-aware caller gets the spec's body
    r = httpx.post(server.base_url + "/v1/reservations", json={**body, "idempotency_key": "traced"},
                   headers={"X-Cycles-API-Key": tenant.key, "X-Cycles-Trace-Id": "ab" * 16})
    assert r.json()["trace_id"] == "ab" * 16


def test_sdk_parses_error_bodies_by_default(sdk, tenant):
    tenant.budget("", 500)
    out = sdk.run("lowlevel", case="error_parse")
    assert out["create"]["status"] == 409 and out["create"]["body"]["error"] == "BUDGET_EXCEEDED"
    assert out["parsed"] is not None and out["parsed"]["error"] == "BUDGET_EXCEEDED"
    assert out["parsed"]["request_id"] == out["create"]["headers"]["x-request-id"]
    assert out["exception"]["error_code"] == "BUDGET_EXCEEDED"
    assert str(out["exception"]["request_id"]).startswith("req_")


def test_reservation_finalized_is_classified_and_not_retried(sdk, tenant):
    tenant.budget("", 100_000)
    out = sdk.run("decorator", mode="finalized", estimate=1000, actual=700)
    assert out["error"] is None and out["result"] == "done" and out["release_status"] == 200, out
    commits = sdk.proxy.calls("POST", suffix="/commit")
    assert [(c.status, c.error) for c in commits] == [(409, "RESERVATION_FINALIZED")], sdk.proxy.summary()
    assert out["journal_files"] == [], "RESERVATION_FINALIZED is final: nothing to journal"
    assert "unclassifiable" not in out["_stderr"]


def test_reject_overage_commit_is_sent_only_once(sdk, tenant):
    run_reject_overage(sdk, tenant)
    assert len(sdk.proxy.calls("POST", suffix="/commit")) == 1, sdk.proxy.summary()
