"""`cycles reserve | commit | release | balance | reservations` against a real server, as subprocesses
configured like the SDK (CYCLES_BASE_URL, CYCLES_API_KEY, CYCLES_TENANT)."""

from __future__ import annotations

import json
import os
import subprocess

from support import Server, Tenant, cycles_bin, new_tenant


def run(tenant: Tenant, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CYCLES_")}
    full.update({"COLUMNS": "80", "CYCLES_BASE_URL": tenant.server.base_url, "CYCLES_API_KEY": tenant.key, **env})
    return subprocess.run([cycles_bin(), *args], capture_output=True, text=True, timeout=30, env=full)


def test_reserve_release_list_and_deny(server: Server) -> None:
    tenant = new_tenant(server)
    tenant.budget(amount=10_000)
    held = run(tenant, "reserve", "4000", "--workspace", "eng", "--json")  # the tenant comes from the key
    assert held.returncode == 0, held.stderr
    rid = json.loads(held.stdout)["reservation_id"]
    listed = run(tenant, "reservations", "--status", "ACTIVE", "--json", CYCLES_TENANT=tenant.tenant_id)
    assert [r["reservation_id"] for r in json.loads(listed.stdout)["reservations"]] == [rid]
    assert tenant.balance()["reserved"]["amount"] == 4000
    released = run(tenant, "release", rid, "--reason", "debugging")
    assert released.returncode == 0 and f"Released {rid}" in released.stdout
    assert tenant.balance()["reserved"]["amount"] == 0

    dry = run(tenant, "reserve", "20000", "--dry-run")
    assert dry.returncode == 1 and dry.stdout.startswith("DENY") and "nothing held" in dry.stdout
    denied = run(tenant, "reserve", "20000")
    assert denied.returncode == 1 and "BUDGET_EXCEEDED" in denied.stderr and len(denied.stderr.splitlines()) == 1
    shown = run(tenant, "balance")
    assert shown.returncode == 0 and f"tenant:{tenant.tenant_id}" in shown.stdout and "10,000" in shown.stdout


def test_commit_replay_and_missing_key(server: Server) -> None:
    tenant = new_tenant(server)
    tenant.budget(amount=10_000)
    rid = json.loads(run(tenant, "reserve", "1000", "--json").stdout)["reservation_id"]
    first = run(tenant, "commit", rid, "600", "--idempotency-key", "c-1")
    again = run(tenant, "commit", rid, "600", "--idempotency-key", "c-1")  # a retry answers the same
    assert first.returncode == again.returncode == 0 and first.stdout == again.stdout
    assert "charged 600 USD_MICROCENTS" in first.stdout and tenant.balance()["spent"]["amount"] == 600
    no_key = run(tenant, "balance", CYCLES_API_KEY="")
    assert no_key.returncode == 2 and "CYCLES_API_KEY" in no_key.stderr
