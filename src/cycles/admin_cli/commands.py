"""`cycles admin ...`: operator commands over the admin API (cycles-governance-admin-v0.1.25).

Every command prints a table, or the raw JSON answer with --json. A non-2xx answer exits 1 with the
server's error code and message on stderr; bad options exit 2.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Literal, Optional

import typer

from . import render
from .governance import (AllowKinds, Clear, DenyKinds, KindQuotas, ObserveMode, RiskQuotas, quotas_app,
                         rule_fields)
from .client import DEFAULT_URL, AdminClient, Connection, connect
from .failures import failures, usage

UnitName = Literal["USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS"]
OveragePolicy = Literal["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]
FundOperation = Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]

Json = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer instead of a table.")]
Url = Annotated[str, typer.Option("--url", envvar=["CYCLES_BASE_URL", "CYCLES_URL"], show_envvar=True,
                                   help="Server base URL (CYCLES_URL is the deprecated name).")]
AdminKey = Annotated[Optional[str], typer.Option(
    "--admin-key", envvar="CYCLES_ADMIN_API_KEY", show_envvar=True, show_default=False,
    help="Operator key (X-Admin-API-Key).")]
Store = Annotated[Optional[str], typer.Option(
    "--store", help="LOCAL mode: run the server in this process on STORE_URL (sqlite:///path.db or redis://...) "
    "instead of calling --url.")]
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
OptTenant = Annotated[Optional[str], typer.Option("--tenant", help="Tenant id.")]
Scope = Annotated[Optional[str], typer.Option("--scope", help="Canonical scope, e.g. tenant:acme/workspace:eng "
                                                             "(default: tenant:<tenant>).")]
Unit = Annotated[UnitName, typer.Option("--unit", help="Budget unit.")]
OptUnit = Annotated[Optional[UnitName], typer.Option("--unit", help="Budget unit.")]
Overage = Annotated[Optional[OveragePolicy], typer.Option(
    "--commit-overage-policy", metavar="POLICY", help="REJECT, ALLOW_IF_AVAILABLE or ALLOW_WITH_OVERDRAFT.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, help="Page size.")]
Cursor = Annotated[Optional[str], typer.Option("--cursor", help="Cursor from the previous page.")]
All = Annotated[bool, typer.Option("--all", help="Follow cursors and print every page.")]
Amount = Annotated[int, typer.Option(min=0, help="Integer amount in the unit's minor units.")]

app = typer.Typer(help="Operate a Cycles server: tenants, API keys, budgets, policies, reservations, audit.",
                  no_args_is_help=True, add_completion=False)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant API keys.", no_args_is_help=True)
budgets_app = typer.Typer(help="Budget ledgers and funding.", no_args_is_help=True)
policies_app = typer.Typer(help="Policies (caps, rate limits, action-kind lists and quotas by scope pattern).",
                           no_args_is_help=True)
reservations_app = typer.Typer(help="Reservations (list, force release).", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(budgets_app, name="budgets")
app.add_typer(policies_app, name="policies")
app.add_typer(reservations_app, name="reservations")
app.add_typer(quotas_app, name="quotas")


@app.callback()
def admin(ctx: typer.Context, url: Url = DEFAULT_URL, admin_key: AdminKey = None, store: Store = None) -> None:
    """Admin commands. Connect with --url and --admin-key, or work on a store directly with --store."""
    deprecated_env()
    ctx.obj = Connection(url=url, admin_key=admin_key, store=store)


def deprecated_env() -> None:
    import os

    if os.environ.get("CYCLES_URL") and not os.environ.get("CYCLES_BASE_URL"):
        typer.echo("note: CYCLES_URL is deprecated; set CYCLES_BASE_URL (the name the SDK, MCP and demos read)",
                   err=True)


@contextlib.contextmanager
def session(conn: Connection) -> Iterator[AdminClient]:
    """A client whose failures end the command (see `failures`)."""
    with failures(conn.describe(), conn.admin_key, admin=True):
        with connect(conn) as client:
            yield client


def run(ctx: typer.Context, as_json: bool, call: Callable[[AdminClient], Any], show: Callable[[Any], None]) -> None:
    with session(ctx.find_object(Connection) or Connection()) as client:
        data = call(client)
    if as_json:
        render.emit_json(data)
    else:
        show(data)


def _scope(tenant: str | None, scope: str | None) -> str:
    if scope:
        return scope
    if tenant:
        return f"tenant:{tenant}"
    usage("give --scope (or --tenant for the tenant's root scope tenant:<tenant>)")


def _ledger_params(tenant: str | None, scope: str | None, unit: str) -> dict[str, Any]:
    return {"tenant_id": tenant, "scope": _scope(tenant, scope), "unit": unit}


def _amount(unit: str, value: int | None) -> dict[str, Any] | None:
    return None if value is None else {"unit": unit, "amount": value}


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None and v != {}}


def _metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            usage(f"--metadata takes KEY=VALUE, not {pair!r}")
        out[k] = v
    return out


# ---- tenants ----

@tenants_app.command("list")
def tenants_list(ctx: typer.Context,
                 status: Annotated[Optional[Literal["ACTIVE", "SUSPENDED", "CLOSED"]], typer.Option()] = None,
                 search: Annotated[Optional[str], typer.Option(help="Substring of the id or name.")] = None,
                 observe_mode: ObserveMode = None,
                 limit: Limit = None, cursor: Cursor = None, all_pages: All = False, as_json: Json = False) -> None:
    """List tenants."""
    params = {"status": status, "search": search, "observe_mode": observe_mode, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.page("/v1/admin/tenants", params, "tenants", all_pages), render.tenants)


@tenants_app.command("get")
def tenants_get(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """Show one tenant."""
    run(ctx, as_json, lambda c: c.get(f"/v1/admin/tenants/{tenant_id}"), render.tenant)


def _tenant_settings(overage: str | None, default_ttl: int | None, max_ttl: int | None, max_ext: int | None,
                     metadata: list[str] | None, observe_mode: str | None = None) -> dict[str, Any]:
    return {"default_commit_overage_policy": overage, "default_reservation_ttl_ms": default_ttl,
            "max_reservation_ttl_ms": max_ttl, "max_reservation_extensions": max_ext, "metadata": _metadata(metadata),
            "observe_mode": observe_mode}


TenantOverage = Annotated[Optional[OveragePolicy], typer.Option(
    "--default-commit-overage-policy", metavar="POLICY", help="REJECT, ALLOW_IF_AVAILABLE or ALLOW_WITH_OVERDRAFT.")]
DefaultTtl = Annotated[Optional[int], typer.Option("--default-reservation-ttl-ms", min=1000, max=86_400_000)]
MaxTtl = Annotated[Optional[int], typer.Option("--max-reservation-ttl-ms", min=1000, max=86_400_000)]
MaxExt = Annotated[Optional[int], typer.Option("--max-reservation-extensions", min=0)]
Metadata = Annotated[Optional[List[str]], typer.Option("--metadata", help="KEY=VALUE (repeatable).")]


@tenants_app.command("create")
def tenants_create(ctx: typer.Context, tenant_id: str,
                   name: Annotated[str, typer.Option(help="Display name.")],
                   overage: TenantOverage = None, default_ttl: DefaultTtl = None, max_ttl: MaxTtl = None,
                   max_ext: MaxExt = None, metadata: Metadata = None, observe_mode: ObserveMode = None,
                   as_json: Json = False) -> None:
    """Create a tenant (a no-op if it already exists with the same name)."""
    body = _compact({"tenant_id": tenant_id, "name": name,
                     **_tenant_settings(overage, default_ttl, max_ttl, max_ext, metadata, observe_mode)})
    created = []

    def call(c: AdminClient) -> Any:
        response = c.request("POST", "/v1/admin/tenants", body=body)
        created.append(response.status_code == 201)
        return response.json()

    def show(t: dict[str, Any]) -> None:
        typer.echo(f"{'Created' if created[0] else 'Already exists:'} tenant {t.get('tenant_id')}")
        render.tenant(t)

    run(ctx, as_json, call, show)


def _patch_tenant(ctx: typer.Context, tenant_id: str, body: dict[str, Any], as_json: bool, done: str) -> None:
    def show(t: dict[str, Any]) -> None:
        typer.echo(f"{done} tenant {tenant_id} (status {t.get('status')})")
        render.tenant(t)

    run(ctx, as_json, lambda c: c.call("PATCH", f"/v1/admin/tenants/{tenant_id}", body=body), show)


@tenants_app.command("update")
def tenants_update(ctx: typer.Context, tenant_id: str,
                   name: Annotated[Optional[str], typer.Option(help="Display name.")] = None,
                   status: Annotated[Optional[Literal["ACTIVE", "SUSPENDED"]], typer.Option()] = None,
                   overage: TenantOverage = None, default_ttl: DefaultTtl = None, max_ttl: MaxTtl = None,
                   max_ext: MaxExt = None, metadata: Metadata = None, observe_mode: ObserveMode = None,
                   as_json: Json = False) -> None:
    """Change a tenant's name, status, defaults or observe mode (closing has its own command: tenants close)."""
    body = _compact({"name": name, "status": status,
                     **_tenant_settings(overage, default_ttl, max_ttl, max_ext, metadata, observe_mode)})
    if not body:
        usage("nothing to update: give at least one option")
    _patch_tenant(ctx, tenant_id, body, as_json, "Updated")


