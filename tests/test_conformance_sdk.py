"""`cycles conformance sdk`: the recovery scenarios run our SDK through the fault proxy against the real
session server, the report validates against client-recovery/report.schema.json, the claimed level follows
from the results, and an SDK broken in one way fails the scenario that covers it."""

from __future__ import annotations

import uuid

import pytest

from cycles.client import recovery
from cycles.conformance import sdk
from support import Server

FAST = ["CR-CORE-001", "CR-DURABLE-004", "CR-DURABLE-007", "CR-BOUNDARY-001"]  # the full run: docs/conformance.md


@pytest.fixture
def sqlite_server(server: Server, store_kind: str) -> Server:
    if store_kind != "sqlite":
        pytest.skip("the SDK's recovery does not depend on the server's store: one store is enough")
    return server


def test_sdk_scenarios_pass_and_report_validates(sqlite_server: Server) -> None:
    report = sdk.run_sdk(sqlite_server.base_url, sqlite_server.admin_key, "test-commit", only=FAST)
    assert sdk.schema_errors(report) == []
    failed = {s["id"]: s.get("diagnostic") for s in report["scenarios"] if not s["passed"]}
    assert failed == {}
    assert [s["id"] for s in report["scenarios"]] == FAST
    assert all(s["native_tests"] and s["native_tests"][0].startswith("cycles.conformance.sdk_scenarios:")
               for s in report["scenarios"])
    # a subset cannot support a durable claim: the level is derived, not asserted
    assert report["claim"] == "core" and sdk.claim_holds(report) and not sdk.claim_holds(report, complete=True)
    assert report["profile"]["catalog_sha256"] == sdk.catalog_sha256() and report["profile"]["version"] == "0.3"


def test_claim_follows_results() -> None:
    def res(level: str, passed: bool) -> dict:
        return {"id": f"CR-{level.upper()}-001", "level": level, "name": "n", "passed": passed, "native_tests": ["t"]}

    everything = [dict(res(s["level"], True), id=s["id"]) for s in sdk.catalog()["scenarios"]]
    assert sdk.claimed_level(everything) == "durable"
    assert sdk.claimed_level(everything[:-1]) == "core"  # one scenario missing: no durable claim
    assert sdk.claimed_level([res("core", True), res("durable", False), res("boundary", True)]) == "core"
    report = sdk.build_report([res("core", False), res("boundary", True)], "c", None)
    assert report["claim"] == "core" and not sdk.claim_holds(report) and report["summary"]["failed"] == 1


def test_an_sdk_that_changes_its_key_on_retry_fails_cr_core_001(sqlite_server: Server, monkeypatch) -> None:
    real_retry = recovery.retry

    def fresh_key_retry(record, *args, **kwargs):  # the bug: every retry is a new settlement
        if record.commit_body:
            record.commit_body = dict(record.commit_body, idempotency_key=f"retry-{uuid.uuid4().hex}")
        return real_retry(record, *args, **kwargs)

    monkeypatch.setattr(recovery, "retry", fresh_key_retry)
    report = sdk.run_sdk(sqlite_server.base_url, sqlite_server.admin_key, only=["CR-CORE-001"])
    [s] = report["scenarios"]
    assert not s["passed"] and "different idempotency keys" in s["diagnostic"]
    assert not sdk.claim_holds(report) and sdk.schema_errors(report) == []
