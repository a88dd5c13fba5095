"""Bulk actions (cycles-governance-admin-v0.1.25.yaml): one lifecycle action over every tenant, or one
funding operation over every budget of a tenant, that a filter selects.

Safety gates, in order: the request and its action/payload combination are validated before anything
is matched; the filter is counted in full; more than MAX_ROWS matches is 400 LIMIT_EXCEEDED; an
`expected_count` that differs from the count is 409 COUNT_MISMATCH; nothing is written before these.

Idempotency: the request's `idempotency_key` claims a versioned document (kind `bulk_idem`, id = sha256
of endpoint and key) before the first row is touched; the finished response is kept in the same
document and a repeat of the same key and payload within REPLAY_WINDOW_MS answers it byte for byte.
Each budget row is funded with its own fund idempotency key derived from the claim's generation, so a
run that died half way (crash, store outage) and is resumed with the same key never applies a row
twice; tenant rows are naturally idempotent (a row already in the target state is skipped).

Audit and events: the claim of the key writes a "started" audit row (the filter and the match count)
before any row changes; the request's row, with metadata.phase "finished", carries the whole per-row
outcome. It is written
together with the document that records the finished response (the row writes themselves run without
it), or on its own by the framework when the request ends otherwise. Every row that changed gets one
event (tenant.suspended / budget.funded / ...), written in the same transaction as the row, with
correlation_id `<tenant|budget>_bulk_action:<action>:<request_id>`. A resumed run re-emits the event of
a budget row whose funding it replays (the store cannot tell beforehand), so events are at least once
in that case only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from fractions import Fraction
from typing import Annotated, Any, Iterator, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response

from ..core import events as E
from ..core import scopes as S
from ..protocol import models as m
from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable
from ..store.base import FundCommand, Store, reset_journal, start_journal
from . import access, audit
from .admin import finish_cascade
from .http import Ctx, check_idempotency_header, decode, json_response, read_body
from .params import bad, iso
from .state import state_of

log = logging.getLogger("cycles.server")

MAX_ROWS = 500
REPLAY_WINDOW_MS = 15 * 60 * 1000
IDEM_KIND = "bulk_idem"
PAGE = 500

BulkKey = Annotated[str, Meta(min_length=1, max_length=128)]
Search = Annotated[str, Meta(max_length=128)]
Utilization = Annotated[float, Meta(ge=0, le=1)]
Count = Annotated[int, Meta(ge=0)]


# ---- wire ----

class BulkActionRowOutcome(m.Wire):
    id: str
    error_code: str | None = None
    message: str | None = None
    reason: str | None = None


class TenantBulkFilter(m.Wire):
    status: Literal["ACTIVE", "SUSPENDED", "CLOSED"] | None = None
    parent_tenant_id: Annotated[str, Meta(max_length=64)] | None = None
    # v0.1.26 extension this server does not implement: accepted and ignored, as the spec requires.
    observe_mode: Annotated[str, Meta(max_length=64)] | None = None
    search: Search | None = None


class TenantBulkActionRequest(m.Wire):
    filter: TenantBulkFilter
    action: Literal["SUSPEND", "REACTIVATE", "CLOSE"]
    idempotency_key: BulkKey
    expected_count: Count | None = None


class TenantBulkActionResponse(m.Wire):
    action: str
    total_matched: int
    succeeded: list[BulkActionRowOutcome]
    failed: list[BulkActionRowOutcome]
    skipped: list[BulkActionRowOutcome]
    idempotency_key: str


class BudgetBulkFilter(m.Wire):
    tenant_id: Annotated[str, Meta(min_length=1, max_length=64)]
    scope_prefix: Annotated[str, Meta(max_length=1024)] | None = None
    unit: m.Unit | None = None
    status: Literal["ACTIVE", "FROZEN", "CLOSED"] | None = None
    over_limit: bool | None = None
    has_debt: bool | None = None
    utilization_min: Utilization | None = None
    utilization_max: Utilization | None = None
    search: Search | None = None


class BudgetBulkActionRequest(m.Wire):
    filter: BudgetBulkFilter
    action: Literal["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]
    idempotency_key: BulkKey
    amount: m.Amount | None = None
    spent: m.Amount | None = None
    reason: Annotated[str, Meta(max_length=512)] | None = None
    expected_count: Count | None = None


class BudgetBulkActionResponse(m.Wire):
    action: str
    total_matched: int
    succeeded: list[BulkActionRowOutcome]
    failed: list[BulkActionRowOutcome]
    skipped: list[BulkActionRowOutcome]
    idempotency_key: str


# ---- shared machinery ----

@contextlib.contextmanager
def _without_journal(entries: list[dict[str, Any]] | None = None) -> Iterator[None]:
    """Writes inside run without the request's audit row (it is written with the finished response);
    the next write inside takes `entries` (a row's event) instead."""
    token = start_journal(list(entries or ()))
    try:
        yield
    finally:
        reset_journal(token)


def _row_event(ctx: Ctx, principal: Any, event_type: str, tenant: str, correlation_id: str,
               data: dict[str, Any], *, scope: str | None = None, from_result: bool = False) -> dict[str, Any]:
    """The event of one changed row, complete (its write carries no audit row to take these from)."""
    actor = {"type": "admin_on_behalf_of", "key_id": principal.key_id,
             "source_ip": (ctx.audit or {}).get("source_ip")}
    entry: dict[str, Any] = {"journal": "event", "event_type": event_type, "tenant_id": tenant, "scope": scope,
                             "data": data, "correlation_id": correlation_id, "request_id": ctx.request_id,
                             "trace_id": ctx.trace_id, "actor": {k: v for k, v in actor.items() if v is not None}}
    if from_result:
        entry["data_from"] = "result"
    return entry


def _note(ctx: Ctx, **fields: Any) -> None:
    if ctx.audit is not None:
        ctx.audit.setdefault("metadata", {}).update(fields)


def _gates(ctx: Ctx, total: int, expected: int | None) -> None:
    _note(ctx, total_matched=total)
    if total > MAX_ROWS:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                            f"The filter matches {total} rows; a bulk action applies to at most {MAX_ROWS}. "
                            "Narrow the filter.", status=400, details={"total_matched": total, "limit": MAX_ROWS})
    if expected is not None and expected != total:
        raise ProtocolError(ErrorCode.COUNT_MISMATCH,
                            f"expected_count is {expected} but the filter matches {total} rows; nothing was changed",
                            details={"expected_count": expected, "total_matched": total})


