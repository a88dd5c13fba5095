"""The Redis store: the same atomic semantics on a store that many server machines share.

Every mutating operation is one Lua script call (EVALSHA; redis-py reloads a script on NOSCRIPT) that
does the idempotency check, the tenant guard, the scope lookups, the checks and all writes. Time comes
from Redis (`TIME` inside the script), so servers with skewed clocks agree on expiry.

Key layout (docs/redis.md): every key of a tenant carries the hash tag `{<tenant>}`, so each script
touches one slot and the layout runs on Redis Cluster as on a single Redis. Reservation ids embed
the owning tenant (`rsv_<tenant>.<random>`) so a request naming only the id finds its slot.
"""

from __future__ import annotations

import re
import secrets
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..core.ledger import Ledger
from ..core.scopes import matches_filter
from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable
from .base import (
    EventCommand,
    FundCommand,
    Outcome,
    Page,
    ReservationQuery,
    ReserveCommand,
    SettleCommand,
    Store,
)

T = TypeVar("T")
IDEMPOTENCY_RETENTION_MS = 7 * 24 * 3600 * 1000
TENANTS = "cy:tenants"
_TENANT = re.compile(r"^[a-z0-9-]{1,64}$")
_SCRIPTS = ("reserve", "settle", "event", "fund", "expire", "budget", "tenant")
_INT_FIELDS = ("amount", "created_at_ms", "expires_at_ms", "grace_ms", "deadline_ms", "committed", "finalized_at_ms",
               "extensions", "max_extensions")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
MAX_LIST_CANDIDATES = 50_000


def prefix(tenant: str) -> str:
    return f"cy:{{{tenant}}}:"


def tenant_of_reservation(rid: str) -> str | None:
    if not rid.startswith("rsv_") or "." not in rid:
        return None
    tenant = rid[4:rid.rindex(".")]
    return tenant if _TENANT.match(tenant) else None


def _s(obj: Any) -> str:
    return _encode(obj).decode()


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


