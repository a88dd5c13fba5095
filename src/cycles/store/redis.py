"""The Redis store: the same atomic semantics on a store that many server machines share.

Every mutating operation is one Lua script call (EVALSHA; redis-py reloads a script on NOSCRIPT) that
does the idempotency check, the tenant guard, the scope lookups, the checks and all writes. Time comes
from Redis (`TIME` inside the script), so servers with skewed clocks agree on expiry.

Key layout (docs/redis.md): every key of a tenant carries the hash tag `{<tenant>}`. Reservation ids
embed the owning tenant (`rsv_<tenant>.<random>`) so a request naming only the id finds its keys. On one
primary the admin plane (audit log, API key and document indexes) adds global keys that scripts write
together with tenant keys; on Redis Cluster (redis_cluster.RedisClusterStore, the same scripts compiled
with CLUSTER true) those live in each tenant's slot instead.

Journal: every script call carries the request's pending journal entries (base.pending_journal) as its
last argument; the loader wraps each script so that, when the script did not answer an error, the
entries are written in the same script, then the Python side empties the list. The governance events the
store itself produces (ledger transitions, commit overage, expiry, rollover, the close cascade: the same
as the SQLite store's) are built and written by the same script (common_journal.lua emit / finish_journal).

Beside this module: redis_keys (the key layout and shared codecs), redis_admin (the admin plane's reads and
bookkeeping beyond one script), redis_evidence, redis_quotas, redis_wire (the pipelined script channel),
redis_cluster and redis_outbox (Redis Cluster).
"""

from __future__ import annotations

import random
import secrets
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..core import policies as Pol
from ..core.scopes import matches_filter
from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable, VersionConflict
from .redis_admin import RedisAdmin
from .redis_evidence import RedisEvidence
from .redis_keys import TENANTS, _budget_row, _decode, _flat, _opt, _s, prefix, tenant_of_reservation
from .redis_quotas import RedisQuotas
from .redis_wire import ScriptChannel, supports
from .base import (
    EventCommand,
    FundCommand,
    Outcome,
    Page,
    ReservationQuery,
    ReserveCommand,
    SettleCommand,
    StaleGovernance,
    Store,
    pending_journal,
    request_context,
    stamp_journal,
)

T = TypeVar("T")
IDEMPOTENCY_RETENTION_MS = 7 * 24 * 3600 * 1000
# The prelude every script starts with, in this order (later parts use the functions of earlier ones)
_PRELUDE = ("common.lua", "common_journal.lua", "common_ledgers.lua", "common_quotas.lua", "common_leases.lua")
_SCRIPTS = ("reserve", "settle", "event", "fund", "expire", "budget", "tenant", "setting", "apikey", "doc",
            "budget_admin", "cascade", "audit", "rollover", "counters", "evidence", "quota_admin", "spend")

# Every script body runs as a function; the epilogue (common_journal.lua finish_journal) writes the journal (the
# last ARGV, see _journal_arg) when the body's answer is not an error, and the governance events the script
# itself produced (ledger transitions, commit overage, expiry, rollover, the close cascade) in any case, in
# the same atomic script. The operation's result record (runtime outcomes, fresh or replayed) gives the rows
# the reservation id and event data they take from it (base.stamp_journal).
_EPILOGUE = """
local __result = __main()
finish_journal(__result, ARGV[#ARGV])
outbox_flush()
return __result
"""


def _script_source(common: str, body: str, *, cluster: bool = False) -> str:
    # CLUSTER: where the scripts keep the cross-tenant views (common.lua, "Global keys"); the outbox
    # (outbox.lua) is written on Redis Cluster only, its functions do nothing on one primary
    flag = "true" if cluster else "false"
    return f"local CLUSTER = {flag}\n{_OUTBOX}{common}\nlocal function __main()\n{body}\nend\n{_EPILOGUE}"


_OUTBOX = resources.files("cycles.store").joinpath("lua/outbox.lua").read_text()
_INT_FIELDS = ("amount", "created_at_ms", "expires_at_ms", "grace_ms", "deadline_ms", "committed", "finalized_at_ms",
               "extensions", "max_extensions")
MAX_LIST_CANDIDATES = 50_000
SPEND_PAGE = 1000  # reservation hashes read per round trip by scan_spend


