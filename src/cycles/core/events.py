"""Governance events: their types and categories, and the ledger transitions that produce them.

Events ride the same journal as audit rows, so a store writes an event in the same transaction as
the change that causes it. This module is pure: it decides which events a change produces.
"""

from __future__ import annotations

from typing import Any

from .ledger import Ledger

CATEGORIES = ("budget", "tenant", "api_key", "policy", "reservation", "system", "webhook", "quota")
TENANT_CATEGORIES = ("budget", "reservation", "tenant")  # what a tenant's own key (and its webhooks) may see
SYSTEM_TENANT = "__system__"

EVENT_TYPES = (
    "budget.created", "budget.updated", "budget.funded", "budget.debited", "budget.reset", "budget.reset_spent",
    "budget.debt_repaid", "budget.frozen", "budget.unfrozen", "budget.closed", "budget.closed_via_tenant_cascade",
    "budget.threshold_crossed", "budget.exhausted", "budget.over_limit_entered", "budget.over_limit_exited",
    "budget.debt_incurred", "budget.burn_rate_anomaly",
    "reservation.denied", "reservation.denial_rate_spike", "reservation.expired", "reservation.expiry_rate_spike",
    "reservation.commit_overage", "reservation.released_via_tenant_cascade",
    "reservation.observed_denied", "reservation.observed_allowed",  # v0.1.26
    "quota.threshold_approaching", "quota.counter_reset",  # v0.1.26
    "tenant.created", "tenant.updated", "tenant.suspended", "tenant.reactivated", "tenant.closed",
    "tenant.settings_changed",
    "webhook.created", "webhook.updated", "webhook.paused", "webhook.resumed", "webhook.disabled", "webhook.deleted",
    "webhook.disabled_via_tenant_cascade",
    "api_key.created", "api_key.revoked", "api_key.revoked_via_tenant_cascade", "api_key.expired",
    "api_key.permissions_changed", "api_key.auth_failed", "api_key.auth_failure_rate_spike",
    "policy.created", "policy.updated", "policy.deleted",
    "system.store_connection_lost", "system.store_connection_restored", "system.high_latency",
    "system.webhook_delivery_failed", "system.webhook_test",
)

FUNDING_EVENTS = {"CREDIT": "budget.funded", "DEBIT": "budget.debited", "RESET": "budget.reset",
                  "RESET_SPENT": "budget.reset_spent", "REPAY_DEBT": "budget.debt_repaid"}


def category(event_type: str) -> str:
    return event_type.split(".", 1)[0]


def ledger_state(led: Ledger) -> dict[str, Any]:
    return {"allocated": led.allocated, "remaining": led.remaining, "reserved": led.reserved, "spent": led.spent,
            "debt": led.debt, "overdraft_limit": led.overdraft_limit, "is_over_limit": led.is_over_limit,
            "status": led.status}


def transitions(before: Ledger, after: Ledger, *, reservation_id: str | None = None,
                overage_policy: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(event_type, scope, data) for the state a ledger change crossed into."""
    if (after.remaining > 0 or before.remaining <= 0) and before.is_over_limit == after.is_over_limit \
            and after.debt <= before.debt:
        return []  # the common case on the hot path: nothing crossed
    out: list[tuple[str, str, dict[str, Any]]] = []
    base = {"scope": after.scope, "unit": after.unit}
    if before.remaining > 0 >= after.remaining:
        out.append(("budget.exhausted", after.scope, {**base, **ledger_state(after)}))
    over = {**base, "debt": after.debt, "overdraft_limit": after.overdraft_limit, "is_over_limit": after.is_over_limit}
    if not before.is_over_limit and after.is_over_limit:
        out.append(("budget.over_limit_entered", after.scope, over))
    elif before.is_over_limit and not after.is_over_limit:
        out.append(("budget.over_limit_exited", after.scope, over))
    if after.debt > before.debt:
        out.append(("budget.debt_incurred", after.scope, {
            **base, "reservation_id": reservation_id, "debt_incurred": after.debt - before.debt,
            "total_debt": after.debt, "overdraft_limit": after.overdraft_limit, "overage_policy": overage_policy}))
    return out
