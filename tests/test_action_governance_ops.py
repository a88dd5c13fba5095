"""v0.1.26 action governance, the operator side, on every store: the admin overview's governance fields,
sampled observed_allowed events, X-Cycles-Deprecated-Kind, a counter reset's expiry and the close cascade's
per_run counts. One server per store with the operator settings these need (a sample rate, custom kinds)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from cycles.core import actions as A
from cycles.store.base import ReserveCommand

from support import Server, Tenant, new_tenant, start_server
from test_action_governance import USD, clocked, counters, events_of, policy, reserve  # noqa: F401

CUSTOM = [{"kind": "custom.acme.mail.send", "risk_class": "external_side_effect"},
          {"kind": "custom.acme.mail.legacy", "risk_class": "external_side_effect", "deprecated": True,
           "replacement_kind": "custom.acme.mail.send"}]
tuned_group = pytest.mark.xdist_group("governance-tuned")  # one tuned server per store, not one per worker


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def tuned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"gov-ops-{request.param}")
    url = (f"sqlite:///{tmp / 'g.db'}" if request.param == "sqlite"
           else request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/11")
    srv = start_server(url, tmp, extra_env={A.SAMPLE_RATE_ENV: "0.25", A.CUSTOM_KINDS_ENV: json.dumps(CUSTOM)})
    yield srv
    srv.stop()


def overview(server: Server) -> dict[str, Any]:
    from cycles.conformance import specdocs

    with server.admin() as c:
        r = c.get("/v1/admin/overview")
    assert r.status_code == 200, r.text
    body = r.json()
    # the governance spec's AdminOverviewResponse (its objects forbid members they do not name)
    assert specdocs.errors_against(specdocs.schema_ref(specdocs.ADMIN, "AdminOverviewResponse"), body) == []
    return body


@tuned_group
def test_overview_counts_governance(tuned: Server) -> None:
    before = overview(tuned)
    shadow, denier, quota = new_tenant(tuned), new_tenant(tuned), new_tenant(tuned)
    with tuned.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{shadow.tenant_id}", json={"observe_mode": "OBSERVE"}).status_code == 200
    policy(denier, denied_action_kinds=["code.exec.shell"])
    policy(quota, allowed_action_kinds=["llm.completion"],
           action_quotas=[{"action_kind": "llm.completion", "max_calls": 5, "window": "per_run"}])
    denier.budget()
    quota.budget()
    run = quota.subject(dimensions={"run_id": "r1"})
    with denier.client() as c:
        assert reserve(c, denier, "code.exec.shell").json()["error"] == "ACTION_KIND_DENIED"
    with quota.client() as c:
        for _ in range(4):
            assert reserve(c, quota, "llm.completion", subject=run).status_code == 200
        mid = overview(tuned)["quota_health"]
        assert reserve(c, quota, "llm.completion", subject=run).status_code == 200
        assert reserve(c, quota, "llm.completion", subject=run).json()["error"] == "ACTION_QUOTA_EXCEEDED"
        assert reserve(c, quota, "db.write", subject=run).json()["error"] == "ACTION_KIND_NOT_ALLOWED"
    after = overview(tuned)
    assert after["tenant_counts"]["in_observe_mode"] == before["tenant_counts"]["in_observe_mode"] + 1
    grew = {k: after["access_control_stats"][k] - before["access_control_stats"][k]
            for k in ("policies_with_allow_list", "policies_with_deny_list")}
    assert grew == {"policies_with_allow_list": 1, "policies_with_deny_list": 1}
    reasons = {k: after["recent_denials_by_reason"].get(k, 0) - before["recent_denials_by_reason"].get(k, 0)
               for k in ("ACTION_KIND_DENIED", "ACTION_KIND_NOT_ALLOWED", "ACTION_QUOTA_EXCEEDED")}
    assert reasons == {"ACTION_KIND_DENIED": 1, "ACTION_KIND_NOT_ALLOWED": 1, "ACTION_QUOTA_EXCEEDED": 1}
    base, health = before["quota_health"], after["quota_health"]
    # 4 of 5 is at 80 %, not at the limit; 5 of 5 is both
    assert (mid["counters_above_80pct"], mid["counters_at_limit"]) == (base["counters_above_80pct"] + 1,
                                                                         base["counters_at_limit"])
    assert (health["counters_above_80pct"], health["counters_at_limit"]) == (base["counters_above_80pct"] + 1,
                                                                             base["counters_at_limit"] + 1)
    mine = [o for o in health["top_offenders"] if o["scope"] == f"tenant:{quota.tenant_id}"]
    assert mine == [{"scope": f"tenant:{quota.tenant_id}", "action_kind": "llm.completion", "window": "per_run",
                     "used": 5, "limit": 5, "utilization_pct": 1.0}]
    with tuned.admin() as c:
        r = c.post("/v1/admin/action-quota-counters/reset", json={
            "tenant_id": quota.tenant_id, "scope": f"tenant:{quota.tenant_id}", "action_kind": "llm.completion",
            "window": "per_run", "window_key": "r1"})
        assert r.status_code == 200, r.text
    assert overview(tuned)["quota_health"] == base  # a reset counter is no longer hot


@tuned_group
def test_observed_allowed_is_sampled_and_denials_are_not(tuned: Server) -> None:
    tenant = new_tenant(tuned)
    tenant.budget()
    policy(tenant, denied_action_kinds=["code.exec.shell"])
    with tuned.admin() as c:
        assert c.patch(f"/v1/admin/tenants/{tenant.tenant_id}", json={"observe_mode": "OBSERVE"}).status_code == 200
    with tenant.client() as c:
        for _ in range(8):
            r = reserve(c, tenant, "llm.completion")
            assert r.status_code == 200 and r.json()["decision"] == "ALLOW"
        for _ in range(3):
            assert reserve(c, tenant, "code.exec.shell").json()["decision"] == "DENY"
    allowed = events_of(tuned, tenant, "reservation.observed_allowed")
    assert len(allowed) == 2 and {e["data"]["sample_rate"] for e in allowed} == {0.25}
    assert len(events_of(tuned, tenant, "reservation.observed_denied")) == 3


@tuned_group
def test_deprecated_kind_answers_carry_its_replacement(tuned: Server) -> None:
    tenant = new_tenant(tuned)
    tenant.budget()
    with tenant.client() as c:
        old = reserve(c, tenant, "custom.acme.mail.legacy")
        assert old.status_code == 200 and old.headers["x-cycles-deprecated-kind"] == "custom.acme.mail.send"
        new = reserve(c, tenant, "custom.acme.mail.send")
        assert new.status_code == 200 and "x-cycles-deprecated-kind" not in new.headers
        decided = c.post("/v1/decide", json={"idempotency_key": uuid.uuid4().hex, "subject": tenant.subject(),
                                             "action": {"kind": "custom.acme.mail.legacy", "name": "x"},
                                             "estimate": {"unit": USD, "amount": 1}})
        assert decided.status_code == 200 and decided.headers["x-cycles-deprecated-kind"] == "custom.acme.mail.send"
        denied = reserve(c, tenant, "custom.acme.mail.legacy", 10**12)  # a denial is warned about too
        assert denied.status_code == 409 and denied.headers["x-cycles-deprecated-kind"] == "custom.acme.mail.send"
    # a deprecated kind is never rewritten: counters and quotas see the kind as sent
    policy(tenant, action_quotas=[{"action_kind": "custom.acme.mail.legacy", "max_calls": 1,
                                   "window": "per_day_tumbling"}])
    with tenant.client() as c:
        assert reserve(c, tenant, "custom.acme.mail.legacy").status_code == 200
        assert reserve(c, tenant, "custom.acme.mail.legacy").json()["error"] == "ACTION_QUOTA_EXCEEDED"
        assert reserve(c, tenant, "custom.acme.mail.send").status_code == 200


def test_bad_operator_settings_stop_the_start(tmp_path: Path) -> None:
    with pytest.raises(A.ActionError, match="greater than 0"):
        A.check_env({A.SAMPLE_RATE_ENV: "0"})
    with pytest.raises(A.ActionError, match="replacement_kind"):
        A.check_env({A.CUSTOM_KINDS_ENV: '[{"kind": "custom.a.b", "risk_class": "read_only", "deprecated": true}]'})
    sampler = A.Sampler(0.3)
    assert sum(sampler.take() for _ in range(100)) == 30


# ---- on the store, with its clock driven ----

def test_reset_refreshes_a_per_run_expiry_and_the_close_cascade_counts_back(clocked: Any) -> None:
    store, now, loop = clocked
    now[0] = 1_709_200_000_000  # mid-day: the day window does not end during the test
    run = loop.run_until_complete
    tenant = f"q-{uuid.uuid4().hex[:8]}"
    run(store.create_tenant({"tenant_id": tenant, "name": tenant, "status": "ACTIVE"}))
    run(store.create_budget({"tenant_id": tenant, "scope": f"tenant:{tenant}", "unit": USD, "allocated": 10**9,
                             "overdraft_limit": 0, "commit_overage_policy": None, "extra": {}}))
    pol = {"policy_id": "pol_r", "scope_pattern": f"tenant:{tenant}", "status": "ACTIVE", "action_quotas": [
        {"action_kind": "llm.completion", "max_calls": 5, "window": "per_run", "per_run_counter_ttl_ms": 120_000},
        {"action_kind": "llm.completion", "max_calls": 50, "window": "per_day_tumbling"}]}
    scopes = [f"tenant:{tenant}"]

    def reserve_in(run_id: str) -> str:
        action, subject = {"kind": "llm.completion", "name": "m"}, {"tenant": tenant, "dimensions": {"run_id": run_id}}
        cmd = ReserveCommand(tenant=tenant, endpoint="reserve", idempotency_key=uuid.uuid4().hex, payload_hash="h",
                             subject=subject, action=action, unit=USD, amount=1, scope_path=scopes[0], scopes=scopes,
                             actions=A.plan([pol], scopes, action, subject, now[0]).store_arg(), ttl_ms=3_600_000)
        return run(store.reserve(cmd)).result["reservation_id"]

    def live() -> dict[str, dict[str, Any]]:
        return {c["counter"].split("|")[2]: c for c in run(store.action_counters(tenant))}

    start = now[0]
    reserve_in("r1")
    assert live()["per_run"]["expires_at_ms"] == start + 120_000
    day_end = live()["per_day_tumbling"]["expires_at_ms"]
    now[0] += 60_000
    for window, key in (("per_run", "r1"), ("per_day_tumbling", A.window_key(now[0], 3))):
        out = run(store.reset_action_counter(tenant, f"{scopes[0]}|llm.completion|{window}|{key}"))
        assert out["previous_used"] == 1 and out["used"] == 0
    # per_run: its TTL starts again from the reset; a calendar window keeps its end
    assert live()["per_run"]["expires_at_ms"] == now[0] + 120_000
    assert live()["per_day_tumbling"]["expires_at_ms"] == day_end
    now[0] += 90_000  # past the first expiry, within the refreshed one
    assert live()["per_run"]["used"] == 0
    reserve_in("r1")
    reserve_in("r1")
    assert live()["per_run"]["used"] == 2
    run(store.update_tenant(tenant, {"status": "CLOSED"}, "2026-01-02T00:00:00.000Z"))
    assert run(store.cascade_close(tenant)) is True
    # both reservations were released by the cascade: their per_run counts came back, committed ones would not
    assert live()["per_run"]["used"] == 0 and live()["per_day_tumbling"]["used"] == 2


# ---- the admin CLI and `cycles apply` manage the governance fields ----

def _cli(server: Server, *args: str) -> Any:
    from typer.testing import CliRunner

    from cycles.cli import app

    env = {"COLUMNS": "200", "CYCLES_ADMIN_API_KEY": None, "CYCLES_URL": None, "CYCLES_BASE_URL": None}
    if args[0] == "apply":
        return CliRunner().invoke(app, [*args, "--url", server.base_url, "--admin-key", server.admin_key], env=env)
    return CliRunner().invoke(app, ["admin", "--url", server.base_url, "--admin-key", server.admin_key, *args],
                              env=env)


def _json(server: Server, *args: str) -> Any:
    result = _cli(server, *args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_admin_cli_sets_lists_quotas_and_observe_mode(server: Server) -> None:
    tenant = new_tenant(server)
    tid = tenant.tenant_id
    tenant.budget()
    assert _json(server, "tenants", "update", tid, "--observe-mode", "OBSERVE")["observe_mode"] == "OBSERVE"
    listed = _json(server, "tenants", "list", "--observe-mode", "OBSERVE", "--all")["tenants"]
    assert tid in {t["tenant_id"] for t in listed}
    _json(server, "tenants", "update", tid, "--observe-mode", "ENFORCE")
    pol = _json(server, "policies", "create", "--tenant", tid, "--name", "gov", "--scope-pattern", f"tenant:{tid}",
                "--deny-kind", "code.exec.shell", "--action-quota", "llm.completion=2/per_run",
                "--risk-class-quota", "high_risk=9/per_hour_tumbling")
    assert pol["denied_action_kinds"] == ["code.exec.shell"]
    assert pol["action_quotas"] == [{"action_kind": "llm.completion", "max_calls": 2, "window": "per_run"}]
    assert pol["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 9, "window": "per_hour_tumbling"}]
    pid = pol["policy_id"]
    swapped = _json(server, "policies", "update", pid, "--allow-kind", "llm.completion", "--clear",
                    "denied_action_kinds")
    assert swapped["allowed_action_kinds"] == ["llm.completion"] and swapped["denied_action_kinds"] == []
    assert swapped["action_quotas"] == pol["action_quotas"]  # lists not named are kept
    bad = _cli(server, "policies", "update", pid, "--action-quota", "llm.completion=five/per_run")
    assert bad.exit_code == 2 and "KIND=MAX/WINDOW" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(server, "policies", "update", pid, "--risk-class-quota", "risky=1/per_run")
    assert bad.exit_code == 2 and "risk class must be one of" in bad.stderr
    assert [p["policy_id"] for p in _json(server, "policies", "list", "--tenant", tid, "--has-action-quotas")[
        "policies"]] == [pid]
    run = tenant.subject(dimensions={"run_id": "r1"})
    with tenant.client() as c:
        for _ in range(2):
            assert reserve(c, tenant, "llm.completion", subject=run).status_code == 200
    rows = _json(server, "quotas", "list", "--tenant", tid, "--run-id", "r1")["counters"]
    assert [(r["action_kind"], r["used"], r["limit"]) for r in rows] == [("llm.completion", 2, 2)]
    table = _cli(server, "quotas", "list", "--tenant", tid, "--window", "per_run")
    assert table.exit_code == 0 and "llm.completion" in table.stdout and "r1" in table.stdout
    reset = _cli(server, "quotas", "reset", "--tenant", tid, "--scope", f"tenant:{tid}", "--action-kind",
                 "llm.completion", "--window", "per_run", "--window-key", "r1", "--reason", "test")
    assert reset.exit_code == 0 and "2 → 0" in reset.stdout, (reset.stdout, reset.stderr)
    both = _cli(server, "quotas", "reset", "--tenant", tid, "--scope", f"tenant:{tid}", "--window", "per_run",
                "--window-key", "r1")
    assert both.exit_code == 2 and "--risk-class" in both.stderr
    shown = _cli(server, "overview")
    assert shown.exit_code == 0 and "Action quotas:" in shown.stdout and "allow list" in shown.stdout


def test_apply_manages_governance_fields(server: Server, tmp_path: Path) -> None:
    tid = f"apply-{uuid.uuid4().hex[:10]}"

    def declare(policy_rules: str, observe: str = "OBSERVE") -> Path:
        path = tmp_path / "gov.yaml"
        path.write_text(f"tenants:\n  - tenant_id: {tid}\n    name: Gov\n    observe_mode: {observe}\n"
                        f"    policies:\n      - name: gov\n        scope_pattern: tenant:{tid}\n{policy_rules}")
        return path

    rules = """        denied_action_kinds: [code.exec.shell]
        action_quotas:
          - {action_kind: message.email.send, max_calls: 5, window: per_run, host_allowlist: [api.sendgrid.com],
             threshold_pct: 0.9, per_run_counter_ttl_ms: 3600000}
        risk_class_quotas:
          - {risk_class: high_risk, max_calls: 10, window: per_hour_tumbling}