@tenants_app.command("suspend")
def tenants_suspend(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """Suspend a tenant: no new reservations; open ones can still commit or release."""
    _patch_tenant(ctx, tenant_id, {"status": "SUSPENDED"}, as_json, "Suspended")


@tenants_app.command("reactivate")
def tenants_reactivate(ctx: typer.Context, tenant_id: str, as_json: Json = False) -> None:
    """Reactivate a suspended tenant."""
    _patch_tenant(ctx, tenant_id, {"status": "ACTIVE"}, as_json, "Reactivated")


@tenants_app.command("close")
def tenants_close(ctx: typer.Context, tenant_id: str,
                  yes: Annotated[bool, typer.Option("--yes", help="Confirm: closing is irreversible.")] = False,
                  as_json: Json = False) -> None:
    """Close a tenant for good: its keys are revoked, budgets closed, open reservations released."""
    if not yes:
        usage(f"closing tenant {tenant_id} is irreversible (keys revoked, budgets closed, reservations released); "
              "add --yes to confirm")
    _patch_tenant(ctx, tenant_id, {"status": "CLOSED"}, as_json, "Closed")


# ---- API keys ----

Permissions = Annotated[Optional[List[str]], typer.Option(
    "--permission", help="Permission, e.g. reservations:create (repeatable; replaces the whole set).")]
ScopeFilter = Annotated[Optional[List[str]], typer.Option(
    "--scope-filter", help="Restrict the key to a scope, e.g. workspace:eng (repeatable; replaces the whole list).")]


@keys_app.command("list")
def keys_list(ctx: typer.Context, tenant: OptTenant = None,
              status: Annotated[Optional[Literal["ACTIVE", "REVOKED", "EXPIRED"]], typer.Option()] = None,
              limit: Limit = None, cursor: Cursor = None, all_pages: All = False, as_json: Json = False) -> None:
    """List API keys (never their secrets)."""
    params = {"tenant_id": tenant, "status": status, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.page("/v1/admin/api-keys", params, "keys", all_pages), render.keys)


@keys_app.command("create")
def keys_create(ctx: typer.Context, tenant: Tenant, name: Annotated[str, typer.Option(help="Key name.")],
                permission: Permissions = None, scope_filter: ScopeFilter = None,
                expires_at: Annotated[Optional[str], typer.Option(help="RFC 3339 time (default: 90 days).")] = None,
                description: Annotated[Optional[str], typer.Option()] = None, as_json: Json = False) -> None:
    """Create a tenant API key. The secret is printed once and cannot be retrieved again."""
    body = _compact({"tenant_id": tenant, "name": name, "permissions": permission, "scope_filter": scope_filter,
                     "expires_at": expires_at, "description": description})
    run(ctx, as_json, lambda c: c.call("POST", "/v1/admin/api-keys", body=body), render.key_created)


@keys_app.command("update")
def keys_update(ctx: typer.Context, key_id: str, permission: Permissions = None, scope_filter: ScopeFilter = None,
                name: Annotated[Optional[str], typer.Option()] = None,
                description: Annotated[Optional[str], typer.Option()] = None, as_json: Json = False) -> None:
    """Change a key's permissions, scope filter, name or description (the secret stays the same)."""
    body = _compact({"permissions": permission, "scope_filter": scope_filter, "name": name, "description": description})
    if not body:
        usage("nothing to update: give at least one option")
    run(ctx, as_json, lambda c: c.call("PATCH", f"/v1/admin/api-keys/{key_id}", body=body), render.key)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str,
                reason: Annotated[Optional[str], typer.Option(help="Why (kept in the audit trail).")] = None,
                as_json: Json = False) -> None:
    """Revoke a key at once and for good."""
    def show(k: Any) -> None:
        typer.echo(f"Revoked {key_id}")
        if isinstance(k, dict):
            render.key(k)

    run(ctx, as_json, lambda c: c.call("DELETE", f"/v1/admin/api-keys/{key_id}", params={"reason": reason}), show)