def _journal_arg(*groups: list[dict[str, Any]]) -> str:
    """The journal argument of a script: {"items": [[entry JSON, merge the result into data (0/1), only if
    created (0/1), take the script's event id (0/1)], ...], "ctx": what the store's own events take from
    the request (JSON text), "rand": 8 hex digits}; each group is stamped on its own, as each transaction
    stamps its entries.

    Entries are stamped here (base.stamp_journal) with everything that does not depend on the script:
    the script adds the time, the event ids (they start with the script's time) and what comes from the
    operation's result. They are checked here too, before the script runs: a script that failed halfway
    would keep its change without its rows."""
    out: list[list[Any]] = []
    for entries in groups:
        out += _journal_items(entries)
    return _s({"items": out, "ctx": _s(_event_context([e for g in groups for e in g])),
               "rand": f"{random.getrandbits(32):08x}"})


def _journal_items(entries: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    kept = [e for e in entries if e.get("journal") != "context"]  # stamp_journal leaves those out
    if not kept:
        return out
    for entry, rec in zip(kept, stamp_journal(entries, 0, None)):
        if "timestamp_ms" not in entry:
            del rec["timestamp_ms"]
        elif not isinstance(entry["timestamp_ms"], int) or isinstance(entry["timestamp_ms"], bool):
            raise ValueError("journal entry timestamp_ms must be an int")
        if rec.get("journal") == "event":
            ident = rec.get("event_id")
        else:
            ident = rec.get("log_id")
        if not isinstance(ident, str) or not isinstance(rec.get("tenant_id"), str):
            raise ValueError("journal entries need a string id and tenant_id")
        event = rec.get("journal") == "event"
        merge = 1 if event and entry.get("data_from") == "result" else 0
        # an event without its own id takes one from the script (its time and the shared sequence)
        assign = 1 if event and entry.get("event_id") is None else 0
        out.append([_s(rec), merge, 1 if entry.get("only_if_created") else 0, assign])
    return out


def _event_context(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What an event the store produces takes from the request whose journal rides with the script
    (base.stamp_journal: request_id, trace_id and actor from its audit row); {} without one."""
    request = next((e for e in entries if e.get("journal", "audit") in ("audit", "context")), None)
    return {} if request is None else request_context(request)


def _limits(limits: list[Any]) -> list[list[str]]:
    """Rate limit buckets for the scripts; limits as decimal strings (int64 stays exact in Lua)."""
    return [[bucket, str(int(limit)), policy_id, scope] for bucket, limit, policy_id, scope in limits]


def _script_error(out: dict[str, Any]) -> Exception:
    code = out["err"]
    if code == "STALE_GOVERNANCE":
        return StaleGovernance()  # type: ignore[return-value]
    if code == "RATE_LIMITED":
        bucket, limit, policy_id, scope, prev, cur, now = out["rate"]
        limit, prev, cur, now = int(limit), int(prev), int(cur), int(now)
        return Pol.rate_error(bucket, limit, policy_id, scope, Pol.retry_after_ms(prev, cur, limit, now))  # type: ignore[return-value]
    if code == "VERSION_CONFLICT":
        return VersionConflict(out["msg"])
    details = out.get("details")
    return ProtocolError(ErrorCode(code), out.get("msg") or code,
                         details=details if isinstance(details, dict) and details else None,
                         status=out.get("status"))


class RedisStore(RedisAdmin, RedisEvidence, RedisQuotas, Store):
    cluster = False  # RedisClusterStore (redis_cluster.py) keeps every script in one tenant's slot

    def __init__(self, url: str, *, retention_ms: int = IDEMPOTENCY_RETENTION_MS, connect_timeout_s: float = 1.0,
                 socket_timeout_s: float = 2.0, clock: Callable[[], int] | None = None,
                 max_connections: int = 100) -> None:
        self.url = url
        self.retention_ms = retention_ms
        # Production time is Redis TIME inside the scripts; tests that drive time pass their own clock.
        self._test_clock = clock
        self.r = self._connect(url, connect_timeout_s, socket_timeout_s, max_connections)
        self.channel = (ScriptChannel(url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s)
                        if not self.cluster and supports(url) else None)
        common = "".join(resources.files("cycles.store").joinpath(f"lua/{part}").read_text() for part in _PRELUDE)
        self.scripts = {
            name: self.r.register_script(_script_source(
                common, resources.files("cycles.store").joinpath(f"lua/{name}.lua").read_text(), cluster=self.cluster))
            for name in _SCRIPTS
        }
        self._keys_indexed = False
        self._counted = False

    def _connect(self, url: str, connect_timeout_s: float, socket_timeout_s: float, max_connections: int) -> Any:
        # A blocking pool: a burst of concurrent requests beyond max_connections waits (up to the socket
        # timeout) for a free connection instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
            retry_on_timeout=False, retry=Retry(NoBackoff(), 0), health_check_interval=0,
            max_connections=max_connections, timeout=socket_timeout_s)
        return aioredis.Redis.from_pool(pool)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        except rex.BusyLoadingError as exc:
            raise StoreUnavailable(f"Redis is loading: {exc}") from exc

    async def _script(self, name: str, tenant: str, args: list[Any], *, journal: bool = True,
                      entries: list[dict[str, Any]] | None = None, route: str | None = None) -> Any:
        """Run one script. `tenant` "" runs a global (admin plane) script. With `journal`, the request's
        pending journal entries (after `entries`) are written by the script when it succeeds, and the
        pending list is emptied then; an error answer wrote nothing and leaves it."""
        if not self._counted:
            await self._count_existing()
        p = prefix(tenant) if tenant else ""
        pending = pending_journal() if journal else []
        jarg = _journal_arg(entries or [], pending)
        # KEYS[1] names the slot the script runs in (Redis Cluster routes by it); route: a global script's key
        keys = [route] if route else [p + "tenant"] if tenant else []
        clock = self._test_clock() if self._test_clock else 0
        script, argv = self.scripts[name], [p, tenant, self.retention_ms, clock, *args, jarg]
        raw = await self._eval(script, keys, argv)
        out = raw if isinstance(raw, int) else _decode(raw)
        if isinstance(out, dict) and "err" in out:
            raise _script_error(out)
        if pending:
            pending.clear()
        return out

    async def _eval(self, script: Any, keys: list[str], argv: list[Any]) -> Any:
        if self.channel is not None:
            return await self._call(lambda: self.channel.evalsha(script.sha, script.script, keys, argv))
        return await self._call(lambda: script(keys=keys, args=argv))

    @staticmethod
    def _outcome(out: dict[str, Any]) -> Outcome:
        result = out["result"]
        if isinstance(result, str):
            result = _decode(result)
        return Outcome(_normalize(result), replay=bool(out["replay"]), now_ms=int(out["now"]),
                       reservation_active=bool(out["active"]))

    # ---- lifecycle ----

    async def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        try:
            await self.r.aclose()
        except RuntimeError as exc:
            # connections opened on an event loop that has since ended (callers that run each call
            # with asyncio.run) cannot be closed from this one; the ended loop already dropped them
            if "closed" not in str(exc):
                raise

    async def health(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (rex.RedisError, OSError):
            return False

    async def now_ms(self) -> int:
        if self._test_clock is not None:
            return self._test_clock()
        sec, usec = await self._call(self.r.time)
        return int(sec) * 1000 + int(usec) // 1000

    # ---- settings, tenants, keys ----

    async def get_setting(self, name: str) -> str | None:
        return await self._call(lambda: self.r.get(f"cy:setting:{name}"))

    async def put_setting(self, name: str, value: str, *, only_if_absent: bool) -> str:
        out = await self._script("setting", "", [name, value, "1" if only_if_absent else "0"])
        return out["value"]

    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        tenant = record["tenant_id"]
        out = await self._script("tenant", tenant, ["create", _s(record)])
        return _decode(out["record"]), bool(out["created"])

    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.get(prefix(tenant_id) + "tenant"))
        return _decode(raw) if raw else None

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        out = await self._script("tenant", tenant_id, ["update", _s(changes), now_iso])
        return _decode(out["record"])

    async def create_api_key(self, record: dict[str, Any]) -> None:
        await self._script("apikey", "", ["create", record["key_id"], record["key_prefix"], record["tenant_id"],
                                          _s(record)])

    async def governance_gen(self, tenant: str) -> int:
        return int(await self._call(lambda: self.r.get(prefix(tenant) + "gen")) or 0)

    async def find_api_key(self, key_prefix: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.get(f"cy:apikey:{key_prefix}"))
        return _decode(raw) if raw else None

    # ---- budgets ----

    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]:
        tenant = record["tenant_id"]
        ledger_id = "ldg_" + secrets.token_hex(12)
        out = await self._script("budget", tenant, [
            record["scope"], record["unit"], ledger_id, str(record["allocated"]), str(record.get("overdraft_limit", 0)),
            _opt(record.get("commit_overage_policy")), _s(record.get("extra") or {})])
        return _budget_row(tenant, _flat(out["row"]))

    async def _budget_rows(self, tenant: str, members: list[str]) -> list[dict[str, Any]]:
        p = prefix(tenant)

        async def fetch() -> list[dict[str, str]]:
            pipe = self.r.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(p + "b:" + member)
            return await pipe.execute()

        return [_budget_row(tenant, h) for h in await self._call(fetch) if h]

    async def _members(self, tenant: str, start: str | None) -> list[str]:
        lo = "(" + start if start else "-"
        return await self._call(lambda: self.r.zrangebylex(prefix(tenant) + "budgets", lo, "+"))

    async def list_budgets(self, tenant: str | None, filters: dict[str, Any], limit: int,
                           after: tuple[str, str, str] | None) -> Page:
        tenants = [tenant] if tenant is not None else sorted(await self._call(lambda: self.r.smembers(TENANTS)))
        items: list[dict[str, Any]] = []
        for t in tenants:
            if after is not None and t < after[0]:
                continue
            start = f"{after[1]}|{after[2]}" if after is not None and t == after[0] else None
            for row in await self._budget_rows(t, await self._members(t, start)):
                if not _budget_matches(row, filters):
                    continue
                if len(items) == limit:
                    return Page(items, True)
                items.append(row)
        return Page(items, False)

    async def fund(self, cmd: FundCommand) -> Outcome:
        out = await self._script("fund", cmd.tenant, [
            cmd.idempotency_key or "", cmd.payload_hash, cmd.scope, cmd.unit, cmd.operation, str(cmd.amount),
            _opt(cmd.spent)])
        return self._outcome(out)

    # ---- runtime ----

    async def reserve(self, cmd: ReserveCommand) -> Outcome:
        rid = f"rsv_{cmd.tenant}.{secrets.token_hex(12)}"
        out = await self._script("reserve", cmd.tenant, [
            cmd.endpoint, cmd.idempotency_key, cmd.payload_hash, cmd.unit, str(cmd.amount), cmd.scope_path,
            _s(cmd.scopes), "1" if cmd.dry_run else "0", _opt(cmd.ttl_ms), _opt(cmd.grace_ms),
            _opt(cmd.overage_policy), _s(cmd.subject), _s(cmd.action),
            _s(cmd.metadata) if cmd.metadata is not None else "", rid,
            "ALLOW_WITH_CAPS" if cmd.caps else "ALLOW", "null" if cmd.caps is None else _s(cmd.caps),
            _s(cmd.policy or {}), _s(_limits(cmd.limits)), _s(_limits(cmd.commit_limits)) if cmd.commit_limits else "",
            _opt(cmd.gen), _s(cmd.actions) if cmd.actions else "", cmd.observe_mode or ""])
        return self._outcome(out)

    async def _settle(self, endpoint: str, cmd: SettleCommand, extra: list[str]) -> Outcome:
        owner = tenant_of_reservation(cmd.reservation_id)
        if owner is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"Reservation {cmd.reservation_id} not found")
        # the caller's cache generation is checked on its own tenant only (another owner answers 403 anyway)
        gen = _opt(cmd.gen) if owner == cmd.tenant else ""
        out = await self._script("settle", owner, [endpoint, cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash,
                                                   cmd.tenant or "", *extra, gen])
        return self._outcome(out)

    async def commit(self, cmd: SettleCommand) -> Outcome:
        meta = _s(cmd.metadata) if cmd.metadata is not None else ""
        return await self._settle("commit", cmd, [str(cmd.actual or 0), cmd.unit or "", meta])

    async def release(self, cmd: SettleCommand) -> Outcome:
        return await self._settle("release", cmd, ["", "", ""])

    async def extend(self, cmd: SettleCommand) -> Outcome:
        return await self._settle("extend", cmd, [str(cmd.extend_by_ms or 0), "", ""])

    async def create_event(self, cmd: EventCommand) -> Outcome:
        eid = "evt_" + secrets.token_hex(12)
        extra = _s({"metadata": cmd.metadata, "metrics": cmd.metrics, "client_time_ms": cmd.client_time_ms})
        out = await self._script("event", cmd.tenant, [
            cmd.idempotency_key, cmd.payload_hash, cmd.unit, str(cmd.amount), cmd.scope_path, _s(cmd.scopes),
            _opt(cmd.overage_policy), eid, _s(cmd.subject), _s(cmd.action), extra, _opt(cmd.gen)])
        return self._outcome(out)

    # ---- reads ----

    async def action_counters(self, tenant: str) -> list[dict[str, Any]]:
        out = await self._script("quota_admin", tenant, ["list", ""], journal=False)
        return sorted(out["counters"], key=lambda c: c["counter"])

    async def reset_action_counter(self, tenant: str, key: str) -> dict[str, Any]:
        out = await self._script("quota_admin", tenant, ["reset", key])
        return out["result"] if isinstance(out["result"], dict) else _decode(out["result"])

    async def get_reservation(self, reservation_id: str) -> dict[str, Any] | None:
        tenant = tenant_of_reservation(reservation_id)
        if tenant is None:
            return None
        h = await self._call(lambda: self.r.hgetall(prefix(tenant) + "r:" + reservation_id))
        return _reservation(h) if h else None

    async def list_reservations(self, q: ReservationQuery) -> Page:
        p = prefix(q.tenant)
        ids = await self._call(lambda: self.r.zrange(p + "rz:created", 0, -1))
        if len(ids) > MAX_LIST_CANDIDATES:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, "Too many reservations to list; narrow the filters",
                                status=400)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]

            async def fetch(batch: list[str] = batch) -> list[dict[str, str]]:
                pipe = self.r.pipeline(transaction=False)
                for rid in batch:
                    pipe.hgetall(p + "r:" + rid)
                return await pipe.execute()

            rows += [_reservation(h) for h in await self._call(fetch) if h]
        rows = [r for r in rows if _reservation_matches(r, q)]
        col = {"tenant": "tenant_id", "reserved": "amount"}.get(q.sort_by, q.sort_by)
        reverse = q.sort_dir == "desc"
        rows.sort(key=lambda r: (r[col], r["reservation_id"]), reverse=reverse)
        if q.after is not None:
            after = (q.after[0], q.after[1])
            rows = [r for r in rows if ((r[col], r["reservation_id"]) < after if reverse
                                        else (r[col], r["reservation_id"]) > after)]
        return Page(rows[:q.limit], len(rows) > q.limit)

    async def scan_spend(self, tenant: str, from_ms: int, to_ms: int, limit: int) -> Page:
        # Reservations: the creation index read newest first from to_ms (a reservation is finalized after it
        # is created) by a read-only script, SPEND_PAGE entries a call, filtered inside Redis, at most `limit`
        # entries, so a tenant with any number of reservations is answered in bounded time. Events: their
        # own per-tenant time index (event.lua).
        p = prefix(tenant)
        items: list[dict[str, Any]] = []
        scanned, top, skip, more = 0, str(to_ms), 0, False
        while True:
            batch = min(SPEND_PAGE, limit - scanned)
            if batch <= 0:
                more = bool(await self._call(lambda: self.r.zcount(p + "rz:created", "-inf", top)) > skip)
                break
            out = await self._script("spend", tenant, [top, skip, batch, from_ms, to_ms], journal=False)
            for scope_path, subject, action, unit, committed, finalized in out["rows"] or ():
                items.append({"source": "reservation", "scope_path": scope_path, "subject": _decode(subject),
                              "action": _decode(action), "unit": unit, "amount": int(committed),
                              "at_ms": int(finalized)})
            scanned += out["n"]
            if out["n"] < batch:
                break
            # page on the score; the entries of that same millisecond already read are skipped
            skip = out["at_low"] + (skip if float(out["low"]) == float(top) else 0)
            top = out["low"]
        ids = await self._call(lambda: self.r.zrevrangebyscore(p + "ez:created", to_ms, from_ms, start=0,
                                                               num=limit + 1))
        more = more or len(ids) > limit
        fields = ("scope_path", "subject", "action", "unit", "charged", "created_at_ms")
        for h in await self._fields([p + "e:" + eid for eid in ids[:limit]], fields):
            if h.get("created_at_ms"):
                items.append(_spend("event", h, "charged", "created_at_ms"))
        return Page(items, more)

    async def _fields(self, keys: list[str], fields: tuple[str, ...]) -> list[dict[str, str]]:
        """The named fields of each hash (only what is needed: a reservation hash holds much more)."""
        async def fetch() -> list[list[str | None]]:
            pipe = self.r.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, fields)
            return await pipe.execute()

        rows = await self._call(fetch) if keys else []
        return [{f: v for f, v in zip(fields, row) if v is not None} for row in rows]

    async def balances(self, tenant: str, wanted: dict[str, str], include_children: bool, limit: int,
                       after: tuple[str, str] | None) -> Page:
        members = await self._members(tenant, f"{after[0]}|{after[1]}" if after else None)
        items: list[dict[str, Any]] = []
        for start in range(0, len(members), 500):
            chosen = [m for m in members[start:start + 500] if matches_filter(m.rsplit("|", 1)[0], wanted, include_children)]
            for row in await self._budget_rows(tenant, chosen):
                if len(items) == limit:
                    return Page(items, True)
                items.append({"ledger": row["ledger"]})
        return Page(items, False)

    # ---- maintenance ----

    async def expire_due(self, limit: int = 500) -> int:
        total = 0
        for tenant in await self._call(lambda: self.r.smembers(TENANTS)):
            total += int(await self._script("expire", tenant, [limit]))
        return total

    async def count_active(self) -> int:
        total = 0
        for tenant in await self._call(lambda: self.r.smembers(TENANTS)):
            total += await self._call(lambda t=tenant: self.r.zcard(prefix(t) + "rz:deadline"))
        return total

    async def purge_idempotency(self, older_than_ms: int) -> int:
        return 0  # idempotency keys carry their own TTL (PEXPIRE retention_ms)



_RESULT_INTS = ("amount", "expires_at_ms", "charged", "released", "actual", "timestamp_ms")


def _normalize(result: dict[str, Any]) -> dict[str, Any]:
    """Scripts send int64 values as decimal strings (cjson keeps 14 digits); give callers the same
    result records as every other store: ints, and lists where Lua's empty table became an object."""
    for key in _RESULT_INTS:
        if isinstance(result.get(key), str):
            result[key] = int(result[key])
    for key in ("previous", "new"):
        if key in result:
            result[key] = [int(v) for v in result[key]]
    if "balances" in result:
        rows = result["balances"] if isinstance(result["balances"], list) else []
        result["balances"] = [[r[0], r[1], *(int(v) for v in r[2:7]), bool(r[7])] for r in rows]
    for key in ("affected_scopes",):
        if isinstance(result.get(key), dict):
            result[key] = []
    return result


def _spend(source: str, h: dict[str, str], amount: str, at: str) -> dict[str, Any]:
    return {"source": source, "scope_path": h.get("scope_path", ""), "subject": _decode(h.get("subject") or "{}"),
            "action": _decode(h.get("action") or "{}"), "unit": h.get("unit", ""), "amount": int(h.get(amount) or 0),
            "at_ms": int(h.get(at) or 0)}


def _reservation(h: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = dict(h)
    for f in _INT_FIELDS:
        if rec.get(f) not in (None, ""):
            rec[f] = int(rec[f])
        else:
            rec[f] = None
    for f in ("metadata", "committed_metadata", "idempotency_key"):
        rec.setdefault(f, None)
    rec.pop("commit_limits", None)  # the store's own bookkeeping, as on every store
    return rec


def _reservation_matches(r: dict[str, Any], q: ReservationQuery) -> bool:
    if q.status and r["status"] != q.status:
        return False
    if q.idempotency_key and r.get("idempotency_key") != q.idempotency_key:
        return False
    if q.subject:
        subject = _decode(r["subject"])
        for level, value in q.subject.items():
            if str(subject.get(level, "")).lower() != value.lower():
                return False
    for col, (lo, hi) in q.windows.items():
        v = r.get(col)
        if v is None:
            return False
        if lo is not None and v < lo:
            return False
        if hi is not None and v > hi:
            return False
    return True


def _budget_matches(row: dict[str, Any], f: dict[str, Any]) -> bool:
    led = row["ledger"]
    prefix = (f.get("scope_prefix") or "").rstrip("/")
    if prefix and not (led.scope == prefix or led.scope.startswith(prefix + "/")):
        return False
    if f.get("unit") and led.unit != f["unit"]:
        return False
    if f.get("status") and led.status != f["status"]:
        return False
    if f.get("over_limit") is not None and led.is_over_limit != f["over_limit"]:
        return False
    if f.get("has_debt") is not None and (led.debt > 0) != f["has_debt"]:
        return False
    return True