"""
    applied = _cli(server, "apply", str(declare(rules)))
    assert applied.exit_code == 0, (applied.stdout, applied.stderr)
    with server.admin() as c:
        assert c.get(f"/v1/admin/tenants/{tid}").json()["observe_mode"] == "OBSERVE"
        pol = c.get("/v1/admin/policies", params={"tenant_id": tid}).json()["policies"][0]
    assert pol["denied_action_kinds"] == ["code.exec.shell"]
    assert pol["action_quotas"][0]["host_allowlist"] == ["api.sendgrid.com"]
    assert pol["action_quotas"][0]["threshold_pct"] == 0.9
    assert pol["risk_class_quotas"] == [{"risk_class": "high_risk", "max_calls": 10, "window": "per_hour_tumbling"}]
    again = _cli(server, "apply", str(declare(rules)))
    assert again.exit_code == 0 and "No changes." in again.stdout, again.stdout
    # switching from a deny list to an allow list must say what happens to the deny list
    swap = "        allowed_action_kinds: [llm.completion]\n"
    conflict = _cli(server, "apply", str(declare(swap)))
    assert conflict.exit_code == 1 and "denied_action_kinds: []" in conflict.stdout, conflict.stdout
    swapped = _cli(server, "apply", str(declare(swap + "        denied_action_kinds: []\n", observe="ENFORCE")))
    assert swapped.exit_code == 0, (swapped.stdout, swapped.stderr)
    with server.admin() as c:
        pol = c.get(f"/v1/admin/policies/{pol['policy_id']}").json()
        assert c.get(f"/v1/admin/tenants/{tid}").json()["observe_mode"] == "ENFORCE"
    assert (pol["allowed_action_kinds"], pol["denied_action_kinds"]) == (["llm.completion"], [])
    bad = _cli(server, "apply", str(declare(
        "        action_quotas: [{action_kind: x.y, max_calls: 0, window: weekly, threshold_pct: 2}]\n")))
    assert bad.exit_code == 2
    for problem in ("max_calls: must be between 1 and 100000", "window: must be one of", "threshold_pct"):
        assert problem in bad.stderr, bad.stderr
    both = _cli(server, "apply", str(declare("        allowed_action_kinds: [a.b]\n        denied_action_kinds: [c.d]\n")))
    assert both.exit_code == 2 and "mutually exclusive" in both.stderr, both.stderr


def test_admin_cli_choices_are_the_cores_windows_and_risk_classes() -> None:
    """typer needs literal choice types; they must stay the names core.actions validates."""
    from typing import get_args

    from cycles.admin_cli import governance as G

    assert get_args(G.WindowName) == A.WINDOWS
    assert get_args(G.RiskClassName) == A.RISK_CLASSES
    assert all(w in G.WINDOW_HELP for w in A.WINDOWS)
