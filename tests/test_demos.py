"""The demos (issue 8), run as a user runs them, and the public demo agent against our server.

* `cycles demo runaway` / `cycles demo action-authority` as subprocesses (embedded server, or an
  existing one through CYCLES_BASE_URL with a tenant key or the admin key): exit status 0, the exact
  counts, the blocked step never executing, the server's real 409 on screen.
* The public demos' provisioning script, replayed request by request against `cycles serve`, then the
  public guarded runaway agent on the PUBLISHED runcycles 0.5.3 SDK (its own virtualenv, see
  tests/conformance/conftest.py): exactly 100 successes, then BudgetExceededError.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from conformance.conftest import sdk_python, validate_exchanges  # noqa: F401 - sdk_python is a fixture
from conformance.proxy import RecordingProxy
from support import Server, cycles_bin, start_server

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = Path(__file__).resolve().parent / "demo_drivers"
USD = "USD_MICROCENTS"
CENT = 1_000_000
DOLLAR = 100 * CENT
PUBLIC_DEMO_PERMISSIONS = ["reservations:create", "reservations:commit", "reservations:release",
                           "reservations:extend", "balances:read", "admin:write"]
HIERARCHY = ["", "/workspace:default", "/workspace:default/app:default",
             "/workspace:default/app:default/workflow:default",
             "/workspace:default/app:default/workflow:default/agent:support-bot"]
SPEED = "20"


def demo(args: list[str], tmp: Path, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[
        subprocess.CompletedProcess, dict[str, Any]]:
    """Run `cycles demo <args>` like a user (fresh environment without CYCLES_*), return (process, results)."""
    out = tmp / f"result-{len(list(tmp.glob('result-*.json')))}.json"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    base["COLUMNS"] = "160"  # wide enough that no sentence the assertions look for is wrapped
    base.update(env or {})
    proc = subprocess.run([cycles_bin(), "demo", *args, "--json-out", str(out)], env=base, cwd=str(tmp),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def check_guarded_runaway(res: dict[str, Any], stdout: str, scopes: list[str]) -> None:
    g = res["guarded"]
    assert g["outcome"] == "budget-exceeded", g
    assert g["calls"] == 100 and g["executions"] == 100, "call 101 must never run"
    assert g["spend_microcents"] == DOLLAR
    d = g["denial"]
    assert d["status"] == 409 and d["error_code"] == "BUDGET_EXCEEDED" and d["request_id"].startswith("req_")
    for scope in scopes:
        assert g["balances"][scope] == {"allocated": DOLLAR, "spent": DOLLAR, "reserved": 0, "remaining": 0}, scope
    assert "Cycles stopped the agent BEFORE call 101 could run." in stdout
    assert d["request_id"] in stdout and "409" in stdout and "BUDGET_EXCEEDED" in stdout
    assert "Calls executed: 100 · spend: $1.00" in stdout


def check_guarded_action_authority(res: dict[str, Any], stdout: str) -> None:
    g = res["guarded"]
    assert (g["approved"], g["blocked"]) == (3, 1)
    assert g["steps"] == {"read_case": "approved", "append_internal_note": "approved",
                          "update_crm_status": "approved", "send_customer_email": "blocked"}
    assert g["executed"] == ["read_case", "append_internal_note", "update_crm_status"], "the send must never run"
    assert g["emails_sent"] == 0
    d = g["denial"]
    assert d["step"] == "send_customer_email" and d["status"] == 409 and d["error_code"] == "BUDGET_EXCEEDED"
    assert d["request_id"] in stdout
    tool = {s.rsplit("/", 1)[-1]: b for s, b in g["balances"].items() if "/toolset:" in s}
    assert tool == {
        "toolset:internal-notes": {"allocated": DOLLAR, "spent": CENT, "reserved": 0, "remaining": DOLLAR - CENT},
        "toolset:crm-updates": {"allocated": DOLLAR, "spent": CENT, "reserved": 0, "remaining": DOLLAR - CENT},
        "toolset:send-email": {"allocated": 0, "spent": 0, "reserved": 0, "remaining": 0},
    }
    assert "3 approved · 1 blocked" in stdout
    assert "Email blocked — not approved for autonomous execution. Escalated to human review." in stdout


# ---- the commands, embedded server -------------------------------------------------------------------

def test_runaway_demo_both_modes(tmp_path: Path) -> None:
    proc, res = demo(["runaway", "--mode", "both", "--speed", SPEED, "--unguarded-seconds", "8"], tmp_path)
    u = res["unguarded"]
    assert u["outcome"] == "time-limit" and u["calls"] > 0
    assert u["executions"] == u["calls"] and u["spend_microcents"] == u["calls"] * CENT
    assert 0.3 <= u["elapsed_s"] < 2.0  # 8 simulated seconds at x20
    assert res["server"]["mode"] == "embedded" and res["server"]["tenant"] == "demo-tenant"
    check_guarded_runaway(res, proc.stdout, res["server"]["scopes"])
    assert "NO HARD STOP." in proc.stdout and "Same agent. Same bug. Two outcomes." in proc.stdout
    assert f"{u['calls']:,} calls" in proc.stdout


def test_runaway_demo_unguarded_only_needs_no_server(tmp_path: Path) -> None:
    proc, res = demo(["runaway", "--mode", "unguarded", "--speed", SPEED, "--unguarded-seconds", "4"], tmp_path)
    assert "server" not in res and "guarded" not in res and "Guarded run" not in proc.stdout
    assert res["unguarded"]["outcome"] == "time-limit" and res["unguarded"]["calls"] > 0


def test_action_authority_demo_both_modes(tmp_path: Path) -> None:
    proc, res = demo(["action-authority", "--speed", SPEED], tmp_path)
    u = res["unguarded"]
    assert (u["approved"], u["blocked"], u["emails_sent"]) == (4, 0, 1)
    assert u["executed"] == ["read_case", "append_internal_note", "update_crm_status", "send_customer_email"]
    assert "4 approved · 0 blocked" in proc.stdout
    check_guarded_action_authority(res, proc.stdout)
    # the hierarchy paid for the two approved tool calls only
    agent = "tenant:demo-tenant/workspace:default/app:default/workflow:default/agent:support-bot"
    assert res["guarded"]["balances"][agent]["spent"] == 2 * CENT


# ---- the commands against an existing server (CYCLES_BASE_URL) ------------------------------------------

def test_demos_with_a_tenant_key_on_an_existing_server_are_repeatable(server: Server, tmp_path: Path) -> None:
    tenant = f"demo-{os.urandom(4).hex()}"
    with server.admin() as c:
        assert c.post("/v1/admin/tenants", json={"tenant_id": tenant, "name": "Demo Tenant"}).status_code == 201
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant, "name": "demo-key",
                                                "permissions": PUBLIC_DEMO_PERMISSIONS})
        key = r.json()["key_secret"]
    env = {"CYCLES_BASE_URL": server.base_url, "CYCLES_API_KEY": key, "CYCLES_TENANT": tenant}
    workspaces = set()
    for _ in range(2):  # a second run gets fresh scopes: the first run's spent budgets do not stop it
        proc, res = demo(["runaway", "--server", "--mode", "guarded", "--speed", SPEED], tmp_path, env)
        assert res["server"]["mode"] == "external (tenant key)" and res["server"]["tenant"] == tenant
        scopes = res["server"]["scopes"]
        workspaces.add(scopes[1])
        # the tenant scope is the user's own: no budget is added there; the four below get $1.00 each
        assert f"tenant:{tenant}" not in res["guarded"]["balances"]
        check_guarded_runaway(res, proc.stdout, scopes[1:])
        assert "is your tenant: the demo adds no budget there" in proc.stdout
    assert len(workspaces) == 2
    proc, res = demo(["action-authority", "--server", "--mode", "guarded", "--speed", SPEED], tmp_path, env)
    check_guarded_action_authority(res, proc.stdout)


def test_demo_ignores_the_sdk_variables_without_server(server: Server, tmp_path: Path) -> None:
    """Issue 15 item 8: exported SDK variables do not make a demo spend from the user's real tenant."""
    tenant = new_tenant_on(server)
    env = {"CYCLES_BASE_URL": server.base_url, "CYCLES_API_KEY": tenant[1], "CYCLES_TENANT": tenant[0],
           "CYCLES_ADMIN_API_KEY": server.admin_key}
    with server.admin() as c:
        tenants_before = c.get("/v1/admin/overview").json()["tenant_counts"]["total"]
    proc, res = demo(["action-authority", "--mode", "guarded", "--speed", SPEED], tmp_path, env)
    assert res["server"]["mode"] == "embedded" and "CYCLES_BASE_URL is ignored without --server" in proc.stdout
    with server.admin() as c:
        assert c.get("/v1/admin/budgets", params={"tenant_id": tenant[0]}).json()["ledgers"] == []
        assert c.get("/v1/admin/overview").json()["tenant_counts"]["total"] == tenants_before