# ---- budgets ----

@budgets_app.command("list")
def budgets_list(ctx: typer.Context, tenant: OptTenant = None,
                 scope_prefix: Annotated[Optional[str], typer.Option(help="e.g. tenant:acme/workspace:eng")] = None,
                 unit: OptUnit = None,
                 status: Annotated[Optional[Literal["ACTIVE", "FROZEN", "CLOSED"]], typer.Option()] = None,
                 over_limit: Annotated[Optional[bool], typer.Option("--over-limit/--not-over-limit")] = None,
                 has_debt: Annotated[Optional[bool], typer.Option("--has-debt/--no-debt")] = None,
                 limit: Limit = None, cursor: Cursor = None, all_pages: All = False, as_json: Json = False) -> None:
    """List budget ledgers (all tenants unless --tenant)."""
    params = {"tenant_id": tenant, "scope_prefix": scope_prefix, "unit": unit, "status": status,
              "over_limit": over_limit, "has_debt": has_debt, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.page("/v1/admin/budgets", params, "ledgers", all_pages), render.budgets)


@budgets_app.command("get")
def budgets_get(ctx: typer.Context, unit: Unit, tenant: OptTenant = None, scope: Scope = None,
                as_json: Json = False) -> None:
    """Show the budget of exactly one (scope, unit)."""
    params = _ledger_params(tenant, scope, unit)
    run(ctx, as_json, lambda c: c.get("/v1/admin/budgets/lookup", params), render.budget)


