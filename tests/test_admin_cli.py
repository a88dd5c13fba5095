"""`cycles admin ...` against a real server: the CLI in-process (typer's CliRunner) and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from cycles.cli import app
from support import USD, Server, cycles_bin, free_port, new_tenant, reserve_body, start_server

runner = CliRunner()
WIDE = {"COLUMNS": "200", "CYCLES_ADMIN_API_KEY": None, "CYCLES_URL": None, "CYCLES_BASE_URL": None}


def cli(server: Server, *args: str) -> Any:
    return runner.invoke(app, ["admin", "--url", server.base_url, "--admin-key", server.admin_key, *args], env=WIDE)


def ok(server: Server, *args: str) -> Any:
    """Run with --json and return the parsed answer."""
    result = cli(server, *args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def fresh_id() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


def test_tenants_create_get_suspend_reactivate(server: Server) -> None:
    tid = fresh_id()
    result = cli(server, "tenants", "create", tid, "--name", "Acme Corp", "--default-commit-overage-policy", "REJECT")
    assert result.exit_code == 0, result.stderr
    assert f"Created tenant {tid}" in result.stdout and "REJECT" in result.stdout
    again = cli(server, "tenants", "create", tid, "--name", "Acme Corp")
    assert again.exit_code == 0 and "Already exists" in again.stdout

    got = ok(server, "tenants", "get", tid)
    assert got["tenant_id"] == tid and got["status"] == "ACTIVE" and got["name"] == "Acme Corp"
    assert ok(server, "tenants", "suspend", tid)["status"] == "SUSPENDED"
    assert ok(server, "tenants", "reactivate", tid)["status"] == "ACTIVE"
    assert ok(server, "tenants", "update", tid, "--name", "Acme Corporation")["name"] == "Acme Corporation"
    with server.admin() as c:
        assert c.get(f"/v1/admin/tenants/{tid}").json()["name"] == "Acme Corporation"


def test_tenants_list(server: Server) -> None:
    prefix = fresh_id()
    for n in range(3):
        ok(server, "tenants", "create", f"{prefix}-{n}", "--name", f"List {n}")
    listed = ok(server, "tenants", "list", "--search", prefix, "--limit", "2", "--all")
    assert sorted(t["tenant_id"] for t in listed["tenants"]) == [f"{prefix}-{n}" for n in range(3)]
    table = cli(server, "tenants", "list", "--search", prefix)
    assert table.exit_code == 0 and f"{prefix}-1" in table.stdout


def test_tenant_close_requires_yes(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Closing")
    refused = cli(server, "tenants", "close", tid)
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert ok(server, "tenants", "get", tid)["status"] == "ACTIVE"
    assert ok(server, "tenants", "close", tid, "--yes")["status"] == "CLOSED"


def test_server_errors_exit_1_with_code_and_message(server: Server) -> None:
    missing = cli(server, "tenants", "get", "no-such-tenant")
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.stderr and "no-such-tenant" in missing.stderr and not missing.stdout
    wrong_key = runner.invoke(app, ["admin", "--url", server.base_url, "--admin-key", "wrong", "tenants", "get", "x"],
                              env=WIDE)
    assert wrong_key.exit_code == 1 and "UNAUTHORIZED" in wrong_key.stderr
    no_key = runner.invoke(app, ["admin", "--url", server.base_url, "tenants", "get", "x"], env=WIDE)
    assert no_key.exit_code == 2 and "admin key" in no_key.stderr
    down = runner.invoke(app, ["admin", "--url", f"http://127.0.0.1:{free_port()}", "--admin-key", "k",
                               "tenants", "get", "x"], env=WIDE)
    assert down.exit_code == 5 and "CONNECTION_FAILED" in down.stderr  # 5: unreachable (README "Exit codes")


def test_key_create_prints_the_secret_once_and_it_works(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Keys")
    result = cli(server, "keys", "create", "--tenant", tid, "--name", "agents",
                 "--permission", "balances:read", "--permission", "reservations:create")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    marker = next(i for i, line in enumerate(lines) if "shown only this once" in line)
    secret = lines[marker + 1].strip()
    assert secret.startswith("cyc_live_") and result.stdout.count(secret) == 1
    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": secret}) as c:
        assert c.get("/v1/balances", params={"tenant": tid}).status_code == 200


def test_keys_list_update_revoke(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Keys")
    created = ok(server, "keys", "create", "--tenant", tid, "--name", "agents")
    key_id, secret = created["key_id"], created["key_secret"]
    listed = ok(server, "keys", "list", "--tenant", tid)
    assert [k["key_id"] for k in listed["keys"]] == [key_id]
    assert secret not in json.dumps(listed)
    updated = ok(server, "keys", "update", key_id, "--permission", "balances:read", "--name", "readonly")
    assert updated["permissions"] == ["balances:read"] and updated["name"] == "readonly"

    with httpx.Client(base_url=server.base_url, headers={"X-Cycles-API-Key": secret}) as c:
        assert c.get("/v1/balances", params={"tenant": tid}).status_code == 200
        revoked = cli(server, "keys", "revoke", key_id, "--reason", "rotated")
        assert revoked.exit_code == 0, revoked.stderr
        assert c.get("/v1/balances", params={"tenant": tid}).status_code == 401
    assert ok(server, "keys", "list", "--tenant", tid, "--status", "REVOKED")["keys"][0]["key_id"] == key_id


def test_budgets_create_list_fund(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Budgets")
    made = ok(server, "budgets", "create", "--tenant", tid, "--unit", USD, "--allocated", "1000000")
    assert made["scope"] == f"tenant:{tid}" and made["allocated"] == {"unit": USD, "amount": 1_000_000}
    ok(server, "budgets", "create", "--tenant", tid, "--scope", f"tenant:{tid}/workspace:eng", "--unit", "TOKENS",
       "--allocated", "5000", "--overdraft-limit", "100")
    listed = ok(server, "budgets", "list", "--tenant", tid)
    assert {(b["scope"], b["unit"]) for b in listed["ledgers"]} == {(f"tenant:{tid}", USD),
                                                                    (f"tenant:{tid}/workspace:eng", "TOKENS")}
    table = cli(server, "budgets", "list", "--tenant", tid)
    assert table.exit_code == 0 and "1,000,000" in table.stdout and "TOKENS" in table.stdout

    # one idempotency key, two runs: the second is the server's replay, so the credit lands once
    for _ in range(2):
        funded = ok(server, "budgets", "fund", "--tenant", tid, "--unit", USD, "--operation", "CREDIT",
                    "--amount", "500", "--idempotency-key", "top-up-1")
        assert funded["new_allocated"]["amount"] == 1_000_500
    fund = ("budgets", "fund", "--tenant", tid, "--unit", USD)
    shown = cli(server, *fund, "--operation", "RESET", "--amount", "2000000")
    assert shown.exit_code == 0 and "2,000,000 USD_MICROCENTS" in shown.stdout
    assert "Idempotency key: cli-" in shown.stdout

    too_much = cli(server, *fund, "--operation", "DEBIT", "--amount", "9000000")
    assert too_much.exit_code == 1 and "error: " in too_much.stderr
    fractional = cli(server, "budgets", "create", "--tenant", tid, "--unit", "CREDITS", "--allocated", "1.5")
    assert fractional.exit_code == 2


def test_budgets_get_update_freeze_unfreeze(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Budgets")
    ok(server, "budgets", "create", "--tenant", tid, "--unit", USD, "--allocated", "1000")
    got = ok(server, "budgets", "get", "--tenant", tid, "--unit", USD)
    assert got["scope"] == f"tenant:{tid}" and got["allocated"]["amount"] == 1000
    updated = ok(server, "budgets", "update", "--tenant", tid, "--unit", USD, "--overdraft-limit", "250")
    assert updated["overdraft_limit"] == {"unit": USD, "amount": 250}
    assert ok(server, "budgets", "freeze", "--tenant", tid, "--unit", USD, "--reason", "incident")["status"] == "FROZEN"
    frozen_fund = cli(server, "budgets", "fund", "--tenant", tid, "--unit", USD, "--operation", "CREDIT",
                      "--amount", "1")
    assert frozen_fund.exit_code == 1 and "BUDGET_FROZEN" in frozen_fund.stderr
    assert ok(server, "budgets", "unfreeze", "--tenant", tid, "--unit", USD)["status"] == "ACTIVE"


def test_reservations_list_and_force_release(server: Server) -> None:
    tenant = new_tenant(server)
    tenant.budget(amount=10_000)
    with tenant.client() as c:
        r = c.post("/v1/reservations", json=reserve_body(tenant, 4000))
    assert r.status_code == 200, r.text
    rid = r.json()["reservation_id"]
    assert tenant.balance()["reserved"]["amount"] == 4000

    listed = ok(server, "reservations", "list", "--tenant", tenant.tenant_id, "--status", "ACTIVE")
    assert [x["reservation_id"] for x in listed["reservations"]] == [rid]
    table = cli(server, "reservations", "list", "--tenant", tenant.tenant_id)
    assert table.exit_code == 0 and rid in table.stdout and "4,000 USD_MICROCENTS" in table.stdout

    released = cli(server, "reservations", "release", rid, "--reason", "stuck agent")
    assert released.exit_code == 0, released.stderr
    assert f"Released {rid}" in released.stdout
    assert tenant.balance()["reserved"]["amount"] == 0
    assert ok(server, "reservations", "list", "--tenant", tenant.tenant_id)["reservations"][0]["status"] == "RELEASED"
    again = cli(server, "reservations", "release", rid, "--reason", "twice")
    assert again.exit_code == 1 and "RESERVATION_FINALIZED" in again.stderr


def test_policies_create_list_get_update_delete(server: Server, tmp_path: Path) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Policies")
    created = ok(server, "policies", "create", "--tenant", tid, "--name", "eng-caps",
                 "--scope-pattern", f"tenant:{tid}/workspace:eng/*", "--priority", "10", "--max-tokens", "4096",
                 "--tool-denylist", "shell", "--max-reservations-per-minute", "600")
    pid = created["policy_id"]
    assert created["caps"]["max_tokens"] == 4096 and created["caps"]["tool_denylist"] == ["shell"]
    assert created["rate_limits"]["max_reservations_per_minute"] == 600
    assert [p["policy_id"] for p in ok(server, "policies", "list", "--tenant", tid)["policies"]] == [pid]
    assert ok(server, "policies", "get", pid)["name"] == "eng-caps"

    updated = ok(server, "policies", "update", pid, "--max-tokens", "2048", "--priority", "20")
    assert updated["priority"] == 20 and updated["caps"]["max_tokens"] == 2048
    assert updated["caps"]["tool_denylist"] == ["shell"]  # the other caps are kept

    body = tmp_path / "policy.json"
    body.write_text(json.dumps({"tenant_id": tid, "name": "from-file", "scope_pattern": f"tenant:{tid}/*",
                                "caps": {"max_steps_remaining": 5}}))
    from_file = ok(server, "policies", "create", "--from-json", str(body), "--priority", "3")
    assert from_file["name"] == "from-file" and from_file["priority"] == 3
    assert from_file["caps"]["max_steps_remaining"] == 5

    deleted = cli(server, "policies", "delete", pid)
    assert deleted.exit_code == 0, deleted.stderr
    assert [p["name"] for p in ok(server, "policies", "list", "--tenant", tid)["policies"]] == ["from-file"]


def test_audit(server: Server) -> None:
    tid = fresh_id()
    ok(server, "tenants", "create", tid, "--name", "Audited")
    ok(server, "budgets", "create", "--tenant", tid, "--unit", USD, "--allocated", "1000")
    logs = ok(server, "audit", "--operation", "createBudget", "--limit", "50")
    assert any(e["operation"] == "createBudget" for e in logs["logs"])
    table = cli(server, "audit", "--operation", "createBudget")
    assert table.exit_code == 0 and "createBudget" in table.stdout


def test_overview(server: Server) -> None:
    ok(server, "tenants", "create", fresh_id(), "--name", "Counted")
    overview = ok(server, "overview")
    assert overview["tenant_counts"]["total"] >= 1 and "budget_counts" in overview
    shown = cli(server, "overview")
    assert shown.exit_code == 0 and "Tenant counts" in shown.stdout


def count_events(server: Server) -> int:
    listed, params = 0, {"limit": 100}
    with server.admin() as c:
        while True:
            page = c.get("/v1/admin/events", params=params).json()
            listed += len(page["events"])
            if not page.get("has_more"):
                return listed
            params = {"limit": 100, "cursor": page["next_cursor"]}


def test_overview_event_figures_are_counted_from_the_events(server: Server) -> None:
    """Issue 15 item 6: total_recent, recent denials and expiries are real, not hard-coded empty."""
    tenant = new_tenant(server)
    tenant.budget(amount=1_000)
    with tenant.client() as c:
        denied = c.post("/v1/reservations", json=reserve_body(tenant, 5_000))
        assert denied.status_code == 409
        short = c.post("/v1/reservations", json=reserve_body(tenant, 100, ttl_ms=1000, grace_period_ms=0))
        assert short.status_code == 200
    overview = {}
    for _ in range(100):  # the sweeper (100 ms in tests) expires the 1 s lease
        overview = ok(server, "overview")
        if any(e.get("tenant_id") == tenant.tenant_id for e in overview["recent_expiries"]):
            break
        time.sleep(0.1)
    assert any(e["tenant_id"] == tenant.tenant_id and e["event_type"] == "reservation.expired"
               for e in overview["recent_expiries"])
    assert any(e["tenant_id"] == tenant.tenant_id and e["event_type"] == "reservation.denied"
               for e in overview["recent_denials"])
    before = count_events(server)
    counts = ok(server, "overview")["event_counts"]
    assert before <= counts["total_recent"] <= count_events(server)  # every event of this session is recent
    assert sum(counts["by_category"].values()) == counts["total_recent"]
    shown = cli(server, "overview")
    assert shown.exit_code == 0 and "Recent denials" in shown.stdout and tenant.tenant_id in shown.stdout


def test_subprocess_like_a_new_user(server: Server) -> None:
    """The installed `cycles` command, configured through the environment."""
    tid = fresh_id()
    env = {**os.environ, "CYCLES_BASE_URL": server.base_url, "CYCLES_ADMIN_API_KEY": server.admin_key, "COLUMNS": "200"}

    def cycles(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cycles_bin(), *args], env=env, capture_output=True, text=True, timeout=60)

    created = cycles("admin", "tenants", "create", tid, "--name", "From A Shell")
    assert created.returncode == 0, created.stderr
    assert f"Created tenant {tid}" in created.stdout
    budget = cycles("admin", "budgets", "create", "--tenant", tid, "--unit", "TOKENS", "--allocated", "42000")
    assert budget.returncode == 0, budget.stderr
    listed = cycles("admin", "budgets", "list", "--tenant", tid, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["ledgers"][0]["allocated"]["amount"] == 42_000
    missing = cycles("admin", "tenants", "get", "no-such-tenant")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_local_mode_then_serve_the_same_store(tmp_path: Path) -> None:
    """--store works on the store file in-process; a real `cycles serve` on that file then sees the result."""
    store_url = f"sqlite:///{tmp_path / 'x.db'}"
    local = ["admin", "--store", store_url]
    created = runner.invoke(app, [*local, "tenants", "create", "local-acme", "--name", "Local Acme"], env=WIDE)
    assert created.exit_code == 0, (created.stdout, created.stderr)
    funded = runner.invoke(app, [*local, "budgets", "create", "--tenant", "local-acme", "--unit", USD,
                                 "--allocated", "777", "--json"], env=WIDE)
    assert funded.exit_code == 0, funded.stderr
    read_back = runner.invoke(app, [*local, "tenants", "get", "local-acme", "--json"], env=WIDE)
    assert json.loads(read_back.stdout)["name"] == "Local Acme"

    srv = start_server(store_url, tmp_path)
    try:
        with srv.admin() as c:
            tenant = c.get("/v1/admin/tenants/local-acme")
            assert tenant.status_code == 200 and tenant.json()["name"] == "Local Acme"
            ledgers = c.get("/v1/admin/budgets", params={"tenant_id": "local-acme"}).json()["ledgers"]
            assert [b["allocated"]["amount"] for b in ledgers] == [777]
        over_http = cli(srv, "tenants", "get", "local-acme", "--json")
        assert over_http.exit_code == 0 and json.loads(over_http.stdout)["tenant_id"] == "local-acme"
    finally:
        srv.stop()


def test_tables_at_80_columns_keep_ids_whole(server: Server) -> None:
    """Issue 15 item 11: ids, scopes and times are never wrapped, so they can be copied."""
    tenant = new_tenant(server)
    tenant.budget(amount=10_000_000)
    with tenant.client() as c:
        rid = c.post("/v1/reservations", json=reserve_body(tenant, 1_000)).json()["reservation_id"]
    env = {**os.environ, "COLUMNS": "80", "CYCLES_BASE_URL": server.base_url, "CYCLES_API_KEY": tenant.key,
           "CYCLES_TENANT": tenant.tenant_id, "CYCLES_ADMIN_API_KEY": server.admin_key}
    keys = subprocess.run([cycles_bin(), "admin", "keys", "list", "--tenant", tenant.tenant_id], env=env,
                          capture_output=True, text=True, timeout=30)
    listed = subprocess.run([cycles_bin(), "reservations"], env=env, capture_output=True, text=True, timeout=30)
    balance = subprocess.run([cycles_bin(), "balance"], env=env, capture_output=True, text=True, timeout=30)
    assert keys.returncode == listed.returncode == balance.returncode == 0, keys.stderr + listed.stderr
    with server.admin() as c:
        key_id = c.get("/v1/admin/api-keys", params={"tenant_id": tenant.tenant_id}).json()["keys"][0]["key_id"]
    assert key_id in keys.stdout and rid in listed.stdout and f"tenant:{tenant.tenant_id}" in balance.stdout
    row = next(line for line in listed.stdout.splitlines() if rid in line)
    assert "ACTIVE" in row and "USD_MICROCENTS" in row  # the whole row on one line