_ROW_CODES = {
    ErrorCode.TENANT_CLOSED: "INVALID_TRANSITION",
    ErrorCode.BUDGET_CLOSED: "INVALID_TRANSITION",
    ErrorCode.BUDGET_FROZEN: "INVALID_TRANSITION",
    ErrorCode.UNIT_MISMATCH: "INVALID_TRANSITION",
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.TENANT_NOT_FOUND: "NOT_FOUND",
    ErrorCode.BUDGET_NOT_FOUND: "NOT_FOUND",
    ErrorCode.BUDGET_EXCEEDED: "BUDGET_EXCEEDED",
    ErrorCode.FORBIDDEN: "PERMISSION_DENIED",
    ErrorCode.INSUFFICIENT_PERMISSIONS: "PERMISSION_DENIED",
}


def _failure(row_id: str, err: ProtocolError) -> BulkActionRowOutcome:
    return BulkActionRowOutcome(id=row_id, error_code=_ROW_CODES.get(err.code, err.code.value), message=err.message)


def _internal(row_id: str, what: str) -> BulkActionRowOutcome:
    log.exception("bulk action: row %s failed unexpectedly (%s)", row_id, what)
    return BulkActionRowOutcome(id=row_id, error_code="INTERNAL_ERROR", message="Internal error applying the action")


ROW_FAILED = object()


async def guarded_row(row_id: str, what: str, failed: list[BulkActionRowOutcome], call: Any) -> Any:
    """Run one row's write. A row's own failure is recorded in `failed` and the run goes on
    (ROW_FAILED is returned); a store outage stops the whole run so a retry can resume it."""
    try:
        return await call()
    except ProtocolError as err:
        failed.append(_failure(row_id, err))
    except StoreUnavailable:
        raise
    except Exception:  # noqa: BLE001 - one row's surprise must not abort the others
        failed.append(_internal(row_id, what))
    return ROW_FAILED


