"""system.store_connection_lost / system.store_connection_restored.

While the store is unreachable nothing can be written, so both events are written once it answers
again: `lost` carries when the outage began, `restored` how long it lasted (both share a
correlation id). Every process that saw the outage tries; a state document (kind "analyzer",
doc_id "store-health", tenant "__system__") keeps the last outage reported, and a process whose
outage started before that one's restoration knows it was the same outage, already reported. The
write is a compare-and-set, so exactly one process reports each outage.

The health check calls `observe(store, healthy, now_ms)` with each result; `now_ms` must be a
clock all processes share (the wall clock, as the store's own cannot be asked while it is down).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from ..core.events import SYSTEM_TENANT
from ..protocol.errors import StoreUnavailable
from ..store.base import Store
from .emit import KIND, event, new_correlation_id, save_state

log = logging.getLogger("cycles.events")

HEALTH_DOC = "store-health"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class StoreHealthWatcher:
    """One per process. Holds when this process first saw the store unhealthy, until the outage is
    reported (by this process or another)."""

    def __init__(self, component: str = "store") -> None:
        self.component = component
        self.lost_at_ms: int | None = None

    async def observe(self, store: Store, healthy: bool, now_ms: int | None = None) -> int:
        """Record one health check result; returns the number of events this call wrote."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if not healthy:
            if self.lost_at_ms is None:
                self.lost_at_ms = now
                log.warning("store unhealthy since %s", _iso(now))
            return 0
        if self.lost_at_ms is None:
            return 0
        try:
            written = await self._report(store, self.lost_at_ms, now)
        except (StoreUnavailable, OSError) as exc:
            log.warning("store outage not reported yet (%s); retried on the next health check", exc)
            return 0
        except Exception:  # noqa: BLE001 - the health check itself must go on
            log.exception("store outage not reported; retried on the next health check")
            return 0
        self.lost_at_ms = None
        return written

    async def _report(self, store: Store, lost: int, restored: int) -> int:
        for _ in range(5):
            doc = await store.get_doc(KIND, HEALTH_DOC)
            last_restored = (doc or {}).get("restored_at_ms")
            if isinstance(last_restored, int) and last_restored >= lost:
                return 0  # this outage (or one overlapping it) was reported by another process
            restored = max(restored, lost)
            outage_ms = restored - lost
            cid = new_correlation_id()
            lost_data = {"component": self.component, "severity": "critical",
                         "message": f"store connection lost at {_iso(lost)}",
                         "details": {"lost_at": _iso(lost), "lost_at_ms": lost}}
            restored_data = {"component": self.component, "severity": "info",
                             "message": f"store connection restored after {outage_ms / 1000:g} s",
                             "details": {"lost_at": _iso(lost), "lost_at_ms": lost, "restored_at": _iso(restored),
                                         "restored_at_ms": restored, "outage_duration_ms": outage_ms,
                                         "outage_duration_seconds": outage_ms / 1000}}
            record: dict[str, Any] = {"doc_id": HEALTH_DOC, "analyzer": "store_health", "lost_at_ms": lost,
                                      "restored_at_ms": restored, "outage_duration_ms": outage_ms,
                                      "outages": int((doc or {}).get("outages") or 0) + 1}
            n = await save_state(store, SYSTEM_TENANT, HEALTH_DOC, record, doc["version"] if doc else None, [
                event("system.store_connection_lost", SYSTEM_TENANT, None, lost_data, cid),
                event("system.store_connection_restored", SYSTEM_TENANT, None, restored_data, cid)])
            if n is not None:
                return n
            # lost the race: re-read, the winner may have reported this very outage
        return 0
