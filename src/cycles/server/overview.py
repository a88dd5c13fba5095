"""GET /v1/admin/overview: the dashboard's landing payload.

Tenant and budget counts come from counters the store keeps with every change. The event figures
(totals by category, recent denials and expiries) are counted from the event log itself over the last
hour; the scan is bounded, and when the bound is reached `event_window_seconds` reports the shorter
window actually counted, so every number shown is a real count over the window it names.

The v0.1.26 governance fields: `recent_denials_by_reason` is counted in that same scan; `quota_health`
reads the stores' index of counters at 80 % or more of their limit (not every counter); `in_observe_mode`
and `access_control_stats` count tenant and policy records (SQL aggregates on the embedded store).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ..core import actions as A
from ..core import events as E
from ..protocol import governance as g
from ..protocol import models as m
from ..store.base import AuditScan
from .events import event_wire
from .governance import _admin
from .http import Ctx, json_response
from .params import iso
from .state import state_of

WINDOW_S = 3600
PAGE = 500
MAX_SCANNED = 50_000  # bounds the cost of one overview call on a busy store
TOP = 10


async def _recent_events(store: Any, now_ms: int, reasons: Counter) -> tuple[int, Counter, list[dict], list[dict]]:
    """(window actually counted in s, counts by category, latest denials, latest expiries), newest first;
    `reasons` gets the denials counted by reason_code."""
    since = now_ms - WINDOW_S * 1000
    by_category: Counter = Counter()
    denials: list[dict] = []
    expiries: list[dict] = []
    after: tuple[int, str] | None = None
    scanned = 0
    while scanned < MAX_SCANNED:
        rows = await store.scan_events(AuditScan(from_ms=since, to_ms=now_ms, descending=True, after=after,
                                                 limit=PAGE))
        for row in rows:
            by_category[row.get("category") or E.category(row.get("event_type") or "")] += 1
            if row.get("event_type") == "reservation.denied":
                reasons[(row.get("data") or {}).get("reason_code") or "UNKNOWN"] += 1
                if len(denials) < TOP:
                    denials.append(row)
            elif row.get("event_type") == "reservation.expired" and len(expiries) < TOP:
                expiries.append(row)
        scanned += len(rows)
        if len(rows) < PAGE:
            return WINDOW_S, by_category, denials, expiries
        after = (rows[-1]["timestamp_ms"], rows[-1]["event_id"])
    # bound reached: report the window the counts cover (from the oldest event counted to now)
    covered_s = max(1, (now_ms - after[0]) // 1000) if after else WINDOW_S
    return covered_s, by_category, denials, expiries


async def overview(request: Request, ctx: Ctx) -> Response:
    await _admin(request, ctx)
    store = state_of(request).store
    now_ms = await store.now_ms()
    c = await store.counters()
    t = {s: c.get(f"tenants.{s}", 0) for s in ("ACTIVE", "SUSPENDED", "CLOSED")}
    b = {s: c.get(f"budgets.{s}", 0) for s in ("ACTIVE", "FROZEN", "CLOSED")}
    over = await store.top_budgets("over_limit", TOP)
    debt = await store.top_budgets("debt", TOP)
    hooks = await store.list_docs("webhook", None)
    failing = sorted((h for h in hooks if h.get("consecutive_failures")),
                     key=lambda h: (-int(h["consecutive_failures"]), h.get("subscription_id", "")))[:TOP]
    reasons: Counter = Counter()
    window_s, by_category, denials, expiries = await _recent_events(store, now_ms, reasons)
    gov = await store.governance_counts()
    body = g.AdminOverviewResponse(
        as_of=iso(now_ms), event_window_seconds=window_s,
        tenant_counts=g.TenantCounts(total=sum(t.values()), active=t["ACTIVE"], suspended=t["SUSPENDED"],
                                     closed=t["CLOSED"], in_observe_mode=gov["in_observe_mode"]),
        budget_counts=g.BudgetCounts(total=sum(b.values()), active=b["ACTIVE"], frozen=b["FROZEN"], closed=b["CLOSED"],
                                     over_limit=c.get("budgets.over_limit", 0), with_debt=c.get("budgets.with_debt", 0),
                                     by_unit={u: c.get(f"budgets.unit.{u}", 0) for u in m.UNITS
                                              if c.get(f"budgets.unit.{u}", 0)}),
        over_limit_scopes=[g.OverLimitScope(scope=r["ledger"].scope, unit=r["ledger"].unit,
                                            allocated=r["ledger"].allocated, remaining=r["ledger"].remaining,
                                            debt=r["ledger"].debt) for r in over],
        debt_scopes=[g.DebtScope(scope=r["ledger"].scope, unit=r["ledger"].unit, debt=r["ledger"].debt,
                                 overdraft_limit=r["ledger"].overdraft_limit) for r in debt],
        webhook_counts=g.WebhookCounts(total=len(hooks), active=sum(h.get("status") == "ACTIVE" for h in hooks),
                                       disabled=sum(h.get("status") == "DISABLED" for h in hooks),
                                       with_failures=sum(bool(h.get("consecutive_failures")) for h in hooks)),
        failing_webhooks=[_failing(h) for h in failing],
        event_counts=g.EventCounts(total_recent=sum(by_category.values()), by_category=dict(by_category)),
        recent_denials=[_event(r) for r in denials], recent_expiries=[_event(r) for r in expiries],
        recent_denials_by_reason=dict(reasons),
        quota_health=await _quota_health(store),
        access_control_stats=g.AccessControlStats(policies_with_allow_list=gov["policies_with_allow_list"],
                                                  policies_with_deny_list=gov["policies_with_deny_list"]),
    )
    return json_response(ctx, body)


async def _quota_health(store: Any) -> g.QuotaHealth:
    hot = await store.hot_action_counters()  # live counters at >= 80 % of their limit
    top = sorted(hot, key=lambda c: (-c["used"] / c["limit"], c["tenant_id"], c["counter"]))[:TOP]
    offenders = []
    for c in top:
        scope, kind, risk, window, _key = A.split_key(c["counter"])
        offenders.append(g.QuotaOffender(scope=scope, action_kind=f"{kind}:{risk}" if risk else kind, window=window,
                                         used=c["used"], limit=c["limit"],
                                         utilization_pct=round(c["used"] / c["limit"], 4)))
    return g.QuotaHealth(counters_above_80pct=len(hot), counters_at_limit=sum(c["used"] >= c["limit"] for c in hot),
                         top_offenders=offenders)


def _failing(h: dict[str, Any]) -> dict[str, Any]:
    out = {"subscription_id": h["subscription_id"], "url": h.get("url", ""),
           "consecutive_failures": int(h["consecutive_failures"])}
    if h.get("last_failure_at_ms"):
        out["last_failure_at"] = iso(h["last_failure_at_ms"])
    return out


def _event(row: dict[str, Any]) -> dict[str, Any]:
    return msgspec.to_builtins(event_wire(row))
