"""Action governance (v0.1.26) in the admin CLI: the policy options for the action-kind lists and quotas, the
tenant's observe mode, and `cycles admin quotas` (the live counters, and the incident reset)."""

from __future__ import annotations

from typing import Annotated, Any, List, Literal, Optional

import typer

from ..core.actions import RISK_CLASSES, RULE_FIELDS, WINDOWS
from . import render
from .failures import usage

ObserveMode = Annotated[Optional[Literal["ENFORCE", "OBSERVE", "DISABLED"]], typer.Option(
    "--observe-mode", help="OBSERVE: evaluate every reservation in shadow (nothing is held or counted; would-be "
    "denials are recorded as reservation.observed_denied events). ENFORCE (DISABLED is the same): enforce.")]
AllowKinds = Annotated[Optional[List[str]], typer.Option(
    "--allow-kind", metavar="KIND", help="Only these action kinds are allowed (repeatable; replaces the policy's "
    "allowed_action_kinds).")]
DenyKinds = Annotated[Optional[List[str]], typer.Option(
    "--deny-kind", metavar="KIND", help="These action kinds are refused (repeatable; replaces the policy's "
    "denied_action_kinds).")]
KindQuotas = Annotated[Optional[List[str]], typer.Option(
    "--action-quota", metavar="KIND=MAX/WINDOW", help="e.g. message.email.send=5/per_run (repeatable; replaces the "
    "policy's action_quotas; host allowlists, thresholds and TTLs: --from-json).")]
RiskQuotas = Annotated[Optional[List[str]], typer.Option(
    "--risk-class-quota", metavar="CLASS=MAX/WINDOW", help="e.g. external_side_effect=50/per_hour_tumbling "
    "(repeatable; replaces the policy's risk_class_quotas).")]
Clear = Annotated[Optional[List[str]], typer.Option(
    "--clear", metavar="FIELD", help=f"Empty one of {', '.join(RULE_FIELDS)} (repeatable).")]


def _quota(text: str, key: str, option: str) -> dict[str, Any]:
    target, eq, rest = text.partition("=")
    count, slash, window = rest.partition("/")
    example = "external_side_effect=50/per_hour_tumbling" if key == "risk_class" else "message.email.send=5/per_run"
    if not (target and eq and slash and count.isdigit() and 1 <= int(count) <= 100_000):
        usage(f"{option} takes {'CLASS' if key == 'risk_class' else 'KIND'}=MAX/WINDOW with MAX from 1 to 100000, "
              f"e.g. {example}; not {text!r}")
    if window not in WINDOWS:
        usage(f"{option} {text}: the window must be one of {', '.join(WINDOWS)}")
    if key == "risk_class" and target not in RISK_CLASSES:
        usage(f"{option} {text}: the risk class must be one of {', '.join(RISK_CLASSES)}")
    return {key: target, "max_calls": int(count), "window": window}


def rule_fields(allow: list[str] | None, deny: list[str] | None, kind_quotas: list[str] | None,
                risk_quotas: list[str] | None, clear: list[str] | None) -> dict[str, Any]:
    """The policy body members the governance options set (PATCH replaces each list whole)."""
    out: dict[str, Any] = {}
    if allow:
        out["allowed_action_kinds"] = allow
    if deny:
        out["denied_action_kinds"] = deny
    if kind_quotas:
        out["action_quotas"] = [_quota(q, "action_kind", "--action-quota") for q in kind_quotas]
    if risk_quotas:
        out["risk_class_quotas"] = [_quota(q, "risk_class", "--risk-class-quota") for q in risk_quotas]
    for name in clear or []:
        if name not in RULE_FIELDS:
            usage(f"--clear {name}: give one of {', '.join(RULE_FIELDS)}")
        if name in out:
            usage(f"--clear {name} and options that set it: give one or the other")
        out[name] = []
    return out


# ---- cycles admin quotas ----

quotas_app = typer.Typer(help="Action quota counters: live state, and a reset for incidents.", no_args_is_help=True)
Json = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer instead of a table.")]
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
# the choices typer offers; a test keeps them equal to core.actions.WINDOWS and RISK_CLASSES
WindowName = Literal["per_run", "per_minute_tumbling", "per_hour_tumbling", "per_day_tumbling", "per_tenant_per_day"]
# the five names do not fit one 80-column help line as a choice list
WINDOW_HELP = "per_run, per_minute_tumbling, per_hour_tumbling, per_day_tumbling or per_tenant_per_day."
RiskClassName = Literal["read_only", "local_mutation", "side_effect", "external_side_effect", "high_risk"]


