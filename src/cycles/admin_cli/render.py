"""Terminal output: rich tables for people, raw JSON with --json for scripts.

Amounts are int64 minor units and are shown as integers with their unit, never converted to decimals.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def console() -> Console:
    # Created per call so output follows whatever sys.stdout is now (e.g. a test runner's capture).
    return Console(highlight=False)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def error(code: str, message: str, request_id: str | None = None) -> None:
    suffix = f" (request_id {request_id})" if request_id else ""
    typer.echo(f"error: {code}: {message}{suffix}", err=True)


def num(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def amount(value: Any) -> str:
    """An Amount object ({unit, amount}) as '1,000 TOKENS'."""
    if isinstance(value, dict) and "amount" in value:
        return f"{num(value['amount'])} {value.get('unit', '')}".strip()
    return num(value)


def bare(value: Any) -> str:
    """An Amount's number alone, for tables that carry a Unit column."""
    return num(value.get("amount")) if isinstance(value, dict) else num(value)


def ms_time(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    return datetime.fromtimestamp(value / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return ", ".join(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return num(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, numeric: Sequence[str] = (),
          whole: Sequence[str] = ()) -> None:
    """Numbers and the `whole` columns (ids, scopes, times: things to copy) are never wrapped or cut; a
    table that cannot fit the terminal that way is printed wider than it, so each row stays one line."""
    cells = [[v if isinstance(v, str) else text(v) for v in row] for row in rows]
    if not cells:
        typer.echo(f"{title}: none")
        return
    _print(_table(title, columns, cells, numeric, whole))


def _print(t: Table) -> None:
    out = console()
    measured = Measurement.get(out, out.options.update_width(10_000), t)
    if measured.minimum > out.width:  # then every column gets its natural width: no cell wraps
        out = Console(highlight=False, width=measured.maximum)
    out.print(t)


def _table(title: str, columns: Sequence[str], cells: list[list[str]], numeric: Sequence[str],
           whole: Sequence[str]) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        keep = col in numeric or col in whole or col in _ALWAYS_WHOLE
        t.add_column(col, justify="right" if col in numeric else "left", overflow="fold", no_wrap=keep,
                     min_width=None if keep else min(len(col), 8))
    for row in cells:
        t.add_row(*row)
    return t


_ALWAYS_WHOLE = ("Scope", "Tenant", "Unit", "Key", "Reservation", "Policy", "Created", "Expires", "Time")


def detail(title: str, fields: dict[str, Any], *, amounts: Sequence[str] = ()) -> None:
    t = Table(title=title, title_justify="left", show_header=False, box=box.SIMPLE)
    t.add_column("field", style="bold", no_wrap=True)
    # Values are ids, scopes and times to copy: one line each, the table as wide as they need.
    t.add_column("value", no_wrap=True)
    for key, value in fields.items():
        if value is not None:
            t.add_row(key, amount(value) if key in amounts else text(value))
    _print(t)


def more(page: dict[str, Any]) -> None:
    if page.get("has_more") and page.get("next_cursor"):
        typer.echo(f"More results: --cursor {page['next_cursor']} (or --all)")


def tenants(page: dict[str, Any]) -> None:
    table("Tenants", ["Tenant", "Name", "Status", "Overage policy", "Created"],
          ([t.get("tenant_id"), t.get("name"), t.get("status"), t.get("default_commit_overage_policy"),
            t.get("created_at")] for t in page.get("tenants") or []), whole=("Tenant",))
    more(page)


def tenant(t: dict[str, Any]) -> None:
    detail(f"Tenant {t.get('tenant_id')}", t)


def keys(page: dict[str, Any]) -> None:
    table("API keys", ["Key", "Tenant", "Name", "Prefix", "Status", "Permissions", "Scope filter", "Expires"],
          ([k.get("key_id"), k.get("tenant_id"), k.get("name"), k.get("key_prefix"), k.get("status"),
            ", ".join(k.get("permissions") or []), ", ".join(k.get("scope_filter") or []), k.get("expires_at")]
           for k in page.get("keys") or []), whole=("Key", "Prefix"))
    more(page)


def key(k: dict[str, Any]) -> None:
    detail(f"API key {k.get('key_id')}", k)


def key_created(k: dict[str, Any]) -> None:
    detail(f"API key {k.get('key_id')}", {f: v for f, v in k.items() if f != "key_secret"})
    # Plain echo, not a table cell: the secret must never be folded or truncated by the terminal width.
    typer.echo("\nKey secret (shown only this once; store it now, it cannot be retrieved again):")
    typer.echo(f"  {k.get('key_secret')}")


_LEDGER = ["Scope", "Unit", "Status", "Allocated", "Remaining", "Reserved", "Spent", "Debt"]


def _ledger_row(b: dict[str, Any]) -> list[Any]:
    # The scope names the tenant; overdraft limits and the rest are in `budgets get`.
    return [b.get("scope"), b.get("unit"), b.get("status")] + [
        bare(b.get(f)) for f in ("allocated", "remaining", "reserved", "spent", "debt")]


def budgets(page: dict[str, Any]) -> None:
    table("Budgets", _LEDGER, (_ledger_row(b) for b in page.get("ledgers") or []), numeric=_LEDGER[3:])
    more(page)


def budget(b: dict[str, Any]) -> None:
    detail(f"Budget {b.get('scope')} {b.get('unit')}", b,
           amounts=("allocated", "remaining", "reserved", "spent", "debt", "overdraft_limit"))


def funding(r: dict[str, Any]) -> None:
    rows = []
    for field in ("allocated", "remaining", "debt", "spent"):
        old, new = r.get(f"previous_{field}"), r.get(f"new_{field}")
        if old is not None or new is not None:
            rows.append([field, amount(old), amount(new)])
    table(f"{r.get('operation')} applied", ["Field", "Before", "After"], rows, numeric=["Before", "After"])


def policies(page: dict[str, Any]) -> None:
    table("Policies", ["Policy", "Name", "Scope pattern", "Priority", "Status", "Caps", "Rate limits"],
          ([p.get("policy_id"), p.get("name"), p.get("scope_pattern"), p.get("priority"), p.get("status"),
            p.get("caps"), p.get("rate_limits")] for p in page.get("policies") or []), whole=("Policy",))
    more(page)


def policy(p: dict[str, Any]) -> None:
    detail(f"Policy {p.get('policy_id')}", p)


def reservations(page: dict[str, Any]) -> None:
    table("Reservations", ["Reservation", "Status", "Scope", "Reserved", "Created", "Expires"],
          ([r.get("reservation_id"), r.get("status"), r.get("scope_path"), amount(r.get("reserved")),
            ms_time(r.get("created_at_ms")), ms_time(r.get("expires_at_ms"))]
           for r in page.get("reservations") or []), whole=("Reservation",))
    more(page)


def released(rid: str, r: dict[str, Any]) -> None:
    typer.echo(f"Released {rid}: {amount(r.get('released'))} returned to its scopes.")


def audit(page: dict[str, Any]) -> None:
    table("Audit log", ["Time", "Tenant", "Operation", "Resource", "Status", "Error", "Request"],
          ([e.get("timestamp"), e.get("tenant_id"), e.get("operation"),
            " ".join(str(x) for x in (e.get("resource_type"), e.get("resource_id")) if x), e.get("status"),
            e.get("error_code"), e.get("request_id")] for e in page.get("logs") or []), whole=("Time", "Request"))
    more(page)


def overview(o: dict[str, Any]) -> None:
    typer.echo(f"As of {o.get('as_of')} (events over the last {o.get('event_window_seconds')} s)")
    for name in ("tenant_counts", "budget_counts", "webhook_counts"):
        counts = o.get(name)
        if isinstance(counts, dict):
            table(name.replace("_", " ").capitalize(), ["What", "Count"], sorted(counts.items()), numeric=["Count"])
    events = o.get("event_counts") or {}
    table("Events", ["What", "Count"], [["total_recent", events.get("total_recent", 0)]] +
          sorted((events.get("by_category") or {}).items()), numeric=["Count"])
    for title, name in (("Recent denials", "recent_denials"), ("Recent expiries", "recent_expiries")):
        table(title, ["Time", "Tenant", "Scope", "Event", "Reason"],
              ([e.get("timestamp"), e.get("tenant_id"), e.get("scope"), e.get("event_id"),
                (e.get("data") or {}).get("reason_code") if isinstance(e.get("data"), dict) else None]
               for e in o.get(name) or []))
    reasons = o.get("recent_denials_by_reason")
    if isinstance(reasons, dict):
        table("Denials by reason", ["Reason", "Count"], sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
              numeric=["Count"])
    health = o.get("quota_health")
    if isinstance(health, dict):
        typer.echo(f"Action quotas: {num(health.get('counters_above_80pct'))} counter(s) at 80 % or more, "
                   f"{num(health.get('counters_at_limit'))} at their limit")
        table("Fullest quota counters", ["Scope", "Action kind", "Window", "Used", "Limit"],
              ([c.get("scope"), c.get("action_kind"), c.get("window"), c.get("used"), c.get("limit")]
               for c in health.get("top_offenders") or []), numeric=["Used", "Limit"])
    access = o.get("access_control_stats")
    if isinstance(access, dict):
        typer.echo(f"Policies with an action-kind allow list: {num(access.get('policies_with_allow_list'))}; "
                   f"with a deny list: {num(access.get('policies_with_deny_list'))}")
    table("Failing webhooks", ["Subscription", "URL", "Failures", "Last failure"],
          ([w.get("subscription_id"), w.get("url"), w.get("consecutive_failures"), w.get("last_failure_at")]
           for w in o.get("failing_webhooks") or []), numeric=["Failures"], whole=("Subscription", "URL"))
    table("Over-limit budgets", ["Scope", "Unit", "Allocated", "Remaining", "Debt"],
          ([s.get("scope"), s.get("unit"), s.get("allocated"), s.get("remaining"), s.get("debt")]
           for s in o.get("over_limit_scopes") or []), numeric=["Allocated", "Remaining", "Debt"])
    table("Budgets in debt", ["Scope", "Unit", "Debt", "Overdraft limit"],
          ([s.get("scope"), s.get("unit"), s.get("debt"), s.get("overdraft_limit")]
           for s in o.get("debt_scopes") or []), numeric=["Debt", "Overdraft limit"])
