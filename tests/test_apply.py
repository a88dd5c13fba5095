"""`cycles apply FILE.yaml` against a real server: validation, plan, apply, and re-apply as a no-op."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cycles.admin_cli import apply
from cycles.admin_cli.client import AdminClient
from cycles.cli import app
from support import USD, Server

runner = CliRunner()
ENV = {"COLUMNS": "200", "CYCLES_ADMIN_API_KEY": None, "CYCLES_URL": None, "CYCLES_BASE_URL": None}


def write(tmp_path: Path, text: str, name: str = "cycles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_apply(server: Server, path: Path, *args: str) -> Any:
    return runner.invoke(app, ["apply", str(path), "--url", server.base_url, "--admin-key", server.admin_key, *args],
                         env=ENV)


def fresh_id() -> str:
    return f"apply-{uuid.uuid4().hex[:10]}"


def declared(tid: str, *, allocated: int = 100_000_000, name: str = "Acme Corp", policies: str = "") -> str:
    """A file with one tenant and two budgets; `policies` is a YAML block added to the tenant."""
    return textwrap.dedent(f"""
        tenants:
          - tenant_id: {tid}
            name: {name}
            default_commit_overage_policy: REJECT
            budgets:
              - scope: tenant:{tid}/workspace:eng
                unit: TOKENS
                allocated: 5000000
                overdraft_limit: 1000
              - scope: tenant:{tid}
                unit: USD_MICROCENTS
                allocated: {allocated}
        """) + textwrap.indent(textwrap.dedent(policies), "    ")


def ledgers(server: Server, tid: str) -> dict[tuple[str, str], dict[str, Any]]:
    with server.admin() as c:
        r = c.get("/v1/admin/budgets", params={"tenant_id": tid})
    assert r.status_code == 200, r.text
    return {(b["scope"], b["unit"]): b for b in r.json()["ledgers"]}


def test_plan_then_apply_then_reapply_is_a_no_op(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    path = write(tmp_path, declared(tid))

    planned = run_apply(server, path, "--plan")
    assert planned.exit_code == 0, planned.stderr
    assert "3 to create" in planned.stdout and "nothing applied" in planned.stdout
    with server.admin() as c:
        assert c.get(f"/v1/admin/tenants/{tid}").status_code == 404

    applied = run_apply(server, path)
    assert applied.exit_code == 0, (applied.stdout, applied.stderr)
    assert "Applied 3 change(s)." in applied.stdout
    with server.admin() as c:
        tenant = c.get(f"/v1/admin/tenants/{tid}").json()
    assert tenant["name"] == "Acme Corp" and tenant["default_commit_overage_policy"] == "REJECT"
    state = ledgers(server, tid)
    assert state[(f"tenant:{tid}", USD)]["allocated"]["amount"] == 100_000_000
    eng = state[(f"tenant:{tid}/workspace:eng", "TOKENS")]
    assert eng["allocated"]["amount"] == 5_000_000 and eng["overdraft_limit"]["amount"] == 1000

    again = run_apply(server, path)
    assert again.exit_code == 0, again.stderr
    assert "No changes." in again.stdout and "Applied" not in again.stdout
    assert ledgers(server, tid) == state


def test_changed_file_updates_only_what_differs(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    assert run_apply(server, write(tmp_path, declared(tid))).exit_code == 0
    spend = {"operation": "RESET_SPENT", "amount": {"unit": USD, "amount": 100_000_000},
             "spent": {"unit": USD, "amount": 1234}, "idempotency_key": uuid.uuid4().hex}
    with server.admin() as c:
        r = c.post("/v1/admin/budgets/fund", params={"tenant_id": tid, "scope": f"tenant:{tid}", "unit": USD},
                   json=spend)
        assert r.status_code == 200, r.text

    path = write(tmp_path, declared(tid, allocated=250_000_000, name="Acme Corporation"))
    planned = run_apply(server, path, "--plan", "--json")
    assert planned.exit_code == 0, planned.stderr
    plan = {c["target"]: c for c in json.loads(planned.stdout)["plan"]}
    assert plan[tid]["op"] == "update"
    assert plan[tid]["changes"] == [{"field": "name", "old": "Acme Corp", "new": "Acme Corporation"}]
    assert plan[f"tenant:{tid} {USD}"]["changes"] == [{"field": "allocated", "old": 100_000_000, "new": 250_000_000}]
    assert plan[f"tenant:{tid}/workspace:eng TOKENS"]["op"] == "unchanged"
    table = run_apply(server, path, "--plan")
    assert "100,000,000 → 250,000,000" in table.stdout and "2 to update" in table.stdout

    assert run_apply(server, path).exit_code == 0
    root = ledgers(server, tid)[(f"tenant:{tid}", USD)]
    assert root["allocated"]["amount"] == 250_000_000
    assert root["spent"]["amount"] == 1234  # an allocation change keeps what was spent
    assert "No changes." in run_apply(server, path).stdout


def _fund_keys(client: AdminClient, spec: apply.Spec) -> list[str]:
    return [call.body["idempotency_key"] for c in apply.plan(client, spec) for call in c.calls
            if call.path.endswith("/fund")]


def test_funding_keys_are_derived_from_the_file_and_state(server: Server, tmp_path: Path) -> None:
    """A re-run after a crash computes the same idempotency key, so the server applies the change once."""
    tid = fresh_id()
    assert run_apply(server, write(tmp_path, declared(tid))).exit_code == 0
    text = declared(tid, allocated=5)
    spec = apply.load(write(tmp_path, text, "a.yaml"))
    with httpx.Client(base_url=server.base_url, headers={"X-Admin-API-Key": server.admin_key}) as http:
        client = AdminClient(http)
        [key] = _fund_keys(client, spec)
        assert _fund_keys(client, spec) == [key]
        assert _fund_keys(client, apply.load(write(tmp_path, text, "copy.yaml"))) == [key]  # content, not path
        other = apply.load(write(tmp_path, declared(tid, allocated=5, name="Other"), "b.yaml"))
        assert _fund_keys(client, other) != [key]

        [call] = [call for c in apply.plan(client, spec) for call in c.calls if call.path.endswith("/fund")]
        replies = [client.call(call.method, call.path, params=call.params, body=call.body) for _ in range(2)]
        assert replies[0] == replies[1]  # the second is the server's replay of the first
        assert _fund_keys(client, spec) == []
        assert all(c.op == apply.SAME for c in apply.plan(client, spec))


def test_policies_are_matched_by_name(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    path = write(tmp_path, declared(tid, policies=f"""
        policies:
          - name: eng-caps
            scope_pattern: "tenant:{tid}/workspace:eng/*"
            priority: 10
            caps: {{max_tokens: 4096}}
            rate_limits: {{max_reservations_per_minute: 600}}
          - name: parked
            scope_pattern: "tenant:{tid}/*"
            status: DISABLED
        """))
    applied = run_apply(server, path)
    assert applied.exit_code == 0, (applied.stdout, applied.stderr)
    assert "Applied 5 change(s)." in applied.stdout
    assert "No changes." in run_apply(server, path).stdout

    path.write_text(path.read_text().replace("max_tokens: 4096", "max_tokens: 2048"))
    planned = run_apply(server, path, "--plan", "--json")
    [changed] = [c for c in json.loads(planned.stdout)["plan"] if c["op"] != "unchanged"]
    assert changed["kind"] == "policy" and changed["target"] == f"{tid} eng-caps"
    assert run_apply(server, path).exit_code == 0
    with server.admin() as c:
        policies = {p["name"]: p for p in c.get("/v1/admin/policies", params={"tenant_id": tid}).json()["policies"]}
    assert policies["eng-caps"]["caps"]["max_tokens"] == 2048 and policies["eng-caps"]["priority"] == 10
    assert policies["parked"]["status"] == "DISABLED"
    assert "No changes." in run_apply(server, path).stdout


def test_budget_overdraft_change_is_a_patch(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    path = write(tmp_path, declared(tid))
    assert run_apply(server, path).exit_code == 0
    path.write_text(path.read_text().replace("overdraft_limit: 1000", "overdraft_limit: 2500"))
    applied = run_apply(server, path)
    assert applied.exit_code == 0, (applied.stdout, applied.stderr)
    assert ledgers(server, tid)[(f"tenant:{tid}/workspace:eng", "TOKENS")]["overdraft_limit"]["amount"] == 2500
    assert "No changes." in run_apply(server, path).stdout


def test_closed_tenant_is_a_conflict_and_nothing_is_applied(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    with server.admin() as c:
        assert c.post("/v1/admin/tenants", json={"tenant_id": tid, "name": "Gone"}).status_code == 201
        assert c.patch(f"/v1/admin/tenants/{tid}", json={"status": "CLOSED"}).status_code == 200
    result = run_apply(server, write(tmp_path, declared(tid)))
    assert result.exit_code == 1
    assert "CLOSED" in result.stdout and "nothing applied" in result.stderr
    assert ledgers(server, tid) == {}


BAD_FILES = [
    ("allocated: 100000000", "allocated: 1.5", "tenants[0].budgets[1].allocated: must be an integer"),
    ("allocated: 100000000", 'allocated: "100000000"', "tenants[0].budgets[1].allocated: must be an integer"),
    ("allocated: 100000000", "allocated: -1", "tenants[0].budgets[1].allocated: must be between 0"),
    ("overdraft_limit: 1000", "overdraft: 1000", "tenants[0].budgets[0].overdraft: unknown key"),
    ("unit: TOKENS", "unit: DOLLARS", "tenants[0].budgets[0].unit: must be one of"),
    ("    name: Acme Corp\n", "", "tenants[0].name: required"),
    ("default_commit_overage_policy: REJECT", "default_commit_overage_policy: REJECT\n    budget: []",
     "tenants[0].budget: unknown key"),
    ("workspace:eng", "Workspace:eng", "tenants[0].budgets[0].scope:"),
    ("workspace:eng", "workspace:Eng", "tenants[0].budgets[0].scope: write it in canonical form"),
    ("- scope: tenant:TID\n", "- scope: tenant:other\n", "tenants[0].budgets[1].scope: must be tenant:TID or below it"),
    ("unit: USD_MICROCENTS", "unit: TOKENS\n        unit: USD_MICROCENTS", "duplicate key 'unit'"),
    ("tenant:TID/workspace:eng\n        unit: TOKENS", "tenant:TID\n        unit: USD_MICROCENTS",
     "tenants[0].budgets[1].scope: tenant:TID USD_MICROCENTS is already declared at tenants[0].budgets[0]"),
]


@pytest.mark.parametrize("old,new,message", BAD_FILES)
def test_bad_file_exits_2_with_the_field_path(tmp_path: Path, old: str, new: str, message: str) -> None:
    tid = "acme"
    text = declared(tid)
    assert old.replace("TID", tid) in text, old
    path = write(tmp_path, text.replace(old.replace("TID", tid), new.replace("TID", tid), 1))
    # the file is checked before any connection is made: this URL has no server
    result = runner.invoke(app, ["apply", str(path), "--url", "http://127.0.0.1:9", "--admin-key", "k"], env=ENV)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message.replace("TID", tid) in result.stderr
    assert str(path) in result.stderr


@pytest.mark.parametrize("text,message", [
    ("", "top level: must be a mapping"),
    ("tenants: {}\n", "tenants: must be a list"),
    ("tenant:\n  - tenant_id: acme\n", "tenant: unknown key"),
    ("tenants: [\n", "not valid YAML"),
    ("tenants:\n  - tenant_id: Acme_Corp\n    name: x\n", "tenants[0].tenant_id: must be 3-64 characters"),
])
def test_bad_file_shapes(tmp_path: Path, text: str, message: str) -> None:
    result = runner.invoke(app, ["apply", str(write(tmp_path, text)), "--admin-key", "k"], env=ENV)
    assert result.exit_code == 2 and message in result.stderr, (result.stdout, result.stderr)


def test_local_mode_apply_and_reapply(tmp_path: Path) -> None:
    path = write(tmp_path, declared("local-apply"))
    store = ["--store", f"sqlite:///{tmp_path / 'x.db'}"]
    first = runner.invoke(app, ["apply", str(path), *store], env=ENV)
    assert first.exit_code == 0, (first.stdout, first.stderr)
    assert "Applied 3 change(s)." in first.stdout
    second = runner.invoke(app, ["apply", str(path), *store], env=ENV)
    assert second.exit_code == 0 and "No changes." in second.stdout
