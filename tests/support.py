"""Test support: a real `cycles serve` process on a free loopback port and helpers to provision it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ADMIN_KEY = "test-admin-key-0123456789"
ALL_TENANT_PERMISSIONS = [
    "reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
    "reservations:list", "balances:read", "budgets:read", "budgets:write",
]
USD = "USD_MICROCENTS"
WEBHOOK_KEY = "dGVzdC13ZWJob29rLXNlY3JldC1rZXktMzItYnl0ZXM="  # base64 of 32 test bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cycles_bin() -> str:
    return str(Path(sys.executable).with_name("cycles"))


@dataclass
class Server:
    base_url: str
    store_url: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    admin_key: str = ADMIN_KEY
    args: list[str] = field(default_factory=list)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"X-Admin-API-Key": self.admin_key}, timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""


def start_server(store_url: str, log_dir: Path, *, workers: int = 1, sweep_interval_ms: int = 100,
                 admin_key: str | None = ADMIN_KEY, extra_env: dict[str, str | None] | None = None,
                 port: int | None = None) -> Server:
    port = port or free_port()
    env = dict(os.environ)
    env.pop("CYCLES_ADMIN_API_KEY", None)
    if admin_key is not None:
        env["CYCLES_ADMIN_API_KEY"] = admin_key
    # Webhook secrets are sealed with a key; Redis-backed servers must be given one (the embedded
    # store would make its own key file).
    env.setdefault("CYCLES_WEBHOOK_SECRET_KEY", WEBHOOK_KEY)
    # The hostile-input suites send thousands of bad keys from one address; the throttle has its own tests.
    env.setdefault("CYCLES_AUTH_FAILURES_PER_MINUTE", "1000000")
    env.setdefault("CYCLES_AUTH_FAILURE_RECORDS_PER_MINUTE", "1000000")
    # The tests read error bodies with httpx, whose User-Agent the default (errors_compat) takes for the
    # published runcycles SDK: they ask for the spec's body explicitly. None in extra_env unsets a variable.
    env.setdefault("CYCLES_ERROR_TRACE_ID", "1")
    for name, value in (extra_env or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    log_path = log_dir / f"server-{port}.log"
    args = [cycles_bin(), "serve", "--port", str(port), "--store", store_url, "--workers", str(workers),
            "--sweep-interval-ms", str(sweep_interval_ms), "--log-level", "warning"]
    proc = subprocess.Popen(args, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", store_url, proc, log_path, admin_key or "", args)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/actuator/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{server.log()}")


@dataclass
class Tenant:
    """A fresh tenant with an all-permissions key; helpers create budgets and clients for it."""

    server: Server
    tenant_id: str
    key: str

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 30)
        return httpx.Client(base_url=self.server.base_url, headers={"X-Cycles-API-Key": self.key}, **kw)

    def budget(self, scope_suffix: str = "", amount: int = 1_000_000, unit: str = USD, *,
               overdraft_limit: int | None = None, commit_overage_policy: str | None = None) -> dict[str, Any]:
        scope = f"tenant:{self.tenant_id}" + (f"/{scope_suffix}" if scope_suffix else "")
        body: dict[str, Any] = {"tenant_id": self.tenant_id, "scope": scope, "unit": unit,
                                "allocated": {"unit": unit, "amount": amount}}
        if overdraft_limit is not None:
            body["overdraft_limit"] = {"unit": unit, "amount": overdraft_limit}
        if commit_overage_policy is not None:
            body["commit_overage_policy"] = commit_overage_policy
        with self.server.admin() as c:
            r = c.post("/v1/admin/budgets", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def fund(self, scope_suffix: str, operation: str, amount: int, unit: str = USD, **extra: Any) -> httpx.Response:
        scope = f"tenant:{self.tenant_id}" + (f"/{scope_suffix}" if scope_suffix else "")
        body = {"operation": operation, "amount": {"unit": unit, "amount": amount}, **extra}
        with self.server.admin() as c:
            return c.post("/v1/admin/budgets/fund", params={"tenant_id": self.tenant_id, "scope": scope, "unit": unit},
                          json=body)

    def balance(self, scope_suffix: str = "", unit: str = USD) -> dict[str, Any]:
        scope = f"tenant:{self.tenant_id}" + (f"/{scope_suffix}" if scope_suffix else "")
        with self.client() as c:
            r = c.get("/v1/balances", params={"tenant": self.tenant_id, "include_children": "true", "limit": 200})
        assert r.status_code == 200, r.text
        for b in r.json()["balances"]:
            if b["scope"] == scope and b["remaining"]["unit"] == unit:
                return b
        raise AssertionError(f"no balance for {scope}: {r.text}")

    def subject(self, **levels: str) -> dict[str, str]:
        return {"tenant": self.tenant_id, **levels}


def new_tenant(server: Server, permissions: list[str] | None = None, tenant_id: str | None = None) -> Tenant:
    tenant_id = tenant_id or f"t-{uuid.uuid4().hex[:12]}"
    with server.admin() as c:
        r = c.post("/v1/admin/tenants", json={"tenant_id": tenant_id, "name": tenant_id})
        assert r.status_code in (200, 201), r.text
        r = c.post("/v1/admin/api-keys", json={"tenant_id": tenant_id, "name": "test",
                                                "permissions": permissions or ALL_TENANT_PERMISSIONS})
        assert r.status_code == 201, r.text
    return Tenant(server, tenant_id, r.json()["key_secret"])


def reserve_body(tenant: Tenant, amount: int, *, key: str | None = None, unit: str = USD, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "idempotency_key": key or uuid.uuid4().hex,
        "subject": extra.pop("subject", None) or tenant.subject(),
        "action": {"kind": "llm.completion", "name": "test-model"},
        "estimate": {"unit": unit, "amount": amount},
    }
    body.update(extra)
    return body