class _Idempotency:
    """The bulk request's claim on its idempotency key (see the module docstring)."""

    def __init__(self, store: Store, owner: str, endpoint: str, key: str, request: Any) -> None:
        self.store = store
        self.owner = owner
        self.intent: dict[str, Any] | None = None  # the "started" audit row the claim writes
        self.doc_id = hashlib.sha256(f"{endpoint}\x00{key}".encode()).hexdigest()
        self.payload_hash = hashlib.sha256(endpoint.encode() + b"\x00" + m.canonical(request)).hexdigest()
        self.record: dict[str, Any] | None = None
        self.version: int | None = None

    @property
    def gen(self) -> str:
        assert self.record is not None
        return self.record["gen"]

    async def _examine(self) -> tuple[str, Any]:
        """("replay", body) | ("free", (expect_version, reusable gen)); refusals raise."""
        doc = await self.store.get_doc(IDEM_KIND, self.doc_id)
        if doc is None:
            return "free", (None, None)
        now = await self.store.now_ms()
        state = doc.get("state")
        since = doc.get("finished_at_ms") if state == "DONE" else doc.get("claimed_at_ms")
        same = doc.get("payload_hash") == self.payload_hash
        if now - int(since or 0) > REPLAY_WINDOW_MS:
            # Past the window the key is free again; an unfinished run of the same payload is resumed
            # under its generation, so the rows it applied are not applied again.
            return "free", (doc["version"], doc.get("gen") if state != "DONE" and same else None)
        if not same:
            raise ProtocolError(ErrorCode.IDEMPOTENCY_MISMATCH,
                                "This idempotency_key was already used with a different bulk request payload")
        if state == "DONE":
            return "replay", doc["response"].encode()
        if state == "ABORTED":
            return "free", (doc["version"], doc.get("gen"))
        raise ProtocolError(ErrorCode.DUPLICATE_RESOURCE,
                            "A bulk action with this idempotency_key is still running; retry shortly with the same key",
                            details={"state": "RUNNING"}, headers={"Retry-After": "1"})

    async def lookup(self) -> bytes | None:
        kind, value = await self._examine()
        return value if kind == "replay" else None

    async def claim(self) -> bytes | None:
        """Take the key for this run; a finished run of the same request found instead is replayed."""
        for _ in range(3):
            kind, value = await self._examine()
            if kind == "replay":
                return value
            expect, gen = value
            record = {"endpoint_key_hash": self.doc_id, "payload_hash": self.payload_hash, "state": "RUNNING",
                      "gen": gen or secrets.token_hex(8), "claimed_at_ms": await self.store.now_ms()}
            try:
                # the claim carries the "started" audit row: no row of the run changes before it exists
                with _without_journal([self.intent] if self.intent else []):
                    stored = await self.store.save_doc(IDEM_KIND, self.owner, self.doc_id, record, expect,
                                                       guard_tenant=False)
            except ProtocolError as err:
                if err.code in (ErrorCode.DUPLICATE_RESOURCE, ErrorCode.NOT_FOUND):
                    continue  # lost a race for the key: look again
                raise
            assert stored is not None
            self.version = stored["version"]
            self.record = record
            return None
        raise ProtocolError(ErrorCode.DUPLICATE_RESOURCE,
                            "A bulk action with this idempotency_key is still running; retry shortly with the same key",
                            details={"state": "RUNNING"}, headers={"Retry-After": "1"})

    async def finish(self, body: bytes) -> None:
        """Keep the response for replays; this write carries the request's audit row."""
        assert self.record is not None
        record = {**self.record, "state": "DONE", "finished_at_ms": await self.store.now_ms(),
                  "response": body.decode()}
        try:
            await self.store.save_doc(IDEM_KIND, self.owner, self.doc_id, record, self.version, guard_tenant=False)
        except (ProtocolError, StoreUnavailable):
            log.warning("bulk action: could not record the response of key document %s", self.doc_id, exc_info=True)

    async def abort(self) -> None:
        """The run stopped half way: let a retry of the same request resume it at once."""
        if self.record is None:
            return
        record = {**self.record, "state": "ABORTED"}
        try:
            with _without_journal():
                await self.store.save_doc(IDEM_KIND, self.owner, self.doc_id, record, self.version,
                                          guard_tenant=False)
        except Exception:  # noqa: BLE001 - best effort; the claim expires after the window anyway
            log.warning("bulk action: could not release key document %s", self.doc_id, exc_info=True)


