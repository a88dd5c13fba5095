"""Budget period rollover, run by every server's sweeper. Each boundary is applied exactly once
whatever the number of processes: the store applies it only if the period it expects is still the
stored one. A server that was down for several periods catches up one boundary at a time."""

from __future__ import annotations

import logging
from typing import Any

from ..core import periods
from ..store.base import Store, reset_journal, start_journal
from .audit import new_log_id
from .params import iso

log = logging.getLogger("cycles.server")


def next_period(extra: dict[str, Any]) -> dict[str, Any]:
    k = int(extra.get("period_index") or 0) + 1
    args = (extra["period_anchor_ms"], extra["period_first_end_ms"])
    interval, tz = extra.get("period_interval"), extra.get("period_timezone")
    start = periods.boundary(*args, k, interval, tz)
    end = periods.boundary(*args, k + 1, interval, tz)
    return {"period_index": k, "period_start": iso(start), "period_end": iso(end), "period_end_ms": end}


async def roll_due(store: Store, limit: int = 100) -> int:
    """Roll every budget whose period has ended; returns how many boundaries were applied."""
    done = 0
    for _ in range(100):  # bounded catch-up per sweep; the next sweep continues
        rows = await store.due_rollovers(await store.now_ms(), limit)
        applied = done
        for rec in rows:
            extra, led = rec["extra"], rec["ledger"]
            if "period_anchor_ms" not in extra:
                continue
            period = next_period(extra)
            row = {"journal": "audit", "log_id": new_log_id(), "tenant_id": rec["tenant_id"], "key_id": "scheduler",
                   "operation": "rolloverBudget", "resource_type": "budget", "resource_id": rec["ledger_id"],
                   "status": 200, "metadata": {"actor_type": "scheduler", "scope": led.scope, "unit": led.unit,
                                               "rollover_policy": extra.get("rollover_policy"),
                                               "period_start": period["period_start"],
                                               "period_end": period["period_end"]}}
            token = start_journal([row])
            try:
                if await store.rollover_budget(rec["tenant_id"], led.scope, led.unit, extra["period_end_ms"], period):
                    done += 1
            finally:
                reset_journal(token)
        if done == applied:  # nothing left that this process could roll
            break
    return done
