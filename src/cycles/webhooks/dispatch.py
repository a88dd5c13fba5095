"""From the event outbox to delivery records.

Every governance event is written in the transaction of the change that produced it (the outbox), so a
dispatcher that reads the event log in (timestamp_ms, event_id) order sees every event exactly as
committed and never one of a change that did not happen. For each event it creates one delivery
document per matching subscription:

    kind "delivery", doc_id `whdel_` + sha256(event_id | subscription_id)[:24], tenant = the
    subscription's tenant. The id is deterministic and the write is create-if-absent, so two
    dispatchers (or one re-reading a window) never create the same delivery twice.

The position is a cursor document (kind "dispatch", doc_id "cursor", tenant "__system__") holding the
last (timestamp_ms, event_id) processed, its owner and a lease: one dispatcher leads (the others stand
by and take over when its lease lapses), and every advance is a compare-and-set. Events of one
millisecond written by different processes may commit slightly out of order, so the leader re-reads a
window behind the cursor (LOOKBACK_MS) now and then; the deterministic ids make that free of duplicates.

Matching re-checks the subscription invariants (cycles.webhooks.rules.wants, fail closed): a tenant's
subscription never receives another tenant's event nor an api_key / policy / webhook / system event,
whatever its stored selectors say. An event older than the subscription is not delivered to it.
PAUSED subscriptions get their deliveries PARKED (kept, out of the queue; a park marker document
brings them back when the subscription is active again); DISABLED ones get none (replay recovers).
`system.webhook_test` events are point-to-point probes and are never dispatched.

Replays (POST /v1/admin/webhooks/{id}/replay) and resends create deliveries here too, with random ids
and `replay_id` provenance.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Callable

from ..core.events import EVENT_TYPES, SYSTEM_TENANT
from ..protocol.errors import ErrorCode, ProtocolError, VersionConflict
from ..store.base import AuditScan, Store
from . import rules

log = logging.getLogger("cycles.webhooks")

SUB_KIND = "webhook"
DELIVERY_KIND = "delivery"
DISPATCH_KIND = "dispatch"
CURSOR_ID = "cursor"
PARK_PREFIX = "park:"
REPLAY_PREFIX = "replay:"
TEST_EVENT = "system.webhook_test"

LOOKBACK_MS = 5_000           # window re-read behind the cursor for late commits
LOOKBACK_EVERY_S = 1.0        # how often that window is re-read
LEADER_LEASE_MS = 10_000      # a dispatcher that stops renewing is replaced after this
PARK_RECHECK_MS = 2_000       # how often a paused subscription is looked at again
RETENTION_MS = 14 * 86_400_000  # finished deliveries are kept this long
REPLAY_SCAN_LIMIT = 20_000    # candidate events a replay request may scan (more: 400, narrow the window)
REPLAY_MAX_EVENTS = 1000
REPLAY_LOCK_MS = 3_600_000    # a replay counts as running at most this long


def deliverable(sub: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether `sub` receives `event`: the invariants and selectors (rules.wants, fail closed), then the
    subscription's own thresholds for derived events (budget.threshold_crossed / burn_rate_anomaly)."""
    if not rules.wants(sub, event):
        return False
    from ..events.matching import subscription_wants

    return subscription_wants(sub, event)


def delivery_id_for(event_id: str, subscription_id: str) -> str:
    return "whdel_" + hashlib.sha256(f"{event_id}|{subscription_id}".encode()).hexdigest()[:24]


def random_delivery_id() -> str:
    return "whdel_" + secrets.token_hex(12)


def created_ms(sub: dict[str, Any]) -> int | None:
    """When the subscription was created (records carry ISO `created_at`; `created_at_ms` is accepted too)."""
    ms = sub.get("created_at_ms")
    if isinstance(ms, int):
        return ms
    text = sub.get("created_at")
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _trace_id(event: dict[str, Any]) -> str:
    tid = event.get("trace_id")
    if isinstance(tid, str) and len(tid) == 32 and tid != "0" * 32:
        return tid
    return os.urandom(16).hex()