def new_tenant_on(server: Server) -> tuple[str, str]:
    tenant = f"real-{os.urandom(4).hex()}"
    with server.admin() as c:
        assert c.post("/v1/admin/tenants", json={"tenant_id": tenant, "name": "Real"}).status_code == 201
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant, "name": "k", "permissions": PUBLIC_DEMO_PERMISSIONS})
    return tenant, r.json()["key_secret"]


def test_demo_with_the_admin_key_on_an_existing_server_uses_and_closes_a_fresh_tenant(server: Server,
                                                                                      tmp_path: Path) -> None:
    env = {"CYCLES_BASE_URL": server.base_url, "CYCLES_ADMIN_API_KEY": server.admin_key}
    proc, res = demo(["runaway", "--server", "--mode", "guarded", "--speed", SPEED], tmp_path, env)
    tenant = res["server"]["tenant"]
    assert res["server"]["mode"] == "external (admin key)" and tenant.startswith("demo-")
    check_guarded_runaway(res, proc.stdout, res["server"]["scopes"])
    with server.admin() as c:
        assert c.get(f"/v1/admin/tenants/{tenant}").json()["status"] == "CLOSED"
    assert f"closed the demo tenant {tenant}" in proc.stdout


def test_demo_explains_a_missing_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    env["CYCLES_BASE_URL"] = "http://127.0.0.1:9"
    args = [cycles_bin(), "demo", "runaway", "--server", "--mode", "guarded"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "neither CYCLES_API_KEY" in proc.stdout
    env["CYCLES_API_KEY"] = "cyc_live_whatever"
    unreachable = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert unreachable.returncode == 5 and "cannot reach the Cycles server" in unreachable.stdout


# ---- the public demo agent, published SDK, provisioned exactly like scripts/provision.sh -------------------

@pytest.fixture
def public_demo_server(tmp_path: Path):
    srv = start_server(f"sqlite:///{tmp_path / 'public-demo.db'}", tmp_path, admin_key="demo-admin-key")
    yield srv
    srv.stop()


def provision_like_the_public_demo(base_url: str) -> str:
    """scripts/provision.sh of the public demos, request by request. Returns the tenant key."""
    with httpx.Client(base_url=base_url, timeout=30) as c:
        r = c.post("/v1/admin/tenants", headers={"X-Admin-API-Key": "demo-admin-key"},
                   json={"tenant_id": "demo-tenant", "name": "Demo Tenant"})
        assert r.status_code in (200, 201, 409), r.text
        r = c.post("/v1/admin/api-keys", headers={"X-Admin-API-Key": "demo-admin-key"},
                   json={"tenant_id": "demo-tenant", "name": "demo-key", "permissions": PUBLIC_DEMO_PERMISSIONS})
        assert r.status_code == 201, r.text
        key = r.json()["key_secret"]
        for suffix in HIERARCHY:
            r = c.post("/v1/admin/budgets", headers={"X-Cycles-API-Key": key},
                       json={"scope": f"tenant:demo-tenant{suffix}", "unit": USD,
                             "allocated": {"amount": DOLLAR, "unit": USD}})
            assert r.status_code == 201, r.text
    return key


def test_public_demo_provisioning_and_published_sdk_runaway(public_demo_server: Server, sdk_python: str,
                                                            tmp_path: Path) -> None:
    key = provision_like_the_public_demo(public_demo_server.base_url)
    home = tmp_path / "home"
    home.mkdir()
    with RecordingProxy(public_demo_server.base_url) as proxy:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "CYCLES_BASE_URL": proxy.base_url, "CYCLES_API_KEY": key,
               "CYCLES_TENANT": "demo-tenant", "DEMO_CALL_LATENCY_S": "0.001"}
        proc = subprocess.run([sdk_python, str(DRIVERS / "public_runaway.py")], env=env, cwd=str(tmp_path),
                              capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@DEMO-RESULT@@ ")]
    assert proc.returncode == 0 and len(lines) == 1, f"{proc.stdout}\n{proc.stderr}"
    out = json.loads(lines[0].split(" ", 1)[1])
    assert out["successes"] == 100 and out["executions"] == 100, out
    assert out["stop"]["type"] == "BudgetExceededError", out
    assert out["stop"]["status"] == 409 and out["stop"]["error_code"] == "BUDGET_EXCEEDED"

    creates = proxy.calls("POST", path="/v1/reservations")
    assert [c.status for c in creates] == [200] * 100 + [409]
    assert creates[-1].error == "BUDGET_EXCEEDED"
    assert [c.status for c in proxy.calls("POST", suffix="/commit")] == [200] * 100
    assert {c.request_json["subject"]["agent"] for c in creates} == {"support-bot"}
    with httpx.Client(base_url=public_demo_server.base_url, headers={"X-Cycles-API-Key": key}) as c:
        body = c.get("/v1/balances", params={"tenant": "demo-tenant", "include_children": "true"}).json()
    spent = {b["scope"]: (b["spent"]["amount"], b["remaining"]["amount"]) for b in body["balances"]}
    assert spent == {f"tenant:demo-tenant{s}": (DOLLAR, 0) for s in HIERARCHY}
    # every answer the SDK received passes the SDK's own validators
    report = validate_exchanges(sdk_python, proxy.dump(), tmp_path / "validate")
    assert report["checked"] == len(proxy.exchanges) and not report["problems"], report["problems"]
