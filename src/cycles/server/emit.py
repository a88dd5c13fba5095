"""Queueing a governance event with the change that causes it (the request's journal, written by the
store in the same transaction as the change: a transactional outbox)."""

from __future__ import annotations

from typing import Any

from ..store.base import pending_journal
from .http import Ctx


def emit(ctx: Ctx | None, event_type: str, tenant: str, *, scope: str | None = None,
         data: dict[str, Any] | None = None, data_from_result: bool = False, correlation_id: str | None = None,
         only_if_created: bool = False, observation: bool = False) -> None:
    """Queue an event for the request's next write transaction (written atomically with it)."""
    entry: dict[str, Any] = {"journal": "event", "event_type": event_type, "tenant_id": tenant, "scope": scope,
                             "data": data or {}}
    if data_from_result:
        entry["data_from"] = "result"
    if correlation_id:
        entry["correlation_id"] = correlation_id
    if only_if_created:
        entry["only_if_created"] = True
    if observation:  # written even when no change takes it (a denial, a failed authentication)
        entry["observation"] = True
    journal = ctx.journal if ctx is not None and ctx.journal is not None else pending_journal()
    journal.append(entry)


def drop_events(ctx: Ctx) -> None:
    """Forget queued events (the change they describe did not happen)."""
    if ctx.journal:
        ctx.journal[:] = [e for e in ctx.journal if e.get("journal") != "event"]