def new_delivery(event: dict[str, Any], sub: dict[str, Any], now_ms: int, *, delivery_id: str,
                 parked: bool = False, replay_id: str | None = None, resent_from: str | None = None,
                 due_ms: int | None = None) -> dict[str, Any]:
    due = now_ms if due_ms is None else due_ms
    return {
        "delivery_id": delivery_id, "subscription_id": sub["subscription_id"], "event_id": event["event_id"],
        "event_type": event["event_type"], "tenant_id": sub["tenant_id"],
        "event_tenant_id": event.get("tenant_id"), "event_timestamp_ms": event.get("timestamp_ms"),
        "status": "PENDING", "parked": parked, "attempts": 0,
        "next_attempt_at_ms": due, "due_ms": None if parked else due,
        "lease_owner": None, "lease_until_ms": None,
        "response_status": None, "error": None, "duration_ms": None,
        "created_at_ms": now_ms, "first_attempt_at_ms": None, "last_attempt_at_ms": None, "completed_at_ms": None,
        "replay_id": replay_id, "resent_from": resent_from,
        "trace_id": _trace_id(event), "trace_flags": "01",
    }


def _is_duplicate(exc: ProtocolError) -> bool:
    return exc.code == ErrorCode.DUPLICATE_RESOURCE and not isinstance(exc, VersionConflict)


async def create_delivery(store: Store, rec: dict[str, Any]) -> bool:
    """Create-if-absent. False when a delivery with that id exists already (someone did it)."""
    try:
        await store.save_doc(DELIVERY_KIND, rec["tenant_id"], rec["delivery_id"], rec, None, guard_tenant=False)
    except ProtocolError as exc:
        if _is_duplicate(exc):
            return False
        raise
    if rec.get("parked"):
        await ensure_park_marker(store, rec["subscription_id"], rec["tenant_id"], rec["created_at_ms"])
    return True


# ---- parking (deliveries of PAUSED subscriptions) ----
#
# A parked delivery has status PENDING, parked=True and no due_ms (it is out of the queue). Whoever parks
# one writes the delivery FIRST and then makes sure the subscription's park marker exists (kind
# "dispatch", doc_id "park:<subscription_id>", with a due_ms). The worker looks at due markers: while the
# subscription is PAUSED it pushes the marker later; otherwise it deletes the marker FIRST and then puts
# every parked delivery of the subscription back in the queue. Any delivery parked after that deletion
# re-creates the marker, so none is left behind.

async def ensure_park_marker(store: Store, subscription_id: str, tenant: str, now_ms: int) -> None:
    marker_id = PARK_PREFIX + subscription_id
    if await store.get_doc(DISPATCH_KIND, marker_id) is not None:
        return
    rec = {"marker": "park", "subscription_id": subscription_id, "tenant_id": tenant,
           "due_ms": now_ms + PARK_RECHECK_MS}
    try:
        await store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, marker_id, rec, None, guard_tenant=False)
    except ProtocolError as exc:
        if not _is_duplicate(exc):
            raise


async def process_park_markers(store: Store, now_ms: int, limit: int = 50) -> int:
    """Release the parked deliveries of subscriptions that are no longer PAUSED. Returns how many."""
    released = 0
    for marker in await store.due_docs(DISPATCH_KIND, now_ms, limit):
        if marker.get("marker") != "park":
            continue
        sid = marker["subscription_id"]
        doc_id = PARK_PREFIX + sid
        sub = await store.get_doc(SUB_KIND, sid)
        try:
            if sub is not None and sub.get("status") == "PAUSED":
                await store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, doc_id,
                                     {**marker, "due_ms": now_ms + PARK_RECHECK_MS}, marker["version"],
                                     guard_tenant=False)
                continue
            await store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, doc_id, None, marker["version"], guard_tenant=False)
        except ProtocolError:
            continue  # another worker handles it
        for d in await store.list_docs(DELIVERY_KIND, marker.get("tenant_id") or (sub or {}).get("tenant_id")):
            if d.get("subscription_id") != sid or not d.get("parked") or d.get("status") != "PENDING":
                continue
            due = min(now_ms, d.get("created_at_ms") or now_ms)
            try:
                await store.save_doc(DELIVERY_KIND, d["tenant_id"], d["delivery_id"],
                                     {**d, "parked": False, "due_ms": due, "next_attempt_at_ms": due},
                                     d["version"], guard_tenant=False)
                released += 1
            except ProtocolError:
                continue
    return released


# ---- the dispatcher ----