@budgets_app.command("create")
def budgets_create(ctx: typer.Context, tenant: Tenant, unit: Unit, allocated: Amount, scope: Scope = None,
                   overdraft_limit: Annotated[Optional[int], typer.Option(min=0)] = None,
                   overage: Overage = None, as_json: Json = False) -> None:
    """Create the budget ledger of a (scope, unit)."""
    body = _compact({"tenant_id": tenant, "scope": _scope(tenant, scope), "unit": unit,
                     "allocated": _amount(unit, allocated), "overdraft_limit": _amount(unit, overdraft_limit),
                     "commit_overage_policy": overage})
    run(ctx, as_json, lambda c: c.call("POST", "/v1/admin/budgets", body=body), render.budget)


@budgets_app.command("update")
def budgets_update(ctx: typer.Context, unit: Unit, tenant: OptTenant = None, scope: Scope = None,
                   overdraft_limit: Annotated[Optional[int], typer.Option(min=0)] = None,
                   overage: Overage = None, metadata: Metadata = None, as_json: Json = False) -> None:
    """Change a budget's overdraft limit, commit overage policy or metadata.
    To change the allocation use `budgets fund --operation RESET`."""
    body = _compact({"overdraft_limit": _amount(unit, overdraft_limit), "commit_overage_policy": overage,
                     "metadata": _metadata(metadata)})
    if not body:
        usage("nothing to update: give --overdraft-limit, --commit-overage-policy or --metadata")
    params = _ledger_params(tenant, scope, unit)
    run(ctx, as_json, lambda c: c.call("PATCH", "/v1/admin/budgets", params=params, body=body), render.budget)