def _respond(ctx: Ctx, body: bytes) -> Response:
    return json_response(ctx, msgspec.Raw(body))


async def _run(ctx: Ctx, idem: _Idempotency, apply: Any, response: Any) -> Response:
    """Claim the key, apply every row (without the audit row), record the outcome and answer it."""
    if ctx.audit is not None:
        idem.intent = {**ctx.audit, "log_id": audit.new_log_id(),
                       "metadata": {**(ctx.audit.get("metadata") or {}), "phase": "started"}}
    replay = await idem.claim()
    if replay is not None:
        _note(ctx, replay=True)
        return _respond(ctx, replay)
    succeeded: list[BulkActionRowOutcome] = []
    failed: list[BulkActionRowOutcome] = []
    skipped: list[BulkActionRowOutcome] = []
    try:
        with _without_journal():
            await apply(succeeded, failed, skipped)
    except BaseException:
        await idem.abort()
        raise
    _note(ctx, phase="finished", succeeded_ids=[r.id for r in succeeded],
          failed=[{"id": r.id, "error_code": r.error_code} for r in failed],
          skipped_ids=[r.id for r in skipped],
          succeeded_count=len(succeeded), failed_count=len(failed), skipped_count=len(skipped))
    body = m.encode(response(succeeded, failed, skipped))
    await idem.finish(body)
    return _respond(ctx, body)


# ---- tenants ----

_TENANT_TARGET = {"SUSPEND": "SUSPENDED", "REACTIVATE": "ACTIVE", "CLOSE": "CLOSED"}
_TENANT_EVENT = {"SUSPEND": "tenant.suspended", "REACTIVATE": "tenant.reactivated", "CLOSE": "tenant.closed"}


async def bulk_action_tenants(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    req = decode(await read_body(request), TenantBulkActionRequest)
    check_idempotency_header(request, req.idempotency_key)
    f = req.filter
    search = (f.search or "").strip().lower() or None
    if f.status is None and f.parent_tenant_id is None and search is None:
        raise bad("filter must name at least one of status, parent_tenant_id or search "
                  "(an empty filter would act on every tenant)")
    _note(ctx, actor_type="admin_on_behalf_of", action=req.action, filter=msgspec.to_builtins(f),
          idempotency_key=req.idempotency_key)
    store = state_of(request).store
    idem = _Idempotency(store, audit.ADMIN_SENTINEL, "bulkActionTenants", req.idempotency_key, req)
    replay = await idem.lookup()
    if replay is not None:
        _note(ctx, replay=True)
        return _respond(ctx, replay)

    rows = sorted((t for t in await store.list_tenants()
                   if (f.status is None or t.get("status") == f.status)
                   and (f.parent_tenant_id is None or t.get("parent_tenant_id") == f.parent_tenant_id)
                   and (search is None or search in t["tenant_id"].lower()
                        or search in str(t.get("name") or "").lower())),
                  key=lambda t: t["tenant_id"])
    _gates(ctx, len(rows), req.expected_count)
    target = _TENANT_TARGET[req.action]
    correlation = f"tenant_bulk_action:{req.action.lower()}:{ctx.request_id}"

    def event(tid: str, previous: str | None) -> dict[str, Any]:
        return _row_event(ctx, principal, _TENANT_EVENT[req.action], tid, correlation,
                          {"tenant_id": tid, "previous_status": previous, "new_status": target})

    async def apply(succeeded: list[BulkActionRowOutcome], failed: list[BulkActionRowOutcome],
                    skipped: list[BulkActionRowOutcome]) -> None:
        for row in rows:
            await asyncio.sleep(0)  # a long run shares the event loop with other requests
            tid = row["tenant_id"]
            outcome = await guarded_row(tid, req.action, failed,
                                        lambda: _tenant_row(store, tid, req.action, target, event))
            if outcome is ROW_FAILED:
                continue
            (succeeded if outcome is None else skipped).append(BulkActionRowOutcome(id=tid, reason=outcome))

    def response(succeeded: Any, failed: Any, skipped: Any) -> TenantBulkActionResponse:
        return TenantBulkActionResponse(action=req.action, total_matched=len(rows), succeeded=succeeded,
                                        failed=failed, skipped=skipped, idempotency_key=req.idempotency_key)

    return await _run(ctx, idem, apply, response)


async def _tenant_row(store: Store, tenant_id: str, action: str, target: str, event: Any) -> str | None:
    """Apply the action to one tenant: None when it changed (its event written with the change), else
    the skip reason."""
    current = await store.get_tenant(tenant_id)
    if current is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"Tenant {tenant_id} not found")
    status = current.get("status")
    if status == target:
        if target == "CLOSED" and current.get("cascade") == "PENDING":
            await finish_cascade(store, tenant_id)  # an interrupted close: finish its cascade
        return "ALREADY_IN_TARGET_STATE"
    if status == "CLOSED":
        raise ProtocolError(ErrorCode.TENANT_CLOSED, f"Tenant {tenant_id} is CLOSED; {action} is not allowed")
    now_iso = iso(await store.now_ms())
    with _without_journal([event(tenant_id, status)]):
        rec = await store.update_tenant(tenant_id, {"status": target}, now_iso)
    if rec.get("cascade") == "PENDING":
        try:
            await finish_cascade(store, tenant_id)
        except ProtocolError as err:
            raise ProtocolError(err.code, f"Tenant {tenant_id} is CLOSED but its close cascade did not finish "
                                          f"({err.message}); it resumes on restart") from None
    return None