class Dispatcher:
    def __init__(self, store: Store, *, owner: str, batch: int = 500, max_pages: int = 20,
                 lookback_ms: int = LOOKBACK_MS, lease_ms: int = LEADER_LEASE_MS, metrics: Any = None,
                 on_created: Callable[[], None] | None = None, retention_ms: int = RETENTION_MS) -> None:
        self.store = store
        self.owner = owner
        self.batch = batch
        self.max_pages = max_pages
        self.lookback_ms = lookback_ms
        self.lease_ms = lease_ms
        self.metrics = metrics
        self.on_created = on_created
        self.retention_ms = retention_ms
        self._seen: dict[str, int] = {}  # event id -> timestamp_ms, of events this process dispatched
        self._hw: tuple[int, str] | None = None  # the position this process reached
        self._last_lookback = 0.0
        self._last_purge = 0.0

    async def _read_cursor(self) -> dict[str, Any] | None:
        return await self.store.get_doc(DISPATCH_KIND, CURSOR_ID)

    async def _write_cursor(self, cur: dict[str, Any] | None, position: tuple[int, str], now_ms: int) -> dict[str, Any] | None:
        rec = {"ts": position[0], "id": position[1], "owner": self.owner, "lease_until_ms": now_ms + self.lease_ms,
               "updated_at_ms": now_ms}
        try:
            return await self.store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, CURSOR_ID, rec,
                                             None if cur is None else cur["version"], guard_tenant=False)
        except ProtocolError:
            self._hw = None  # someone else moved it: start again from what is stored
            return None

    async def release(self) -> None:
        """Give up the lead (a graceful stop), so a standby takes over at once rather than after the lease."""
        try:
            cur = await self._read_cursor()
            if cur is not None and cur.get("owner") == self.owner:
                rec = {k: v for k, v in cur.items() if k != "version"}
                await self.store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, CURSOR_ID, {**rec, "lease_until_ms": 0},
                                          cur["version"], guard_tenant=False)
        except Exception:  # noqa: BLE001 - the lease runs out instead
            pass

    async def run_once(self) -> int:
        """One pass: lead (or stand by), read the events past the cursor, create their deliveries.
        Returns the number of deliveries created."""
        store = self.store
        now = await store.now_ms()
        cur = await self._read_cursor()
        if cur is not None and cur.get("owner") != self.owner and (cur.get("lease_until_ms") or 0) > now:
            self._hw = None
            return 0
        subs = [s for s in await store.list_docs(SUB_KIND, None) if s.get("status") in ("ACTIVE", "PAUSED")]
        if cur is None:
            starts = [c for c in (created_ms(s) for s in subs) if c is not None]
            start_ts = min(starts) - 1 if starts else now - self.lookback_ms
            cur = await self._write_cursor(None, (start_ts, ""), now)
            if cur is None:
                return 0
        position = (int(cur["ts"]), str(cur["id"]))
        if not subs:
            # Nothing can match: keep the cursor near now (so a first subscription does not make the
            # dispatcher walk old history, every event of which predates it) and the lease renewed.
            if position[0] < now - 2 * self.lookback_ms or (cur.get("lease_until_ms") or 0) - now < self.lease_ms // 2 \
                    or cur.get("owner") != self.owner:
                await self._write_cursor(cur, max(position, (now - self.lookback_ms, "")), now)
            self._hw = None
            return 0
        if cur.get("owner") != self.owner:  # taking over: claim the lease before doing any work
            cur = await self._write_cursor(cur, position, now)
            if cur is None:
                return 0
            self._hw = None

        # the leader reads the cross-tenant event log: an eventually consistent view on Redis Cluster,
        # brought up to date first (the lookback still catches what lands behind the cursor)
        await store.catch_up_views()
        system_subs = [s for s in subs if s.get("tenant_id") == SYSTEM_TENANT]
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for s in subs:
            if s.get("tenant_id") != SYSTEM_TENANT:
                by_tenant.setdefault(s.get("tenant_id"), []).append(s)
        starts = {s["subscription_id"]: created_ms(s) for s in subs}

        lookback = self._hw is None or time.monotonic() - self._last_lookback >= LOOKBACK_EVERY_S
        if lookback:
            self._last_lookback = time.monotonic()
            after = (position[0] - self.lookback_ms, "")
        else:
            after = max(position, self._hw or position)
        created = 0
        reached = position
        for _ in range(self.max_pages):
            rows = await store.scan_events(AuditScan(descending=False, after=after, limit=self.batch))
            for ev in rows:
                key = (int(ev["timestamp_ms"]), ev["event_id"])
                after = key
                if ev["event_id"] in self._seen:
                    continue
                candidates = system_subs + by_tenant.get(ev.get("tenant_id"), [])
                if candidates and ev.get("event_type") != TEST_EVENT:
                    created += await self._dispatch(ev, candidates, starts, now)
                self._seen[ev["event_id"]] = key[0]
            if rows:
                reached = max(reached, after)
            renew = (cur.get("lease_until_ms") or 0) - now < self.lease_ms // 2
            if reached > position or renew:
                cur = await self._write_cursor(cur, reached, now)
                if cur is None:
                    return created
                position = reached
            if len(rows) < self.batch:
                break
            now = await store.now_ms()
        self._hw = max(self._hw or reached, reached)
        floor = position[0] - self.lookback_ms - 1000
        if len(self._seen) > 1000:
            self._seen = {k: v for k, v in self._seen.items() if v >= floor}
        if created and self.on_created is not None:
            self.on_created()
        if time.monotonic() - self._last_purge > 3600:
            self._last_purge = time.monotonic()
            try:
                await purge_finished(store, now - self.retention_ms)
            except Exception:  # noqa: BLE001 - retried next hour
                log.warning("purging finished webhook deliveries failed", exc_info=True)
        return created

    async def _dispatch(self, ev: dict[str, Any], candidates: list[dict[str, Any]], starts: dict[str, int | None],
                        now: int) -> int:
        created = 0
        for sub in candidates:
            start = starts.get(sub["subscription_id"])
            if start is not None and int(ev["timestamp_ms"]) < start:
                continue
            if not deliverable(sub, ev):
                continue
            did = delivery_id_for(ev["event_id"], sub["subscription_id"])
            if await self.store.get_doc(DELIVERY_KIND, did) is not None:
                continue
            rec = new_delivery(ev, sub, now, delivery_id=did, parked=sub.get("status") == "PAUSED",
                               due_ms=min(now, int(ev["timestamp_ms"])))
            if await create_delivery(self.store, rec):
                created += 1
                if self.metrics is not None:
                    self.metrics.webhook_created.labels("dispatch").inc()
        return created