def _transition(ctx: typer.Context, path: str, tenant: str | None, scope: str | None, unit: str,
                reason: str | None, as_json: bool) -> None:
    params = _ledger_params(tenant, scope, unit)
    body = _compact({"reason": reason})
    run(ctx, as_json, lambda c: c.call("POST", path, params=params, body=body), render.budget)


Reason = Annotated[Optional[str], typer.Option(help="Why (kept in the audit trail).")]


@budgets_app.command("freeze")
def budgets_freeze(ctx: typer.Context, unit: Unit, tenant: OptTenant = None, scope: Scope = None,
                   reason: Reason = None, as_json: Json = False) -> None:
    """Freeze a budget: no reservations, commits or funding until unfrozen."""
    _transition(ctx, "/v1/admin/budgets/freeze", tenant, scope, unit, reason, as_json)


@budgets_app.command("unfreeze")
def budgets_unfreeze(ctx: typer.Context, unit: Unit, tenant: OptTenant = None, scope: Scope = None,
                     reason: Reason = None, as_json: Json = False) -> None:
    """Unfreeze a frozen budget."""
    _transition(ctx, "/v1/admin/budgets/unfreeze", tenant, scope, unit, reason, as_json)


@budgets_app.command("fund")
def budgets_fund(ctx: typer.Context, tenant: Tenant, unit: Unit,
                 operation: Annotated[FundOperation, typer.Option()],
                 amount: Amount, scope: Scope = None,
                 spent: Annotated[Optional[int], typer.Option(min=0, help="RESET_SPENT only: new spent.")] = None,
                 idempotency_key: Annotated[Optional[str], typer.Option(
                     help="Reuse to make a repeated run a no-op (default: a new key per run).")] = None,
                 reason: Reason = None, as_json: Json = False) -> None:
    """Credit, debit, reset (resize the allocation), repay debt, or start a new period (RESET_SPENT)."""
    key = idempotency_key or f"cli-{uuid.uuid4().hex}"
    params = {"tenant_id": tenant, "scope": _scope(tenant, scope), "unit": unit}
    body = _compact({"operation": operation, "amount": _amount(unit, amount), "spent": _amount(unit, spent),
                     "idempotency_key": key, "reason": reason})

    def show(r: dict[str, Any]) -> None:
        render.funding(r)
        typer.echo(f"Idempotency key: {key}")

    # retry: a resend after a lost answer carries the same key, so the server applies it at most once
    run(ctx, as_json, lambda c: c.call("POST", "/v1/admin/budgets/fund", params=params, body=body, retry=True), show)


# ---- policies ----

PolicyStatus = Annotated[Optional[Literal["ACTIVE", "DISABLED"]], typer.Option("--status")]
Priority = Annotated[Optional[int], typer.Option(min=0, help="Higher wins when several policies match.")]
MaxTokens = Annotated[Optional[int], typer.Option(min=0)]
Tools = Annotated[Optional[List[str]], typer.Option(help="Repeatable.")]
PerMinute = Annotated[Optional[int], typer.Option(min=1)]
FromJson = Annotated[Optional[Path], typer.Option(
    "--from-json", exists=True, dir_okay=False, help="A JSON object with the request body; options override it.")]