# ---- budgets ----

def _utilization(spent: int, allocated: int) -> Fraction | None:
    """spent / allocated exactly; None stands for 'above any bound' (spending with nothing allocated)."""
    if allocated > 0:
        return Fraction(spent, allocated)
    return Fraction(0) if spent <= 0 else None


def _budget_filter(f: BudgetBulkFilter) -> Any:
    """Validate the filter and return the predicate over store budget rows."""
    tenant = f.tenant_id
    prefix = None
    if f.scope_prefix is not None:
        try:
            pairs = S.parse(f.scope_prefix)
        except S.ScopeError as exc:
            raise bad(f"filter.scope_prefix: {exc}") from None
        if pairs[0] != ("tenant", tenant.lower()):
            raise bad(f"filter.scope_prefix must start with tenant:{tenant}")
        prefix = "/".join(f"{level}:{value}" for level, value in pairs)
    umin = Fraction(str(f.utilization_min)) if f.utilization_min is not None else None
    umax = Fraction(str(f.utilization_max)) if f.utilization_max is not None else None
    if umin is not None and umax is not None and umin > umax:
        raise bad("filter.utilization_min must not exceed filter.utilization_max")
    search = (f.search or "").strip().lower() or None

    def matches(row: dict[str, Any]) -> bool:
        led = row["ledger"]
        scope = led.scope
        if prefix is not None and scope != prefix and not scope.startswith(prefix + "/"):
            return False  # the scope itself and its descendants, never a sibling sharing a name prefix
        if f.unit is not None and led.unit != f.unit:
            return False
        if f.status is not None and led.status != f.status:
            return False
        if f.over_limit is not None and bool(led.is_over_limit) != f.over_limit:
            return False
        if f.has_debt is not None and (led.debt > 0) != f.has_debt:
            return False
        if umin is not None or umax is not None:
            u = _utilization(led.spent, led.allocated)
            if umin is not None and u is not None and u < umin:
                return False
            if umax is not None and (u is None or u > umax):
                return False
        if search is not None and search not in row["tenant_id"].lower() and search not in scope.lower():
            return False
        return True

    store_filters = {"scope_prefix": prefix, "unit": f.unit, "status": f.status, "over_limit": f.over_limit,
                     "has_debt": f.has_debt}
    return matches, store_filters