async def purge_finished(store: Store, older_than_ms: int) -> int:
    """Delete SUCCEEDED / FAILED deliveries finished before `older_than_ms` (they are the delivery log;
    the events themselves stay in the event log for replay)."""
    purged = 0
    for d in await store.list_docs(DELIVERY_KIND, None):
        if d.get("status") in ("SUCCEEDED", "FAILED") and (d.get("completed_at_ms") or 0) < older_than_ms:
            try:
                await store.save_doc(DELIVERY_KIND, d["tenant_id"], d["delivery_id"], None, d["version"],
                                     guard_tenant=False)
                purged += 1
            except ProtocolError:
                continue
    return purged


# ---- replay and resend ----

class ReplayRejected(Exception):
    """The window holds more than the request may select (400: narrow it)."""


async def select_replay(store: Store, sub: dict[str, Any], from_ms: int | None, to_ms: int | None,
                        event_types: list[str] | None, max_events: int) -> list[dict[str, Any]]:
    """Every deliverable event of the window, in time order; all or nothing (ReplayRejected)."""
    tenant = None if sub.get("tenant_id") == SYSTEM_TENANT else sub.get("tenant_id")
    scan = AuditScan(tenant=tenant, from_ms=from_ms, to_ms=to_ms, descending=False, limit=1000)
    wanted = set(event_types or ())
    selected: list[dict[str, Any]] = []
    scanned = 0
    while True:
        rows = await store.scan_events(scan)
        scanned += len(rows)
        if scanned > REPLAY_SCAN_LIMIT:
            raise ReplayRejected(f"the window holds more than {REPLAY_SCAN_LIMIT} events to scan; narrow from/to")
        for ev in rows:
            scan.after = (int(ev["timestamp_ms"]), ev["event_id"])
            if ev.get("event_type") == TEST_EVENT or (wanted and ev.get("event_type") not in wanted):
                continue
            if deliverable(sub, ev):
                selected.append(ev)
                if len(selected) > max_events:
                    raise ReplayRejected(f"the window holds more than max_events={max_events} deliverable events; "
                                         "narrow from/to or raise max_events (up to 1000)")
        if len(rows) < scan.limit:
            return selected


