"""Where a demo runs: an embedded server started in this process, or an existing one.

* Embedded (default): the real application (`cycles.server.app.create_app`) served by uvicorn on a
  free loopback port from a background thread, on a SQLite store in a temporary directory that is
  deleted afterwards. The admin key is random and lives only in this process.
* External, when CYCLES_BASE_URL is set:
  * with CYCLES_API_KEY (a tenant key holding `admin:write`, as the public provisioning script
    creates): budgets are created with that key under CYCLES_TENANT (default `demo-tenant`) in a
    workspace unique to this run, so the demo can be repeated. The tenant-level budget belongs to the
    user and is left alone (a spent one would stop every later run; if it has less than the run needs,
    the run stops there). The admin API cannot delete budgets, so the run's budgets stay and are named;
  * with CYCLES_ADMIN_API_KEY instead: a fresh tenant `demo-<random>` is created, used and closed
    (status CLOSED) at the end.

Provisioning follows the public demos' `scripts/provision.sh`: `POST /v1/admin/tenants` with
`X-Admin-API-Key`, `POST /v1/admin/api-keys` with the demo permissions, then `POST /v1/admin/budgets`
with the new tenant key (`X-Cycles-API-Key`) for every scope.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx

USD = "USD_MICROCENTS"
CENT = 1_000_000          # $0.01 in USD_MICROCENTS
DOLLAR = 100 * CENT       # $1.00
DEMO_PERMISSIONS = ["reservations:create", "reservations:commit", "reservations:release", "reservations:extend",
                    "balances:read", "admin:write"]
DEMO_TENANT = "demo-tenant"
DEFAULT_LEVELS = {"workspace": "default", "app": "default", "workflow": "default", "agent": "support-bot"}


class DemoSetupError(RuntimeError):
    """The demo could not reach or provision its server (shown to the user; exit status 2, or 5 when the
    server cannot be reached, as for every `cycles` command)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def money(microcents: int) -> str:
    """USD_MICROCENTS as dollars: 100_000_000 -> '$1.00'."""
    dollars = microcents / DOLLAR
    return f"-${-dollars:,.2f}" if dollars < 0 else f"${dollars:,.2f}"


