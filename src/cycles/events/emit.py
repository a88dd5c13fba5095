"""Exactly-once emission: an analyzer's events ride the journal of the compare-and-set write that
advances its state document, so the store writes both in one atomic step. Several processes may
evaluate the same condition at once; only the write whose expected version still holds lands, and a
lost race means another process emitted those events (ours are dropped)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from ..core.events import SYSTEM_TENANT
from ..protocol.errors import ErrorCode, ProtocolError
from ..store.base import Store, reset_journal, start_journal

log = logging.getLogger("cycles.events")

KIND = "analyzer"
BURN_KIND = "analyzer-burn"
SOURCE = "anomaly-detector"
_LOST_RACE = (ErrorCode.DUPLICATE_RESOURCE, ErrorCode.NOT_FOUND)


def new_correlation_id() -> str:
    return "anl_" + secrets.token_hex(12)


def event(event_type: str, tenant: str | None, scope: str | None, data: dict[str, Any],
          correlation_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"journal": "event", "event_type": event_type, "tenant_id": tenant or SYSTEM_TENANT,
                             "scope": scope, "data": data, "actor": {"type": "system"}, "source": SOURCE,
                             "correlation_id": correlation_id}
    if scope is None:
        del entry["scope"]
    return entry


async def save_state(store: Store, tenant: str, doc_id: str, record: dict[str, Any] | None,
                     expect_version: int | None, events: list[dict[str, Any]], *, kind: str = KIND) -> int | None:
    """Write the state document (create when expect_version is None) together with `events`.
    Returns how many events were written, or None when another process won the race."""
    entries = list(events)
    token = start_journal(entries)
    try:
        await store.save_doc(kind, tenant, doc_id, record, expect_version, guard_tenant=False)
    except ProtocolError as exc:
        if exc.code in _LOST_RACE:
            log.debug("analyzer state %s changed concurrently; its events were emitted elsewhere", doc_id)
            return None
        raise
    finally:
        reset_journal(token)
    return len(events)
