"""The store interface. Every mutating operation is one atomic step on the store: the idempotency
check, the tenant guard, the scope lookups, the ledger checks and every write happen together or
not at all, whichever process (or machine) runs it.

Operations return an `Outcome`: the result record of the operation (plain JSON data, see
`cycles.server.render`) and whether it is a replay. The same record is what the idempotency table
keeps, so a replay renders byte-for-byte the same body, except for volatile fields.
"""

from __future__ import annotations

import abc
import itertools
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# Journal entries (audit rows, later events) that the next successful write transaction of this
# request writes together with its change: a change never lands without its record. Entries a
# request's transactions did not take are written on their own afterwards (failures, no-op replays).
_JOURNAL: ContextVar[list[dict[str, Any]] | None] = ContextVar("cycles_journal", default=None)


def start_journal(entries: list[dict[str, Any]]) -> Any:
    return _JOURNAL.set(entries)


def reset_journal(token: Any) -> None:
    _JOURNAL.reset(token)


def pending_journal() -> list[dict[str, Any]]:
    """Entries waiting for a transaction; a store empties the list once its transaction committed."""
    return _JOURNAL.get() or []


_EVENT_SEQ = itertools.count()


def new_event_id(now_ms: int) -> str:
    """Time-ordered: events of one millisecond sort in the order this process produced them."""
    import secrets

    return f"evt_{now_ms:012x}{next(_EVENT_SEQ) & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"


def request_context(request: dict[str, Any]) -> dict[str, Any]:
    """What an event takes from the request that caused it (its audit row or `context` entry): ids and actor."""
    out: dict[str, Any] = {}
    if request.get("request_id"):
        out["request_id"] = request["request_id"]
        out["correlation_id"] = f"request:{request['request_id']}"
    if request.get("trace_id"):
        out["trace_id"] = request["trace_id"]
    actor = {"type": (request.get("metadata") or {}).get("actor_type") or "api_key",
             "key_id": request.get("key_id"), "source_ip": request.get("source_ip")}
    out["actor"] = {k: v for k, v in actor.items() if v is not None}
    return out


def stamp_journal(entries: list[dict[str, Any]], now_ms: int, result: Any) -> list[dict[str, Any]]:
    """Fill what only the transaction knows: the time, the id of what a reserve created, and for
    events their id, category and the request they came from (taken from the request's audit row, or
    from its `context` entry for runtime requests, which is not written)."""
    request = next((e for e in entries if e.get("journal", "audit") in ("audit", "context")), None)
    out = []
    for entry in entries:
        if entry.get("journal") == "context":
            continue  # describes the request for its events; not a row of its own
        rec = dict(entry)
        rec.pop("observation", None)
        rec.pop("only_if_created", None)
        if rec.get("timestamp_ms") is None:
            rec["timestamp_ms"] = now_ms
        if rec.get("journal") == "event":
            rec.setdefault("event_id", new_event_id(now_ms))
            rec.setdefault("category", rec["event_type"].split(".", 1)[0])
            rec.setdefault("source", "cycles-server")
            if rec.pop("data_from", None) == "result" and isinstance(result, dict):
                rec["data"] = {**(rec.get("data") or {}), **result}
            if request is not None:
                rec.setdefault("request_id", request.get("request_id"))
                rec.setdefault("trace_id", request.get("trace_id"))
                for name, value in request_context(request).items():
                    if name in ("actor", "correlation_id"):
                        rec.setdefault(name, value)
            # every event carries a correlation id: its request's, else its own
            rec.setdefault("correlation_id", f"event:{rec['event_id']}")
        elif rec.get("resource_id") is None and isinstance(result, dict) and result.get("reservation_id"):
            rec["resource_id"] = result["reservation_id"]
        out.append(rec)
    return out


class StaleGovernance(Exception):
    """A runtime operation was sent with the governance generation its caller's cache was read at, and
    the tenant's key records, tenant record or policies have changed since: nothing was done; the caller
    reloads what it cached and retries (cycles.server.govcache)."""


@dataclass(slots=True)
class Outcome:
    result: dict[str, Any]
    replay: bool = False
    now_ms: int = 0
    reservation_active: bool = True


