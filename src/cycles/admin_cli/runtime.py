"""`cycles reserve | commit | release | balance | reservations`: the runtime API with a tenant key.

For operators debugging a live system and for trying Cycles by hand. They read the SDK's environment
(CYCLES_BASE_URL, CYCLES_API_KEY, CYCLES_TENANT), so the same shell drives both. Exit codes as for
`cycles admin`: 1 the server refused (including a DENY), 2 bad usage, 5 server unreachable.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any, Iterator, Optional

import httpx
import typer

from . import render
from .client import DEFAULT_URL, AdminClient
from .commands import All, Cursor, Json, Limit, UnitName
from .failures import failures, usage

BaseUrl = Annotated[str, typer.Option("--url", envvar="CYCLES_BASE_URL", show_envvar=True,
                                      help="Server base URL.")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="CYCLES_API_KEY", show_envvar=True,
                                               show_default=False, help="Tenant API key (X-Cycles-API-Key).")]
TenantId = Annotated[Optional[str], typer.Option("--tenant", envvar="CYCLES_TENANT", show_envvar=True,
                                                 help="Tenant id (default: the key's tenant).")]
Unit = Annotated[UnitName, typer.Option("--unit", help="Unit of the amount.")]
IdemKey = Annotated[Optional[str], typer.Option(
    "--idempotency-key", help="Reuse to make a repeated run return the first answer (default: a new key).")]


@contextlib.contextmanager
def tenant_session(url: str, api_key: str | None) -> Iterator[AdminClient]:
    if not api_key:
        usage("no API key: pass --api-key or set CYCLES_API_KEY (a tenant key, from "
              "`cycles admin keys create --tenant TENANT --name NAME`)")
    with failures(url, api_key, admin=False):
        with httpx.Client(base_url=url, headers={"X-Cycles-API-Key": api_key}, timeout=30) as http:
            yield AdminClient(http)


def _tenant(client: AdminClient, tenant: str | None) -> str:
    if tenant:
        return tenant
    who = client.get("/v1/auth/introspect")
    found = who.get("tenant_id") or who.get("tenant")
    if not found:
        usage("give --tenant or set CYCLES_TENANT")
    return str(found)


def reserve(amount: Annotated[int, typer.Argument(min=1, help="Estimate, in the unit's minor units.")],
            unit: Unit = "USD_MICROCENTS", tenant: TenantId = None,
            workspace: Annotated[Optional[str], typer.Option()] = None,
            app: Annotated[Optional[str], typer.Option()] = None,
            workflow: Annotated[Optional[str], typer.Option()] = None,
            agent: Annotated[Optional[str], typer.Option()] = None,
            toolset: Annotated[Optional[str], typer.Option()] = None,
            kind: Annotated[str, typer.Option(help="Action kind.")] = "llm.completion",
            name: Annotated[str, typer.Option(help="Action name, e.g. the model.")] = "cli",
            ttl_ms: Annotated[Optional[int], typer.Option(min=1000, max=86_400_000,
                                                          help="Lease length (server default 60000).")] = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide only; hold nothing.")] = False,
            idempotency_key: IdemKey = None, url: BaseUrl = DEFAULT_URL, api_key: ApiKey = None,
            as_json: Json = False) -> None:
    """Reserve AMOUNT before an action. Prints the decision and the reservation id to commit or release."""
    key = idempotency_key or f"cli-{uuid.uuid4().hex}"
    with tenant_session(url, api_key) as client:
        levels = {"workspace": workspace, "app": app, "workflow": workflow, "agent": agent, "toolset": toolset}
        subject = {"tenant": _tenant(client, tenant), **{k: v for k, v in levels.items() if v}}
        body: dict[str, Any] = {"idempotency_key": key, "subject": subject, "action": {"kind": kind, "name": name},
                                "estimate": {"unit": unit, "amount": amount}}
        if ttl_ms is not None:
            body["ttl_ms"] = ttl_ms
        if dry_run:
            body["dry_run"] = True
        answer = client.call("POST", "/v1/reservations", body=body, retry=True)
    if as_json:
        render.emit_json(answer)
    else:
        decision = answer.get("decision")
        rid = answer.get("reservation_id")
        typer.echo(f"{decision}" + (f" {rid}" if rid else "") + (" (dry run: nothing held)" if dry_run else "") +
                   (f" (reason {answer['reason_code']})" if answer.get("reason_code") else "") +
                   (f", expires {render.ms_time(answer.get('expires_at_ms'))}" if answer.get("expires_at_ms") else ""))
        if rid:
            typer.echo(f"Next: cycles commit {rid} ACTUAL   or   cycles release {rid}")
    if answer.get("decision") == "DENY":
        raise typer.Exit(1)


def commit(reservation_id: str,
           actual: Annotated[int, typer.Argument(min=0, help="What the action really cost, in minor units.")],
           unit: Unit = "USD_MICROCENTS", idempotency_key: IdemKey = None, url: BaseUrl = DEFAULT_URL,
           api_key: ApiKey = None, as_json: Json = False) -> None:
    """Commit the actual cost of a reservation; the rest of its hold returns to the budgets."""
    body = {"idempotency_key": idempotency_key or f"cli-commit-{uuid.uuid4().hex}",
            "actual": {"unit": unit, "amount": actual}}
    with tenant_session(url, api_key) as client:
        answer = client.call("POST", f"/v1/reservations/{reservation_id}/commit", body=body, retry=True)
    if as_json:
        render.emit_json(answer)
        return
    released = answer.get("released")
    typer.echo(f"{answer.get('status', 'COMMITTED')} {reservation_id}: charged {render.amount(answer.get('charged'))}"
               + (f", released {render.amount(released)}" if released else ""))


def release(reservation_id: str,
            reason: Annotated[Optional[str], typer.Option(help="Why (kept with the reservation).")] = None,
            idempotency_key: IdemKey = None, url: BaseUrl = DEFAULT_URL, api_key: ApiKey = None,
            as_json: Json = False) -> None:
    """Release a reservation without charging: its whole hold returns to the budgets."""
    body = {"idempotency_key": idempotency_key or f"cli-release-{uuid.uuid4().hex}"}
    if reason:
        body["reason"] = reason
    with tenant_session(url, api_key) as client:
        answer = client.call("POST", f"/v1/reservations/{reservation_id}/release", body=body, retry=True)
    if as_json:
        render.emit_json(answer)
    else:
        render.released(reservation_id, answer)


def balance(tenant: TenantId = None,
            scope_prefix: Annotated[Optional[str], typer.Option(help="Only scopes under this one.")] = None,
            url: BaseUrl = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Show the tenant's budgets: allocated, remaining, reserved, spent, debt."""
    with tenant_session(url, api_key) as client:
        params = {"tenant": _tenant(client, tenant), "include_children": True, "limit": 200}
        answer = client.page("/v1/balances", params, "balances", all_pages=True)
    rows = [b for b in answer.get("balances") or [] if not scope_prefix or str(b.get("scope")).startswith(scope_prefix)]
    if as_json:
        render.emit_json({"balances": rows})
        return
    columns = ["Scope", "Unit", "Allocated", "Remaining", "Reserved", "Spent", "Debt"]
    render.table("Balances", columns,
                 ([b.get("scope"), (b.get("remaining") or {}).get("unit")] +
                  [render.bare(b.get(f)) for f in ("allocated", "remaining", "reserved", "spent", "debt")]
                  for b in rows), numeric=columns[2:], whole=("Scope",))


def reservations(tenant: TenantId = None,
                 status: Annotated[Optional[str], typer.Option(
                     help="ACTIVE, COMMITTED, RELEASED or EXPIRED.")] = None,
                 limit: Limit = None, cursor: Cursor = None, all_pages: All = False,
                 url: BaseUrl = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """List the tenant's reservations (ACTIVE ones are holding budget)."""
    with tenant_session(url, api_key) as client:
        params = {"tenant": _tenant(client, tenant), "status": status, "limit": limit, "cursor": cursor}
        answer = client.page("/v1/reservations", params, "reservations", all_pages)
    if as_json:
        render.emit_json(answer)
    else:
        render.reservations(answer)


def register(app: typer.Typer) -> None:
    for command in (reserve, commit, release, balance, reservations):
        app.command(rich_help_panel="Runtime (tenant API key)")(command)
