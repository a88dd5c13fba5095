"""The Redis store's admin plane beyond one tenant's script: the audit and event logs (reads and retention),
tenants, API keys, documents (policies, webhooks) and budget records, period rollovers, the overview
counters and top budgets, and the close cascade's bookkeeping. Mixed into RedisStore (redis.py), whose
connection, script runner and budget reads it uses; on Redis Cluster, redis_cluster.py overrides what reads
across tenants."""

from __future__ import annotations

from typing import Any

from .base import AuditScan
from .redis_keys import (
    AUDIT, AUDIT_REC, EVENTS, EVENTS_REC, KEY_IDS, KEYS, KEYS_INDEXED, PERIODS, PURGE_BATCH, TENANTS, _budget_row,
    _decode, _flat, _iso_ms, _opt, _s, prefix,
)


class RedisAdmin:
    """Mixed into RedisStore, whose `r`, `_call`, `_script`, `now_ms` and `_budget_rows` it uses."""

    r: Any
    _call: Any
    _script: Any
    now_ms: Any
    _budget_rows: Any
    _counted: bool
    _keys_indexed: bool

    async def _mget(self, keys: list[str]) -> list[str | None]:
        out: list[str | None] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            out += await self._call(lambda c=chunk: self.r.mget(c))
        return out

    async def append_journal(self, entries: list[dict[str, Any]]) -> None:
        await self._script("audit", "", ["append"], entries=entries)

    async def scan_audit(self, scan: AuditScan) -> list[dict[str, Any]]:
        return await self._scan(AUDIT_REC, AUDIT, "audit", scan)

    async def scan_events(self, scan: AuditScan) -> list[dict[str, Any]]:
        return await self._scan(EVENTS_REC, EVENTS, "events", scan)

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.hget(EVENTS_REC, event_id))
        return _decode(raw) if raw else None

    async def purge_events(self, older_than_ms: int) -> int:
        return await self._purge("events", older_than_ms)

    async def _scan(self, records: str, index: str, suffix: str, scan: AuditScan) -> list[dict[str, Any]]:
        key = index if scan.tenant is None else prefix(scan.tenant) + suffix
        ids = [member for member, _ in await self._scan_ids(key, scan)]
        if not ids:
            return []
        raws = await self._call(lambda: self.r.hmget(records, ids))
        return [_decode(raw) for raw in raws if raw]  # a row purged meanwhile is gone

    async def _scan_ids(self, key: str, scan: AuditScan) -> list[tuple[str, int]]:
        """Up to scan.limit (member, score) of one time index, in the scan's order, past its cursor."""
        lo: float = float("-inf") if scan.from_ms is None else scan.from_ms
        hi: float = float("inf") if scan.to_ms is None else scan.to_ms
        after = scan.after
        if after is not None:
            # (timestamp_ms, log_id) order is the sorted set's (score, member) order; the cursor is exclusive
            if scan.descending:
                hi = min(hi, after[0])
            else:
                lo = max(lo, after[0])

        def past_cursor(member: str, score: int) -> bool:
            if after is None or score != after[0]:
                return True
            return member < after[1] if scan.descending else member > after[1]

        ids: list[tuple[str, int]] = []
        offset, batch = 0, max(scan.limit, 100)
        while len(ids) < scan.limit:
            if scan.descending:
                rows = await self._call(lambda o=offset: self.r.zrevrangebyscore(key, hi, lo, start=o, num=batch,
                                                                                 withscores=True))
            else:
                rows = await self._call(lambda o=offset: self.r.zrangebyscore(key, lo, hi, start=o, num=batch,
                                                                              withscores=True))
            for member, score in rows:
                if past_cursor(member, int(score)):
                    ids.append((member, int(score)))
                    if len(ids) == scan.limit:
                        break
            if len(rows) < batch:
                break
            offset += batch
        return ids

    async def purge_audit(self, older_than_ms: int) -> int:
        return await self._purge("audit", older_than_ms)

    async def _purge(self, log: str, older_than_ms: int) -> int:
        total = 0
        while True:
            out = await self._script("audit", "", ["purge", str(int(older_than_ms)), PURGE_BATCH, log])
            total += int(out["purged"])
            if int(out["purged"]) < PURGE_BATCH:
                return total

    async def list_tenants(self) -> list[dict[str, Any]]:
        ids = sorted(await self._call(lambda: self.r.smembers(TENANTS)))
        raws = await self._mget([prefix(t) + "tenant" for t in ids])
        return [_decode(raw) for raw in raws if raw]

    async def _index_keys(self) -> None:
        """Index API keys stored before the key id index existed (once per store, then marked done)."""
        if self._keys_indexed:
            return
        if not await self._call(lambda: self.r.exists(KEYS_INDEXED)):
            async def scan() -> list[str]:
                return [k async for k in self.r.scan_iter(match="cy:apikey:*", count=1000)]

            for key in await self._call(scan):
                raw = await self._call(lambda k=key: self.r.get(k))
                if not raw:
                    continue
                created = _iso_ms(_decode(raw).get("created_at"))
                await self._script("apikey", "", ["index", key[len("cy:apikey:"):], str(created)], journal=False)
            await self._call(lambda: self.r.set(KEYS_INDEXED, "1"))
        self._keys_indexed = True

    async def list_api_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        await self._index_keys()
        key = KEYS if tenant is None else prefix(tenant) + "apikeys"
        ids = await self._call(lambda: self.r.zrange(key, 0, -1))
        if not ids:
            return []
        prefixes = await self._call(lambda: self.r.hmget(KEY_IDS, ids))
        raws = await self._mget([f"cy:apikey:{kp}" for kp in prefixes if kp])
        return [_decode(raw) for raw in raws if raw]

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        await self._index_keys()
        key_prefix = await self._call(lambda: self.r.hget(KEY_IDS, key_id))
        return await self.find_api_key(key_prefix) if key_prefix else None

    async def update_api_key(self, key_id: str, changes: dict[str, Any], *, guard_tenant: bool = True) -> dict[str, Any]:
        await self._index_keys()
        out = await self._script("apikey", "", ["update", key_id, _s(changes), "1" if guard_tenant else "0"])
        return _decode(out["record"])

    async def touch_api_keys(self, last_used: dict[str, int]) -> None:
        await self._index_keys()
        args: list[Any] = ["touch"]
        for key_id, at_ms in last_used.items():
            args += [key_id, str(int(at_ms))]
        await self._script("apikey", "", args)

    async def get_doc(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.hget(f"cy:doc:{kind}:{doc_id}", "r"))
        return _decode(raw) if raw else None

    async def list_docs(self, kind: str, tenant: str | None) -> list[dict[str, Any]]:
        key = f"cy:docs:{kind}" if tenant is None else prefix(tenant) + f"docs:{kind}"
        return await self._docs(kind, await self._call(lambda: self.r.zrange(key, 0, -1)))

    async def _docs(self, kind: str, ids: list[str]) -> list[dict[str, Any]]:
        """The records of documents by id, in one pipeline (a document deleted meanwhile is skipped)."""
        async def fetch() -> list[str | None]:
            pipe = self.r.pipeline(transaction=False)
            for doc_id in ids:
                pipe.hget(f"cy:doc:{kind}:{doc_id}", "r")
            return await pipe.execute()

        return [_decode(raw) for raw in (await self._call(fetch) if ids else []) if raw]

    async def save_doc(self, kind: str, tenant: str, doc_id: str, record: dict[str, Any] | None,
                       expect_version: int | None, *, guard_tenant: bool = True) -> dict[str, Any] | None:
        out = await self._script("doc", tenant, [
            kind, doc_id, "" if record is None else _s(record), _opt(expect_version), "1" if guard_tenant else "0"])
        if record is None:
            return None
        return {**record, "version": int(out["version"])}

    async def due_docs(self, kind: str, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        ids = await self._call(lambda: self.r.zrangebyscore(f"cy:docs:{kind}:due", "-inf", now_ms, start=0, num=limit))
        return await self._docs(kind, ids)

    async def get_budget(self, tenant: str, scope: str, unit: str) -> dict[str, Any] | None:
        rows = await self._budget_rows(tenant, [f"{scope}|{unit}"])
        return rows[0] if rows else None

    async def update_budget(self, tenant: str, scope: str, unit: str, changes: dict[str, Any],
                            *, guard_tenant: bool = True) -> dict[str, Any]:
        policy = "-"
        if "commit_overage_policy" in changes:
            policy = _opt(changes["commit_overage_policy"])
        out = await self._script("budget_admin", tenant, [
            scope, unit, "1" if guard_tenant else "0", _opt(changes.get("status")),
            _s(list(changes.get("from_status") or [])), _opt(changes.get("allocated")),
            _opt(changes.get("overdraft_limit")), policy, _s(changes["extra"]) if changes.get("extra") else ""])
        return _budget_row(tenant, _flat(out["row"]))

    async def _period_indexes(self) -> list[str]:
        return [PERIODS]

    async def due_rollovers(self, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for index in await self._period_indexes():
            if len(out) < limit:
                out += await self._due_rollovers(index, now_ms, limit - len(out))
        return out

    async def _due_rollovers(self, index: str, now_ms: int, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset, batch = 0, max(limit, 100)
        while len(out) < limit:
            members = await self._call(lambda o=offset: self.r.zrangebyscore(index, "-inf", now_ms, start=o, num=batch))
            for member in members:
                tenant, rest = member.split("|", 1)
                scope, unit = rest.rsplit("|", 1)
                rec = await self.get_budget(tenant, scope, unit)
                # read after the index: another process may have rolled it meanwhile (its next period is
                # not due yet, and rolling it again would skip a period)
                end = rec["extra"].get("period_end_ms") if rec is not None else None
                if (rec is not None and rec["ledger"].status != "CLOSED" and isinstance(end, int)
                        and not isinstance(end, bool) and end <= now_ms):
                    out.append(rec)
                    if len(out) == limit:
                        break
            if len(members) < batch:
                break
            offset += batch
        return out

    async def rollover_budget(self, tenant: str, scope: str, unit: str, expected_end_ms: int,
                              period: dict[str, Any]) -> dict[str, Any] | None:
        out = await self._script("rollover", tenant, [scope, unit, str(int(expected_end_ms)), _s(period)])
        if not out["rolled"]:
            return None
        row = _budget_row(tenant, _flat(out["row"]))
        return {"before": _budget_row(tenant, _flat(out["before"]))["ledger"], "after": row["ledger"],
                "extra": row["extra"]}

    async def _count_existing(self) -> None:
        """Take the overview counts of data written before counters existed (once; scripts keep them)."""
        self._counted = True
        try:
            await self._script("counters", "", [], journal=False)
        except BaseException:
            self._counted = False
            raise

    async def counters(self) -> dict[str, int]:
        if not self._counted:
            await self._count_existing()
        return {name: int(v) for name, v in (await self._call(lambda: self.r.hgetall("cy:counters"))).items()}

    async def top_budgets(self, kind: str, limit: int = 10) -> list[dict[str, Any]]:
        """From the sets the scripts keep of over-limit and indebted budgets: no scan of all budgets."""
        if not self._counted:
            await self._count_existing()
        key = "cy:budgets:over_limit" if kind == "over_limit" else "cy:budgets:with_debt"
        by_tenant: dict[str, list[str]] = {}
        for member in await self._call(lambda: self.r.smembers(key)):
            tenant, _, budget = member.partition(" ")
            by_tenant.setdefault(tenant, []).append(budget)
        rows: list[dict[str, Any]] = []
        for tenant, members in sorted(by_tenant.items()):
            for row in await self._budget_rows(tenant, sorted(members)):
                led = row["ledger"]
                if (led.is_over_limit if kind == "over_limit" else led.debt > 0):
                    rows.append(row)
        rows.sort(key=lambda r: (-r["ledger"].debt, r["tenant_id"], r["ledger"].scope))
        return rows[:limit]

    async def cascade_close(self, tenant: str, batch: int = 200) -> bool:
        await self._index_keys()
        out = await self._script("cascade", tenant, [int(batch)])
        return bool(out["done"])

    async def pending_cascades(self) -> list[str]:
        ids = sorted(await self._call(lambda: self.r.smembers(TENANTS)))
        out = []
        for tenant, raw in zip(ids, await self._mget([prefix(t) + "tenant" for t in ids])):
            if not raw:
                continue
            record = _decode(raw)
            if record.get("status") == "CLOSED" and record.get("cascade") == "PENDING":
                out.append(tenant)
        return out