class EmbeddedServer:
    """Our server on a temporary SQLite store, served by uvicorn from a daemon thread on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        import uvicorn

        from ..server.app import create_app
        from ..store.sqlite import SQLiteStore

        self.admin_key = "demo-admin-" + secrets.token_hex(16)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.store_path = directory / "cycles.db"
        app = create_app(SQLiteStore(str(self.store_path)), admin_key=self.admin_key, sweep_interval_s=1.0)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="cycles-demo-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DemoSetupError(f"the embedded server did not start: {self._error!r}")
            time.sleep(0.01)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - reported by the starting thread
            self._error = exc

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


@dataclass
class DemoBackend:
    """The server a demo talks to, the demo tenant and key, and the subject levels of its agent."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    mode: str = ""                 # "embedded" | "external (tenant key)" | "external (admin key)"
    base_url: str = ""
    tenant: str = ""
    api_key: str = ""
    levels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    notes: list[str] = field(default_factory=list)
    created_scopes: list[str] = field(default_factory=list)
    _admin_key: str | None = None
    _tmp: str | None = None
    _embedded: EmbeddedServer | None = None
    _close_tenant: bool = False

    # ---- lifecycle ----

    def __enter__(self) -> "DemoBackend":
        self._tmp = tempfile.mkdtemp(prefix="cycles-demo-")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        base_url = (self.env.get("CYCLES_BASE_URL") or "").strip().rstrip("/")
        if not base_url:
            self._embedded = EmbeddedServer(Path(self._tmp or "."))
            self.mode = "embedded"
            self.base_url = self._embedded.base_url
            self._admin_key = self._embedded.admin_key
            self.tenant = DEMO_TENANT
            self._create_tenant_and_key()
            return
        self.base_url = base_url
        api_key = (self.env.get("CYCLES_API_KEY") or "").strip()
        admin_key = (self.env.get("CYCLES_ADMIN_API_KEY") or "").strip()
        if not api_key and not admin_key:
            raise DemoSetupError("CYCLES_BASE_URL is set but neither CYCLES_API_KEY (a tenant key with "
                                 "admin:write) nor CYCLES_ADMIN_API_KEY is; unset CYCLES_BASE_URL to run the demo "
                                 "on an embedded server")
        self._check_health()
        if api_key:
            self.mode = "external (tenant key)"
            self.api_key = api_key
            self.tenant = (self.env.get("CYCLES_TENANT") or "").strip() or DEMO_TENANT
            # A workspace of its own, so a second run does not find the first run's spent budgets.
            self.levels["workspace"] = "demo-" + secrets.token_hex(3)
        elif admin_key:
            self.mode = "external (admin key)"
            self._admin_key = admin_key
            self.tenant = "demo-" + secrets.token_hex(4)
            self._create_tenant_and_key()
            self._close_tenant = True

    def close(self) -> None:
        if self._close_tenant and self._admin_key:
            try:
                with self._http(admin=True) as c:
                    r = c.patch(f"/v1/admin/tenants/{self.tenant}", json={"status": "CLOSED"})
                self.notes.append(f"closed the demo tenant {self.tenant}" if r.status_code == 200 else
                                  f"could not close the demo tenant {self.tenant}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.notes.append(f"could not close the demo tenant {self.tenant}: {exc}")
            self._close_tenant = False
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def journal_dir(self) -> str:
        return str(Path(self._tmp or tempfile.gettempdir()) / "journal")

    # ---- HTTP ----

    def _http(self, *, admin: bool = False) -> httpx.Client:
        headers = {"X-Admin-API-Key": self._admin_key or ""} if admin else {"X-Cycles-API-Key": self.api_key}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10)

    def _check_health(self) -> None:
        try:
            r = httpx.get(self.base_url + "/actuator/health", timeout=5)
        except httpx.HTTPError as exc:
            raise DemoSetupError(f"cannot reach the Cycles server at {self.base_url}: {exc}", 5) from None
        if r.status_code != 200:
            raise DemoSetupError(f"{self.base_url}/actuator/health answered {r.status_code}: {r.text[:200]}")

    def _create_tenant_and_key(self) -> None:
        """Steps 1 and 2 of the public provisioning script."""
        with self._http(admin=True) as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": self.tenant, "name": "Demo Tenant"})
            if r.status_code not in (200, 201, 409):
                raise DemoSetupError(f"POST /v1/admin/tenants answered {r.status_code}: {r.text[:300]}")
            r = c.post("/v1/admin/api-keys", json={"tenant_id": self.tenant, "name": "demo-key",
                                                    "permissions": DEMO_PERMISSIONS})
            if r.status_code not in (200, 201):
                raise DemoSetupError(f"POST /v1/admin/api-keys answered {r.status_code}: {r.text[:300]}")
            self.api_key = r.json()["key_secret"]

    # ---- scopes and budgets ----

    def scope(self, *, upto: str = "agent", toolset: str | None = None) -> str:
        parts = [f"tenant:{self.tenant}"]
        for level in ("workspace", "app", "workflow", "agent"):
            parts.append(f"{level}:{self.levels[level]}")
            if level == upto:
                break
        if toolset:
            parts.append(f"toolset:{toolset}")
        return "/".join(parts)

    def hierarchy(self) -> list[str]:
        """tenant, workspace, app, workflow, agent scopes of the demo agent."""
        return [f"tenant:{self.tenant}"] + [self.scope(upto=level) for level in ("workspace", "app", "workflow",
                                                                                  "agent")]

    @property
    def own_tenant(self) -> bool:
        """True when the demo runs in the user's existing tenant (tenant-key mode)."""
        return self.mode == "external (tenant key)"

    def create_budgets(self, budgets: list[tuple[str, int]]) -> None:
        """Step 3 of the public provisioning script: one budget per scope, with the tenant key.

        In the user's own tenant the tenant-level budget is the user's: it is neither created nor changed
        (a spent $1.00 there would stop every later run), and the run's scopes below it are fresh."""
        tenant_scope = f"tenant:{self.tenant}"
        if self.own_tenant and any(scope == tenant_scope for scope, _ in budgets):
            budgets = [(scope, amount) for scope, amount in budgets if scope != tenant_scope]
            left = self.balances().get(tenant_scope)
            self.notes.append(f"{tenant_scope} is your tenant: the demo adds no budget there "
                              + (f"(its budget has {money(left['remaining'])} remaining)" if left else
                                 "(it has none)"))
        with self._http() as c:
            for scope, amount in budgets:
                r = c.post("/v1/admin/budgets", json={"scope": scope, "unit": USD,
                                                      "allocated": {"amount": amount, "unit": USD}})
                if r.status_code not in (200, 201):
                    raise DemoSetupError(f"POST /v1/admin/budgets for {scope} answered {r.status_code}: "
                                         f"{r.text[:300]}")
                self.created_scopes.append(scope)
        if self.own_tenant:
            self.notes.append(f"the run's budgets stay on the server under {self.scope(upto='workspace')} "
                              "(the admin API has no delete)")

    def balances(self) -> dict[str, dict[str, int]]:
        """scope -> {allocated, spent, reserved, remaining} in USD_MICROCENTS, read from GET /v1/balances."""
        out: dict[str, dict[str, int]] = {}
        cursor: str | None = None
        with self._http() as c:
            for _ in range(50):
                params: dict[str, Any] = {"tenant": self.tenant, "include_children": "true", "limit": 200}
                if cursor:
                    params["cursor"] = cursor
                r = c.get("/v1/balances", params=params)
                if r.status_code != 200:
                    raise DemoSetupError(f"GET /v1/balances answered {r.status_code}: {r.text[:300]}")
                body = r.json()
                for b in body.get("balances", []):
                    if b["remaining"]["unit"] == USD:
                        out[b["scope"]] = {k: b[k]["amount"] for k in ("allocated", "spent", "reserved", "remaining")}
                cursor = body.get("next_cursor")
                if not body.get("has_more") or not cursor:
                    break
        return out

    def describe(self) -> str:
        kind = "embedded, temporary store" if self.mode == "embedded" else self.mode.replace(" (", ", ").rstrip(")")
        return f"{self.base_url} ({kind}) · tenant {self.tenant}"

    def budget_range(self) -> str:
        """'tenant:t down to agent:a' (or from the run's workspace in the user's own tenant)."""
        top = f"workspace:{self.levels['workspace']}" if self.own_tenant else f"tenant:{self.tenant}"
        return f"{top} down to agent:{self.levels['agent']}"