def _json_object(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except ValueError as err:
        usage(f"{path}: not JSON: {err}")
    if not isinstance(body, dict):
        usage(f"{path}: must hold a JSON object")
    return body


def _policy_body(from_json: Path | None, current: dict[str, Any] | None, fields: dict[str, Any],
                 caps: dict[str, Any], rate_limits: dict[str, Any]) -> dict[str, Any]:
    """The --from-json object with the options on top. The API replaces caps and rate_limits whole, so cap
    and limit options are merged into the ones the policy (or the JSON file) already has."""
    body = _json_object(from_json) if from_json is not None else {}
    for group, given in (("caps", _compact(caps)), ("rate_limits", _compact(rate_limits))):
        if given:
            base = body.get(group) or (current or {}).get(group) or {}
            body[group] = {**_compact(base), **given}
    body.update(_compact(fields))
    return body


@policies_app.command("list")
def policies_list(ctx: typer.Context, tenant: Tenant, status: PolicyStatus = None,
                  scope_pattern: Annotated[Optional[str], typer.Option()] = None,
                  has_action_quotas: Annotated[bool, typer.Option("--has-action-quotas")] = False,
                  references_action_kind: Annotated[Optional[str], typer.Option(
                      "--references-action-kind", metavar="KIND", help="Quotas or lists naming this kind.")] = None,
                  limit: Limit = None, cursor: Cursor = None, all_pages: All = False, as_json: Json = False) -> None:
    """List a tenant's policies."""
    params = {"tenant_id": tenant, "status": status, "scope_pattern": scope_pattern, "limit": limit, "cursor": cursor,
              "has_action_quotas": "true" if has_action_quotas else None,
              "references_action_kind": references_action_kind}
    run(ctx, as_json, lambda c: c.page("/v1/admin/policies", params, "policies", all_pages), render.policies)


@policies_app.command("get")
def policies_get(ctx: typer.Context, policy_id: str, as_json: Json = False) -> None:
    """Show one policy."""
    run(ctx, as_json, lambda c: c.get(f"/v1/admin/policies/{policy_id}"), render.policy)


@policies_app.command("create")
def policies_create(ctx: typer.Context, tenant: OptTenant = None,
                    name: Annotated[Optional[str], typer.Option(help="Unique per tenant.")] = None,
                    scope_pattern: Annotated[Optional[str], typer.Option(
                        help="e.g. tenant:acme/workspace:eng/* (all descendants).")] = None,
                    description: Annotated[Optional[str], typer.Option()] = None,
                    priority: Priority = None, max_tokens: MaxTokens = None,
                    tool_allowlist: Tools = None, tool_denylist: Tools = None,
                    max_reservations_per_minute: PerMinute = None, max_commits_per_minute: PerMinute = None,
                    overage: Overage = None, allow_kind: AllowKinds = None, deny_kind: DenyKinds = None,
                    action_quota: KindQuotas = None, risk_class_quota: RiskQuotas = None,
                    from_json: FromJson = None, as_json: Json = False) -> None:
    """Create a policy for a tenant's scopes."""
    fields = {"tenant_id": tenant, "name": name, "scope_pattern": scope_pattern, "description": description,
              "priority": priority, "commit_overage_policy": overage,
              **rule_fields(allow_kind, deny_kind, action_quota, risk_class_quota, None)}
    caps = {"max_tokens": max_tokens, "tool_allowlist": tool_allowlist, "tool_denylist": tool_denylist}
    limits = {"max_reservations_per_minute": max_reservations_per_minute,
              "max_commits_per_minute": max_commits_per_minute}
    body = _policy_body(from_json, None, fields, caps, limits)
    missing = [f"--{f.replace('_', '-')}" for f in ("tenant_id", "name", "scope_pattern") if not body.get(f)]
    if missing:
        usage(f"missing {', '.join(missing).replace('--tenant-id', '--tenant')} (as options or in --from-json)")
    run(ctx, as_json, lambda c: c.call("POST", "/v1/admin/policies", body=body), render.policy)


@policies_app.command("update")
def policies_update(ctx: typer.Context, policy_id: str,
                    name: Annotated[Optional[str], typer.Option()] = None,
                    description: Annotated[Optional[str], typer.Option()] = None,
                    priority: Priority = None, max_tokens: MaxTokens = None,
                    tool_allowlist: Tools = None, tool_denylist: Tools = None,
                    max_reservations_per_minute: PerMinute = None, max_commits_per_minute: PerMinute = None,
                    overage: Overage = None, status: PolicyStatus = None, allow_kind: AllowKinds = None,
                    deny_kind: DenyKinds = None, action_quota: KindQuotas = None, risk_class_quota: RiskQuotas = None,
                    clear: Clear = None, from_json: FromJson = None, as_json: Json = False) -> None:
    """Change a policy. Cap and rate-limit options keep the policy's other caps and limits; the action-kind
    list and quota options replace the list they name."""
    fields = {"name": name, "description": description, "priority": priority, "commit_overage_policy": overage,
              "status": status, **rule_fields(allow_kind, deny_kind, action_quota, risk_class_quota, clear)}
    caps = {"max_tokens": max_tokens, "tool_allowlist": tool_allowlist, "tool_denylist": tool_denylist}
    limits = {"max_reservations_per_minute": max_reservations_per_minute,
              "max_commits_per_minute": max_commits_per_minute}

    def call(c: AdminClient) -> Any:
        merging = _compact(caps) or _compact(limits)
        current = c.get(f"/v1/admin/policies/{policy_id}") if merging else None
        body = _policy_body(from_json, current, fields, caps, limits)
        if not body:
            usage("nothing to update: give at least one option")
        return c.call("PATCH", f"/v1/admin/policies/{policy_id}", body=body)

    run(ctx, as_json, call, render.policy)


@policies_app.command("delete")
def policies_delete(ctx: typer.Context, policy_id: str, as_json: Json = False) -> None:
    """Delete a policy."""
    run(ctx, as_json, lambda c: c.call("DELETE", f"/v1/admin/policies/{policy_id}"),
        lambda _: typer.echo(f"Deleted policy {policy_id}"))


# ---- reservations ----

ReservationStatus = Literal["ACTIVE", "COMMITTED", "RELEASED", "EXPIRED"]


@reservations_app.command("list")
def reservations_list(ctx: typer.Context, tenant: Tenant,
                      status: Annotated[Optional[ReservationStatus], typer.Option()] = None,
                      limit: Limit = None, cursor: Cursor = None, all_pages: All = False,
                      as_json: Json = False) -> None:
    """List a tenant's reservations."""
    params = {"tenant": tenant, "status": status, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.page("/v1/reservations", params, "reservations", all_pages), render.reservations)


@reservations_app.command("release")
def reservations_release(ctx: typer.Context, reservation_id: str,
                         reason: Annotated[str, typer.Option(help="Why (kept with the reservation).")],
                         idempotency_key: Annotated[Optional[str], typer.Option()] = None,
                         as_json: Json = False) -> None:
    """Force-release a reservation with the operator key, returning its hold to the budgets."""
    body = {"idempotency_key": idempotency_key or f"cli-release-{uuid.uuid4().hex}", "reason": reason}
    run(ctx, as_json,
        lambda c: c.call("POST", f"/v1/reservations/{reservation_id}/release", body=body, retry=True),
        lambda r: render.released(reservation_id, r))


# ---- audit, overview ----

@app.command("audit")
def audit(ctx: typer.Context, tenant: OptTenant = None,
          operation: Annotated[Optional[str], typer.Option(help="Operation id(s), comma-separated, "
                                                                "e.g. createBudget,fundBudget.")] = None,
          since: Annotated[Optional[str], typer.Option("--from", help="RFC 3339 time.")] = None,
          until: Annotated[Optional[str], typer.Option("--to", help="RFC 3339 time.")] = None,
          limit: Limit = None, cursor: Cursor = None, as_json: Json = False) -> None:
    """Query the audit log."""
    params = {"tenant_id": tenant, "operation": operation, "from": since, "to": until, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.get("/v1/admin/audit/logs", params), render.audit)


@app.command("overview")
def overview(ctx: typer.Context, as_json: Json = False) -> None:
    """Counts, over-limit and indebted budgets, recent denials: the operator's dashboard."""
    run(ctx, as_json, lambda c: c.get("/v1/admin/overview"), render.overview)


# ---- cycles apply (registered at the top level by cycles.cli) ----

def apply_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML file of tenants, budgets, policies.")],
    plan_only: Annotated[bool, typer.Option("--plan", "--dry-run", help="Show the plan and change nothing.")] = False,
    url: Url = DEFAULT_URL, admin_key: AdminKey = None, store: Store = None, as_json: Json = False,
) -> None:
    """Make the server match FILE: create what is missing, update what differs. Deletes nothing."""
    from . import apply

    try:
        doc = apply.load(file)
    except apply.FileError as err:
        for problem in err.problems:
            typer.echo(f"{file}: {problem}", err=True)
        raise typer.Exit(2)
    deprecated_env()
    conn = Connection(url=url, admin_key=admin_key, store=store)
    with session(conn) as client:
        code = apply.run(client, doc, plan_only=plan_only, as_json=as_json)
    raise typer.Exit(code)