@quotas_app.command("list")
def quotas_list(ctx: typer.Context, tenant: Tenant,
                scope: Annotated[Optional[str], typer.Option(help="Scope prefix, e.g. tenant:acme/agent:bot.")] = None,
                action_kind: Annotated[Optional[str], typer.Option("--action-kind", help="An action kind, or "
                                                                   "__risk__ for risk-class counters.")] = None,
                window: Annotated[Optional[WindowName], typer.Option(metavar="WINDOW", help=WINDOW_HELP)] = None,
                run_id: Annotated[Optional[str], typer.Option("--run-id", help="per_run counters of a run.")] = None,
                include_zero: Annotated[bool, typer.Option("--include-zero")] = False,
                limit: Annotated[Optional[int], typer.Option("--limit", min=1, max=200)] = None,
                cursor: Annotated[Optional[str], typer.Option("--cursor")] = None,
                all_pages: Annotated[bool, typer.Option("--all", help="Every page.")] = False,
                as_json: Json = False) -> None:
    """A tenant's live action quota counters."""
    from .commands import run

    params = {"tenant_id": tenant, "scope": scope, "action_kind": action_kind, "window": window, "run_id": run_id,
              "include_zero": "true" if include_zero else None, "limit": limit, "cursor": cursor}
    run(ctx, as_json, lambda c: c.page("/v1/admin/action-quota-counters", params, "counters", all_pages),
        quota_counters)


@quotas_app.command("reset")
def quotas_reset(ctx: typer.Context, tenant: Tenant,
                 scope: Annotated[str, typer.Option(help="The counter's scope, e.g. tenant:acme/agent:bot.")],
                 window: Annotated[WindowName, typer.Option(metavar="WINDOW", help=WINDOW_HELP)],
                 window_key: Annotated[str, typer.Option("--window-key", help="The run id (per_run) or the UTC "
                                                         "bucket, e.g. 2026-04-09T14 (see quotas list).")],
                 action_kind: Annotated[Optional[str], typer.Option("--action-kind")] = None,
                 risk_class: Annotated[Optional[RiskClassName], typer.Option(
                     "--risk-class", metavar="CLASS", help="For a risk-class counter: read_only, local_mutation, "
                     "side_effect, external_side_effect or high_risk.")] = None,
                 reason: Annotated[Optional[str], typer.Option(help="Why (kept in the audit log and the "
                                                               "quota.counter_reset event).")] = None,
                 as_json: Json = False) -> None:
    """Set one counter back to 0 (incident response; audited, emits quota.counter_reset)."""
    from .commands import run

    if (action_kind is None) == (risk_class is None):
        usage("give --action-kind for a per-kind counter, or --risk-class for a risk-class counter")
    body = {"tenant_id": tenant, "scope": scope, "action_kind": action_kind or "__risk__", "window": window,
            "window_key": window_key, "risk_class": risk_class, "reason": reason}

    def show(r: dict[str, Any]) -> None:
        typer.echo(f"Reset {r['counter'].get('scope')} {_label(r['counter'])} {window} {window_key}: "
                   f"{r.get('previous_used')} → 0")

    run(ctx, as_json, lambda c: c.call("POST", "/v1/admin/action-quota-counters/reset",
                                       body={k: v for k, v in body.items() if v is not None}), show)


def _label(c: dict[str, Any]) -> str:
    return f"__risk__:{c['risk_class']}" if c.get("risk_class") else str(c.get("action_kind"))


def quota_counters(page: dict[str, Any]) -> None:
    render.table("Action quota counters", ["Scope", "Action kind", "Window", "Window key", "Used", "Limit",
                                           "Policy", "Expires"],
                 ([c.get("scope"), _label(c), c.get("window"), c.get("window_key"), c.get("used"), c.get("limit"),
                   c.get("policy_id"), c.get("expires_at")] for c in page.get("counters") or []),
                 numeric=["Used", "Limit"], whole=("Window key",))
    render.more(page)
