"""v0.1.26 action governance on the runtime routes: the plan a reservation carries to the store, the deny
detail and the observe-mode events.

Cost for tenants that use none of it: one flag read on the cached governance view (TenantView.actions) and a
prefix test on the action kind. Responses change only for requests that use the extension (observe_mode or
action.policy_keys in the request, action rules on the tenant's policies, or a tenant in OBSERVE mode):
strict v0 clients (runcycles 0.5.3 forbids unknown response keys) never see deny_detail.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from ..core import actions as A
from ..store.base import ReserveCommand
from . import events
from .govcache import POLICY_KIND, TenantView
from .http import Ctx
from .params import bad

_MAX_PLANS = 4096
_SAMPLER: A.Sampler | None = None


def _sampler() -> A.Sampler:
    """observed_allowed events are sampled (CYCLES_OBSERVE_ALLOW_SAMPLE_RATE, checked at start); observed
    denials never are."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = A.Sampler(A.load_sample_rate())
    return _SAMPLER


async def plan(store: Any, cmd: ReserveCommand, view: TenantView | None) -> bool:
    """Put the action rules that govern `cmd` on it; returns whether the tenant's policies carry any."""
    reg = A.registry()
    kind = cmd.action["kind"]
    try:
        if kind.startswith("custom."):
            reg.check(kind)
        if view is None:
            policies = await store.list_docs(POLICY_KIND, cmd.tenant)
            if not any(A.has_rules(p) for p in policies):
                return False
            now = await store.now_ms()
        else:
            if not view.actions:
                return False
            if not view.timed:
                # a plan depends only on the view's policies and these inputs: work it out once per view
                keys = cmd.action.get("policy_keys")
                memo = (kind, tuple(cmd.scopes), (cmd.subject.get("dimensions") or {}).get("run_id"),
                        msgspec.json.encode(keys, order="sorted") if keys else None)
                found = view.plans.get(memo)
                if found is None:
                    if len(view.plans) >= _MAX_PLANS:
                        view.plans.clear()
                    found = view.plans[memo] = (A.plan(view.policies, cmd.scopes, cmd.action, cmd.subject, 0, reg)
                                                .store_arg(),)
                cmd.actions = found[0]  # shared: the stores copy what they change
                return True
            policies = view.policies
            now = await store.now_ms()
        cmd.actions = A.plan(policies, cmd.scopes, cmd.action, cmd.subject, now, reg).store_arg()
    except A.ActionError as exc:
        raise bad(str(exc)) from None
    return True


def warn_deprecated(ctx: Ctx, kind: str) -> None:
    """X-Cycles-Deprecated-Kind: <replacement_kind> on the answers to a reservation or decision that uses a
    deprecated kind (the registry's DEPRECATION PROCESS; the kind itself is never rewritten)."""
    deprecated = A.registry().deprecated
    if deprecated and kind in deprecated:
        ctx.extra_headers["X-Cycles-Deprecated-Kind"] = deprecated[kind]["replacement_kind"]


def uses_extension(cmd: ReserveCommand, rules: bool) -> bool:
    return rules or cmd.observe_mode is not None or "policy_keys" in cmd.action


def base_detail(result: dict[str, Any]) -> dict[str, Any]:
    """DenyDetail of a denial the store answered without one (the base-spec reasons)."""
    reason = result.get("reason_code") or "DENY"
    detail: dict[str, Any] = {"reason_code": reason}
    amount = int(result.get("amount") or 0)
    for bal in result.get("balances") or []:
        scope, _unit, allocated, spent, reserved, debt = bal[:6]
        remaining = int(allocated) - int(spent) - int(reserved) - int(debt)
        if reason == "BUDGET_EXCEEDED" and remaining < amount:
            detail.update(blocked_by_scope=scope, budget_remaining=remaining,
                          suggested_fix=f"Fund {scope} by at least {amount - remaining} {bal[1]}")
            break
        if reason == "DEBT_OUTSTANDING" and int(debt) > 0:
            detail.update(blocked_by_scope=scope,
                          suggested_fix=f"Repay the debt of {debt} {bal[1]} at {scope} before new reservations")
            break
    if "blocked_by_scope" not in detail and result.get("scope_path"):
        detail["blocked_by_scope"] = result["scope_path"]
    return detail


def error_detail(code: str, details: dict[str, Any] | None) -> dict[str, Any]:
    """details of a live 409 with deny_detail (the action denials carry theirs from the store)."""
    details = dict(details or {})
    if "deny_detail" not in details:
        detail: dict[str, Any] = {"reason_code": code}
        if details.get("scope"):
            detail["blocked_by_scope"] = details["scope"]
        if details.get("policy_id"):  # a policy rate limit
            detail["blocked_by_policy"] = details["policy_id"]
        details["deny_detail"] = detail
    return details


def _hash(*parts: Any) -> str:
    return hashlib.sha256("\x00".join("" if p is None else str(p) for p in parts).encode()).hexdigest()[:32]


def observed(ctx: Ctx, cmd: ReserveCommand, decision: str, reason: str | None, detail: dict[str, Any] | None,
             caps: dict[str, Any] | None) -> None:
    """The shadow-mode event of an OBSERVE evaluation (it replaces reservation.denied: shadow denials stay out
    of production alerting)."""
    action = {k: v for k, v in cmd.action.items() if k in ("kind", "name", "policy_keys")}
    data: dict[str, Any] = {"scope": cmd.scope_path, "unit": cmd.unit, "action": action, "subject": cmd.subject,
                            "estimated_amount": cmd.amount, "observe_mode": "OBSERVE"}
    if decision == "DENY":
        detail = detail or {"reason_code": reason or "DENY"}
        data.update(deny_detail=detail, would_have_blocked_at=detail.get("blocked_by_scope") or cmd.scope_path)
        violation = detail.get("quota_violation") or {}
        corr = _hash(cmd.tenant, cmd.scope_path, cmd.action["kind"], violation.get("window_key"), reason,
                     detail.get("blocked_by_policy"))
        events.emit(ctx, "reservation.observed_denied", cmd.tenant, scope=cmd.scope_path, data=data,
                    correlation_id=f"observed:{corr}", observation=True)
        return
    sampler = _sampler()
    if not sampler.take():
        return
    data["decision"] = decision
    if caps:
        data["caps_applied"] = caps
    if sampler.rate < 1:
        data["sample_rate"] = sampler.rate
    run_id = (cmd.subject.get("dimensions") or {}).get("run_id")
    corr = f"observed:{_hash(cmd.tenant, cmd.scope_path, run_id)}" if run_id else None
    events.emit(ctx, "reservation.observed_allowed", cmd.tenant, scope=cmd.scope_path, data=data,
                correlation_id=corr, observation=True)