class RedisStore(Store):
    def __init__(self, url: str, *, retention_ms: int = IDEMPOTENCY_RETENTION_MS, connect_timeout_s: float = 1.0,
                 socket_timeout_s: float = 2.0, clock: Callable[[], int] | None = None) -> None:
        self.url = url
        self.retention_ms = retention_ms
        # Production time is Redis TIME inside the scripts; tests that drive time pass their own clock.
        self._test_clock = clock
        self.r = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=connect_timeout_s,
                                   socket_timeout=socket_timeout_s, retry_on_timeout=False,
                                   retry=Retry(NoBackoff(), 0), health_check_interval=0)
        common = resources.files("cycles.store").joinpath("lua/common.lua").read_text()
        self.scripts = {
            name: self.r.register_script(common + "\n" + resources.files("cycles.store").joinpath(f"lua/{name}.lua").read_text())
            for name in _SCRIPTS
        }

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        except rex.BusyLoadingError as exc:
            raise StoreUnavailable(f"Redis is loading: {exc}") from exc

    async def _script(self, name: str, tenant: str, args: list[Any]) -> Any:
        p = prefix(tenant)
        raw = await self._call(lambda: self.scripts[name](keys=[p + "tenant"], args=[p, tenant, self.retention_ms, self._test_clock() if self._test_clock else 0, *args]))
        out = _decode(raw)
        if isinstance(out, dict) and "err" in out:
            details = out.get("details")
            raise ProtocolError(ErrorCode(out["err"]), out.get("msg") or out["err"],
                                details=details if isinstance(details, dict) and details else None)
        return out

    @staticmethod
    def _outcome(out: dict[str, Any]) -> Outcome:
        result = out["result"]
        if isinstance(result, str):
            result = _decode(result)
        return Outcome(_normalize(result), replay=bool(out["replay"]), now_ms=int(out["now"]),
                       reservation_active=bool(out["active"]))

    # ---- lifecycle ----

    async def close(self) -> None:
        await self.r.aclose()

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
        key = f"cy:setting:{name}"
        if not only_if_absent:
            await self._call(lambda: self.r.set(key, value))
            return value
        await self._call(lambda: self.r.set(key, value, nx=True))
        return await self._call(lambda: self.r.get(key))

    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        tenant = record["tenant_id"]
        await self._call(lambda: self.r.sadd(TENANTS, tenant))
        out = await self._script("tenant", tenant, ["create", _s(record)])
        return _decode(out["record"]), bool(out["created"])

    async def get_tenant(self, tenant_id: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.get(prefix(tenant_id) + "tenant"))
        return _decode(raw) if raw else None

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any], now_iso: str) -> dict[str, Any]:
        out = await self._script("tenant", tenant_id, ["update", _s(changes), now_iso])
        return _decode(out["record"])

    async def create_api_key(self, record: dict[str, Any]) -> None:
        created = await self._call(lambda: self.r.set(f"cy:apikey:{record['key_prefix']}", _s(record), nx=True))
        if not created:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, "API key prefix collision; retry the request")

    async def find_api_key(self, key_prefix: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.get(f"cy:apikey:{key_prefix}"))
        return _decode(raw) if raw else None

    # ---- budgets ----

    async def create_budget(self, record: dict[str, Any]) -> dict[str, Any]:
        tenant = record["tenant_id"]
        ledger_id = "ldg_" + secrets.token_hex(12)
        await self._script("budget", tenant, [
            record["scope"], record["unit"], ledger_id, str(record["allocated"]), str(record.get("overdraft_limit", 0)),
            _opt(record.get("commit_overage_policy")), _s(record.get("extra") or {})])
        rows = await self._budget_rows(tenant, [f"{record['scope']}|{record['unit']}"])
        return rows[0]

    async def _budget_rows(self, tenant: str, members: list[str]) -> list[dict[str, Any]]:
        p = prefix(tenant)

        async def fetch() -> list[dict[str, str]]:
            pipe = self.r.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(p + "b:" + member)
            return await pipe.execute()

        out = []
        for h in await self._call(fetch):
            if not h:
                continue
            out.append({
                "tenant_id": tenant, "ledger_id": h["ledger_id"], "created_at_ms": int(h["created_at_ms"]),
                "updated_at_ms": int(h["updated_at_ms"]), "extra": _decode(h.get("extra") or "{}"),
                "commit_overage_policy": h.get("commit_overage_policy") or None,
                "ledger": Ledger(h["scope"], h["unit"], int(h["allocated"]), int(h["spent"]), int(h["reserved"]),
                                 int(h["debt"]), int(h["overdraft_limit"]), h["is_over_limit"] == "1",
                                 h["status"]),
            })
        return out

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
            _s(cmd.metadata) if cmd.metadata is not None else "", rid])
        return self._outcome(out)

    async def _settle(self, endpoint: str, cmd: SettleCommand, extra: list[str]) -> Outcome:
        owner = tenant_of_reservation(cmd.reservation_id)
        if owner is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"Reservation {cmd.reservation_id} not found")
        out = await self._script("settle", owner, [endpoint, cmd.reservation_id, cmd.idempotency_key, cmd.payload_hash,
                                                   cmd.tenant or "", *extra])
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
            _opt(cmd.overage_policy), eid, _s(cmd.subject), _s(cmd.action), extra])
        return self._outcome(out)

    # ---- reads ----

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


def _reservation(h: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = dict(h)
    for f in _INT_FIELDS:
        if rec.get(f) not in (None, ""):
            rec[f] = int(rec[f])
        else:
            rec[f] = None
    for f in ("metadata", "committed_metadata", "idempotency_key"):
        rec.setdefault(f, None)
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
    if f.get("scope_prefix") and not led.scope.startswith(f["scope_prefix"]):
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