@dataclass(slots=True)
class ReserveCommand:
    tenant: str
    endpoint: str  # "reserve" (live and dry run share it) or "decide"
    idempotency_key: str
    payload_hash: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    amount: int
    scope_path: str
    scopes: list[str]
    dry_run: bool = False
    ttl_ms: int | None = None
    grace_ms: int | None = None
    overage_policy: str | None = None
    metadata: dict[str, Any] | None = None
    caps: dict[str, Any] | None = None
    policy: dict[str, Any] = field(default_factory=dict)  # Resolution.store_args(): TTL, extensions, overage
    # rate limit buckets [(bucket, limit, policy_id, scope)]: reserve ones are checked now, commit ones
    # are kept on the reservation and checked when it is committed
    limits: list[tuple[str, int, str, str]] = field(default_factory=list)
    commit_limits: list[tuple[str, int, str, str]] = field(default_factory=list)
    gen: int | None = None  # governance generation the caller's cache was read at (None: no check)
    # v0.1.26 action rules (core.actions.Plan.store_arg: a step-1 denial, the quota counters) and the
    # request's observe_mode; None when the request and the tenant's policies use neither
    actions: dict[str, Any] | None = None
    observe_mode: str | None = None
    # the tenant's record as the caller read it after `gen`: used only when `gen` is checked (then it is
    # current), to spare the store a read; None: the store reads it
    tenant_record: dict[str, Any] | None = None


@dataclass(slots=True)
class SettleCommand:
    """commit / release / extend on one reservation."""

    tenant: str | None  # None: admin acting on behalf of the owner
    reservation_id: str
    idempotency_key: str
    payload_hash: str
    actual: int | None = None
    unit: str | None = None
    extend_by_ms: int | None = None
    metadata: dict[str, Any] | None = None
    reason: str | None = None
    gen: int | None = None  # as on ReserveCommand
    tenant_record: dict[str, Any] | None = None  # as on ReserveCommand


@dataclass(slots=True)
class EventCommand:
    tenant: str
    idempotency_key: str
    payload_hash: str
    subject: dict[str, Any]
    action: dict[str, Any]
    unit: str
    amount: int
    scope_path: str
    scopes: list[str]
    overage_policy: str | None = None
    metadata: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    client_time_ms: int | None = None
    gen: int | None = None  # as on ReserveCommand
    tenant_record: dict[str, Any] | None = None  # as on ReserveCommand


@dataclass(slots=True)
class FundCommand:
    tenant: str
    scope: str
    unit: str
    operation: str
    amount: int
    spent: int | None
    idempotency_key: str | None
    payload_hash: str
    reason: str | None = None


@dataclass(slots=True)
class ReservationQuery:
    tenant: str
    status: str | None = None
    idempotency_key: str | None = None
    subject: dict[str, str] = field(default_factory=dict)
    windows: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    sort_by: str = "created_at_ms"
    sort_dir: str = "desc"
    limit: int = 50
    after: tuple[Any, str] | None = None


@dataclass(slots=True)
class AuditScan:
    """A time-ordered window of the audit log; filters beyond these are applied by the caller."""

    tenant: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    descending: bool = True
    after: tuple[int, str] | None = None  # (timestamp_ms, log_id) of the last row already returned
    limit: int = 500


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    has_more: bool