async def _matching_budgets(store: Store, tenant: str, matches: Any, store_filters: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        page = await store.list_budgets(tenant, store_filters, PAGE, after)
        rows += [r for r in page.items if r["tenant_id"] == tenant and matches(r)]
        if not page.has_more or not page.items:
            return rows
        last = page.items[-1]
        after = (last["tenant_id"], last["ledger"].scope, last["ledger"].unit)


async def bulk_action_budgets(request: Request, ctx: Ctx) -> Response:
    principal = await access.authenticate(request, ctx, allow_admin=True, allow_tenant=False)
    req = decode(await read_body(request), BudgetBulkActionRequest)
    check_idempotency_header(request, req.idempotency_key)
    # The action/payload combination first: nothing is matched for a request that cannot apply.
    amount = req.amount
    if amount is None:
        raise bad(f"{req.action} requires amount")
    spent = req.spent if req.action == "RESET_SPENT" else None  # ignored for the other actions
    if spent is not None and spent.unit != amount.unit:
        raise ProtocolError(ErrorCode.UNIT_MISMATCH, f"spent unit {spent.unit} does not match amount unit {amount.unit}",
                            details={"requested_unit": spent.unit, "expected_units": [amount.unit]})
    f = req.filter
    if f.unit is not None and f.unit != amount.unit:
        raise ProtocolError(ErrorCode.UNIT_MISMATCH,
                            f"amount unit {amount.unit} contradicts filter.unit {f.unit}: no matched budget could take it",
                            details={"requested_unit": amount.unit, "expected_units": [f.unit]})
    matches, store_filters = _budget_filter(f)
    tenant = f.tenant_id
    _note(ctx, actor_type="admin_on_behalf_of", action=req.action, filter=msgspec.to_builtins(f),
          idempotency_key=req.idempotency_key, **({"reason": req.reason} if req.reason else {}))
    audit.target_tenant(ctx, tenant)
    store = state_of(request).store
    if await store.get_tenant(tenant) is None:
        raise ProtocolError(ErrorCode.TENANT_NOT_FOUND, f"Tenant {tenant} not found")
    idem = _Idempotency(store, tenant, "bulkActionBudgets", req.idempotency_key, req)
    replay = await idem.lookup()
    if replay is not None:
        _note(ctx, replay=True)
        return _respond(ctx, replay)

    rows = await _matching_budgets(store, tenant, matches, store_filters)
    _gates(ctx, len(rows), req.expected_count)
    correlation = f"budget_bulk_action:{req.action.lower()}:{ctx.request_id}"

    async def apply(succeeded: list[BulkActionRowOutcome], failed: list[BulkActionRowOutcome],
                    skipped: list[BulkActionRowOutcome]) -> None:
        for row in rows:
            await asyncio.sleep(0)  # a long run shares the event loop with other requests
            led, ledger_id = row["ledger"], row["ledger_id"]
            if led.unit != amount.unit:
                failed.append(BulkActionRowOutcome(
                    id=ledger_id, error_code="INVALID_TRANSITION",
                    message=f"amount unit {amount.unit} does not match the budget unit {led.unit}"))
                continue
            if req.action == "REPAY_DEBT" and led.debt == 0:
                skipped.append(BulkActionRowOutcome(id=ledger_id, reason="ALREADY_IN_TARGET_STATE"))
                continue
            payload = hashlib.sha256("\x00".join(
                (led.scope, led.unit, req.action, str(amount.amount), "" if spent is None else str(spent.amount))
            ).encode()).hexdigest()
            cmd = FundCommand(tenant=tenant, scope=led.scope, unit=led.unit, operation=req.action,
                              amount=amount.amount, spent=spent.amount if spent is not None else None,
                              idempotency_key=f"bulk:{idem.gen}:{req.idempotency_key}:{led.scope}:{led.unit}",
                              payload_hash=payload, reason=req.reason)
            event = _row_event(ctx, principal, E.FUNDING_EVENTS[req.action], tenant, correlation,
                               {"scope": led.scope, "unit": led.unit, "ledger_id": ledger_id, "reason": req.reason,
                                "spent_override_provided": spent is not None if req.action == "RESET_SPENT" else None},
                               scope=led.scope, from_result=True)
            async def fund(cmd: FundCommand = cmd, event: dict[str, Any] = event) -> None:
                with _without_journal([event]):
                    await store.fund(cmd)

            if await guarded_row(ledger_id, req.action, failed, fund) is ROW_FAILED:
                continue
            succeeded.append(BulkActionRowOutcome(id=ledger_id))

    def response(succeeded: Any, failed: Any, skipped: Any) -> BudgetBulkActionResponse:
        return BudgetBulkActionResponse(action=req.action, total_matched=len(rows), succeeded=succeeded,
                                        failed=failed, skipped=skipped, idempotency_key=req.idempotency_key)

    return await _run(ctx, idem, apply, response)
