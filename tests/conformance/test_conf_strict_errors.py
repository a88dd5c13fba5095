"""`cycles serve --no-error-trace-id`: error bodies exactly as runcycles 0.5.3's strict ErrorResponse wants.

The spec puts trace_id in every error body; the published SDK forbids unknown keys there. These tests
run the SDK against a server started in the compatibility mode, where the same cases that are known
failures against the default server (test_conf_gate / test_conf_decorator xfails) pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support import Server, start_server

from .test_conf_decorator import run_reject_overage


@pytest.fixture(scope="module")
def server(store_kind: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    from conftest import store_url

    tmp: Path = tmp_path_factory.mktemp(f"strict-errors-{store_kind}")
    srv = start_server(store_url(store_kind, tmp, request), tmp, extra_env={"CYCLES_ERROR_TRACE_ID": "0"})
    srv.no_trace_in_errors = True  # the proxy's response check expects bodies without trace_id
    yield srv
    srv.stop()


def test_sdk_parses_error_bodies_completely(sdk, tenant):
    tenant.budget("", 500)
    out = sdk.run("lowlevel", case="error_parse")
    assert out["create"]["status"] == 409 and out["create"]["body"]["error"] == "BUDGET_EXCEEDED"
    assert "trace_id" not in out["create"]["body"]
    assert out["parsed"] is not None
    assert out["parsed"]["request_id"] == out["create"]["headers"]["x-request-id"]
    # the decorator's own create is a second request: its exception now carries that request's id
    assert out["exception"]["error_code"] == "BUDGET_EXCEEDED"
    assert str(out["exception"]["request_id"]).startswith("req_")


def test_reject_overage_commit_is_sent_only_once(sdk, tenant):
    run_reject_overage(sdk, tenant)
    assert len(sdk.proxy.calls("POST", suffix="/commit")) == 1, sdk.proxy.summary()