class Store(abc.ABC):
    """What every store provides. Methods are coroutines so network stores fit the same shape."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def health(self) -> bool: ...

    async def catch_up_views(self) -> None:
        """Bring eventually consistent cross-tenant views up to date (Redis Cluster's outbox drain); every
        other store reads them as they are written."""

    @abc.abstractmethod
    async def now_ms(self) -> int:
        """The store's clock: the one every expiry decision uses."""

    # settings and identities
    @abc.abstractmethod
    async def get_setting(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def put_setting(self, name: str, value: str, *, only_if_absent: bool) -> str:
        """Store a setting; with only_if_absent, return whichever value won."""

    @abc.abstractmethod
    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a tenant unless it exists; returns (stored record, created)."""

    @abc.abstractmethod
    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        """Apply changes atomically; a CLOSED tenant is terminal (409 TENANT_CLOSED)."""

    @abc.abstractmethod
    async def create_api_key(self, record: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def find_api_key(self, prefix: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def governance_gen(self, tenant: str) -> int:
        """The tenant's governance generation: changes with every change to its record, its API keys
        (other than last use) and its policies, in the same step as the change."""

    # budgets
    @abc.abstractmethod
    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def list_budgets(
        self, tenant: str | None, filters: dict[str, Any], limit: int, after: tuple[str, str, str] | None
    ) -> Page: ...

    @abc.abstractmethod
    async def fund(self, cmd: FundCommand) -> Outcome: ...

    # runtime
    @abc.abstractmethod
    async def reserve(self, cmd: ReserveCommand) -> Outcome: ...

    @abc.abstractmethod
    async def commit(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def release(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def extend(self, cmd: SettleCommand) -> Outcome: ...

    @abc.abstractmethod
    async def create_event(self, cmd: EventCommand) -> Outcome: ...

    @abc.abstractmethod
    async def action_counters(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's live action quota counters: {counter (full key, core.actions.split_key), used,
        expires_at_ms, last_ms, limit, policy_id}."""

    @abc.abstractmethod
    async def reset_action_counter(self, tenant: str, key: str) -> dict[str, Any]:
        """Set one live counter to 0 (the spec's reset: a calendar window keeps its end, a per_run counter's
        TTL is refreshed from now): the counter with used 0 and previous_used; 404 NOT_FOUND when no live
        counter has that key."""

    @abc.abstractmethod
    async def hot_action_counters(self) -> list[dict[str, Any]]:
        """Every tenant's live counters at 80 % or more of their limit (the overview's quota health), read
        from an index of those counters only: {tenant_id, counter, used, limit}."""

    async def governance_counts(self) -> dict[str, int]:
        """Tenants with an observe_mode other than ENFORCE, policies with an allow list, with a deny list.
        (A read of the tenant and policy records; the admin plane's objects, not the runtime's.)"""
        observe = sum((t.get("observe_mode") or "ENFORCE") != "ENFORCE" for t in await self.list_tenants())
        policies = await self.list_docs("policy", None)
        return {"in_observe_mode": observe,
                "policies_with_allow_list": sum(bool(p.get("allowed_action_kinds")) for p in policies),
                "policies_with_deny_list": sum(bool(p.get("denied_action_kinds")) for p in policies)}

    @abc.abstractmethod
    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_reservations(self, query: ReservationQuery) -> Page: ...

    @abc.abstractmethod
    async def scan_spend(self, tenant: str, from_ms: int, to_ms: int, limit: int) -> Page:
        """What was charged to the tenant's budgets in [from_ms, to_ms] (for usage over time, off the hot
        path): COMMITTED reservations by finalization time and post-only events (POST /v1/events) by creation
        time, each {source: "reservation" | "event", scope_path, subject, action, unit, amount (charged),
        at_ms}. Reads a bounded number of rows, about `limit` of each source, newest first; has_more when
        that bound cut the answer short."""

    @abc.abstractmethod
    async def balances(
        self, tenant: str, wanted: dict[str, str], include_children: bool, limit: int, after: tuple[str, str] | None
    ) -> Page: ...

    @abc.abstractmethod
    async def expire_due(self, limit: int = 500) -> int:
        """Expire leases past expires_at + grace and return their holds; each exactly once."""

    @abc.abstractmethod
    async def count_active(self) -> int: ...

    @abc.abstractmethod
    async def purge_idempotency(self, older_than_ms: int) -> int: ...

    # ---- admin plane ----

    @abc.abstractmethod
    async def append_journal(self, entries: list[dict[str, Any]]) -> None:
        """Write journal entries on their own (records of requests that changed nothing)."""

    @abc.abstractmethod
    async def scan_audit(self, scan: AuditScan) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def purge_audit(self, older_than_ms: int) -> int: ...

    @abc.abstractmethod
    async def scan_events(self, scan: AuditScan) -> list[dict[str, Any]]:
        """Governance events in (timestamp_ms, event_id) order; the same window semantics as scan_audit."""

    @abc.abstractmethod
    async def get_event(self, event_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def purge_events(self, older_than_ms: int) -> int: ...

    @abc.abstractmethod
    async def list_tenants(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def list_api_keys(self, tenant: str | None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def update_api_key(self, key_id: str, changes: dict[str, Any], *, guard_tenant: bool = True) -> dict[str, Any]:
        """Apply changes to a key record; a REVOKED key accepts no change; a CLOSED tenant's keys answer
        TENANT_CLOSED unless guard_tenant is False (the close cascade revoking them)."""

    @abc.abstractmethod
    async def touch_api_keys(self, last_used: dict[str, int]) -> None:
        """Record last use times (batched by the caller; a later time never goes backwards)."""

    @abc.abstractmethod
    async def get_doc(self, kind: str, doc_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_docs(self, kind: str, tenant: str | None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def save_doc(self, kind: str, tenant: str, doc_id: str, record: dict[str, Any] | None,
                       expect_version: int | None, *, guard_tenant: bool = True) -> dict[str, Any] | None:
        """Create (expect_version None: must not exist), replace or delete (record None) a document
        whose stored `version` equals expect_version; bumps `version`. A lost race answers 409."""

    @abc.abstractmethod
    async def due_docs(self, kind: str, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        """Documents of `kind` whose `due_ms` field is set and <= now_ms, earliest first (work queues:
        a claimed item's due_ms is its lease end, so an unacknowledged claim becomes due again)."""

    @abc.abstractmethod
    async def get_budget(self, tenant: str, scope: str, unit: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def update_budget(self, tenant: str, scope: str, unit: str, changes: dict[str, Any],
                            *, guard_tenant: bool = True) -> dict[str, Any]:
        """Change a ledger's settings or status. Keys: status (with `from_status` the allowed current
        statuses), allocated, overdraft_limit, commit_overage_policy, extra (merged). CLOSED is terminal;
        closing returns nothing held (reservations settle against the closed ledger as usual)."""

    @abc.abstractmethod
    async def due_rollovers(self, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        """Budget rows (as get_budget) whose period ended at or before now_ms, oldest first."""

    @abc.abstractmethod
    async def rollover_budget(self, tenant: str, scope: str, unit: str, expected_end_ms: int,
                              period: dict[str, Any]) -> dict[str, Any] | None:
        """Start the next period (`period`: the new period_* fields of extra, incl. period_end_ms)
        with `core.ledger.rollover`, only if the stored period still ends at expected_end_ms; None
        when another process did it first. Returns {before, after, extra}."""

    @abc.abstractmethod
    async def counters(self) -> dict[str, int]:
        """Counts kept up to date with every change (not computed per call): 'tenants.<STATUS>',
        'budgets.<STATUS>', 'budgets.unit.<UNIT>', 'budgets.over_limit', 'budgets.with_debt'."""

    @abc.abstractmethod
    async def top_budgets(self, kind: str, limit: int = 10) -> list[dict[str, Any]]:
        """Budget rows that are over limit (kind 'over_limit') or in debt ('debt'), most debt first."""

    @abc.abstractmethod
    async def cascade_close(self, tenant: str, batch: int = 200) -> bool:
        """One bounded, atomic step of a CLOSED tenant's cascade: release open reservations, close
        budgets, revoke keys, disable webhooks. Returns True (and marks the tenant's cascade DONE)
        when nothing is left. Safe to repeat and to run from several processes at once."""

    # ---- CyclesEvidence (cycles.server.evidence) ----

    @abc.abstractmethod
    async def put_evidence(self, evidence_id: str, body: bytes, links: list[str]) -> str:
        """Store a signed envelope under its content id and point `links` (maybe none) at it, in one step,
        unless links[0] already points at one: then nothing is written and that envelope's id is returned."""

    @abc.abstractmethod
    async def get_evidence(self, evidence_id: str) -> bytes | None: ...

    @abc.abstractmethod
    async def evidence_links(self, links: list[str]) -> list[str | None]:
        """The evidence id each link points at (None where none)."""

    async def count_public(self, key: str, window_s: int) -> int | None:
        """Count one request of an unauthenticated route under `key` (route and source address) in the current
        wall-clock window of `window_s` seconds, shared by every server of the store; the count so far. None:
        this store does not share such counts (each process counts its own: cycles.server.throttle)."""
        return None

    @abc.abstractmethod
    async def pending_cascades(self) -> list[str]:
        """Tenants whose close cascade has not finished (a crash stopped it): resumed at startup."""