def check_event_types(event_types: list[str] | None) -> None:
    for t in event_types or ():
        if t not in EVENT_TYPES and not t.startswith("custom."):
            raise ValueError(f"unknown event type {t[:128]!r}")


def new_replay_id() -> str:
    return "whrpl_" + secrets.token_hex(12)


async def replay_running(store: Store, subscription_id: str, now_ms: int) -> dict[str, Any] | None:
    """The subscription's replay lock when its replay is still running (some delivery not finished)."""
    lock = await store.get_doc(DISPATCH_KIND, REPLAY_PREFIX + subscription_id)
    if lock is None:
        return None
    if (lock.get("expires_at_ms") or 0) <= now_ms:
        return None
    for did in lock.get("delivery_ids") or ():
        d = await store.get_doc(DELIVERY_KIND, did)
        if d is not None and d.get("status") in ("PENDING", "IN_FLIGHT"):
            return lock
    return None if lock.get("delivery_ids") is not None else lock


async def acquire_replay_lock(store: Store, sub: dict[str, Any], replay_id: str, now_ms: int) -> dict[str, Any] | None:
    """The lock for a new replay, or None when one is running (409 REPLAY_IN_PROGRESS)."""
    doc_id = REPLAY_PREFIX + sub["subscription_id"]
    for _ in range(3):
        current = await store.get_doc(DISPATCH_KIND, doc_id)
        if current is not None:
            if await replay_running(store, sub["subscription_id"], now_ms) is not None:
                return None
        rec = {"replay_id": replay_id, "subscription_id": sub["subscription_id"], "tenant_id": sub["tenant_id"],
               "created_at_ms": now_ms, "expires_at_ms": now_ms + 60_000, "delivery_ids": None}
        try:
            return await store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, doc_id, rec,
                                        None if current is None else current["version"], guard_tenant=False)
        except ProtocolError:
            continue  # raced with another replay request: look again
    return None


async def finish_replay_lock(store: Store, lock: dict[str, Any], delivery_ids: list[str], estimate_s: int,
                             now_ms: int) -> None:
    rec = {**lock, "delivery_ids": delivery_ids,
           "expires_at_ms": now_ms + min(REPLAY_LOCK_MS, max(60_000, estimate_s * 10_000))}
    rec.pop("version", None)
    try:
        await store.save_doc(DISPATCH_KIND, SYSTEM_TENANT, REPLAY_PREFIX + lock["subscription_id"], rec,
                             lock["version"], guard_tenant=False)
    except ProtocolError:
        log.warning("could not record the deliveries of replay %s", lock.get("replay_id"))


async def enqueue(store: Store, sub: dict[str, Any], events: list[dict[str, Any]], replay_id: str, now_ms: int,
                  *, resent_from: str | None = None, metrics: Any = None, source: str = "replay") -> list[str]:
    """New deliveries (random ids, `replay_id` provenance) for `events`, in their time order. Best effort:
    returns the ids of those created. A DISABLED or deleted subscription gets none; a PAUSED one's are parked."""
    ids: list[str] = []
    current = await store.get_doc(SUB_KIND, sub["subscription_id"])
    if current is None or current.get("status") not in ("ACTIVE", "PAUSED"):
        return ids
    parked = current.get("status") == "PAUSED"
    for i, ev in enumerate(events):
        if ev.get("event_type") == TEST_EVENT or not deliverable(current, ev):
            continue  # the delivery-time guard, re-checked on the current record
        rec = new_delivery(ev, current, now_ms, delivery_id=random_delivery_id(), parked=parked,
                           replay_id=replay_id, resent_from=resent_from, due_ms=now_ms - len(events) + i)
        try:
            if await create_delivery(store, rec):
                ids.append(rec["delivery_id"])
                if metrics is not None:
                    metrics.webhook_created.labels(source).inc()
        except Exception:  # noqa: BLE001 - best-effort enqueue: events_queued tells how many made it
            log.warning("could not enqueue a replay delivery", exc_info=True)
    return ids
