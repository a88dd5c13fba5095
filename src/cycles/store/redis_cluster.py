"""The Redis store on Redis Cluster: `redis-cluster://HOST:PORT[,HOST:PORT...]/` (seed nodes).

A script on Redis Cluster may touch one hash slot only. Every runtime script already runs on one tenant's
keys (`cy:{<tenant>}:...`, one slot); what the single-primary store keeps in global keys inside the same
script (the audit and event logs, counters, the API key and document records, budget periods) the scripts
keep in the tenant's own slot here (common.lua, CLUSTER). The cross-tenant audit and event logs and the
overview counters are a view in the `{agg}` slot, maintained from per-tenant outboxes by a background
drain (redis_outbox.py: eventually consistent, read-your-writes through one server); the other cross-tenant
admin reads read across the tenants (strongly consistent, O(tenants) commands). Neither is ever read by
reserve or commit.

What needs a second slot is an ordered multi-step write, each step idempotent and safe to retry:
* a tenant is added to the registry (`cy:tenants`) before its record is written (a registry entry without a
  record is skipped by every reader);
* an API key's lookup pointers (`cy:kp:<prefix>`, `cy:ki:<key id>` -> tenant, never changed) are set before
  its record, which lives in the tenant's slot; a document's pointer (`cy:dp:<kind>:<id>` -> owner) likewise;
* a journal row of another tenant than the script's (an operator's audit row, tenant `__admin__`) rides in
  the script's outbox entry, so it is kept with the change; the drain writes it into its owner's slot.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot

from ..protocol.errors import ErrorCode, ProtocolError, StoreUnavailable
from .base import AuditScan, pending_journal
from .redis_outbox import AGG, Outbox
from .redis_wire import ScriptChannel
from .redis import RedisStore
from .redis_keys import PURGE_BATCH, TENANTS, _decode, _encode, prefix

JOURNALS = "cy:journals"  # tenants (and __admin__ / __unauth__) that have journal rows, beside cy:tenants
DOC_OWNERS = "cy:docowners"  # owners of documents


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    parsed = urlparse(url)
    if parsed.scheme != "redis-cluster":
        raise ValueError(f"not a redis-cluster:// URL: {url!r}")
    nodes = []
    for part in parsed.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"store URL {url!r}: seed nodes are HOST:PORT[,HOST:PORT...]")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _key_error(key_id: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, f"API key {key_id} not found")


class RedisClusterStore(RedisStore):
    cluster = True
    _evidence_prefix = "cy:{evidence}:"

    def _connect(self, url: str, connect_timeout_s: float, socket_timeout_s: float, max_connections: int) -> Any:
        parsed = urlparse(url)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        # ?sync_replicas=N: a write is answered only once N replicas of its shard have it (WAIT), so a
        # failover loses no acknowledged write (docs/redis.md "Failover")
        self._sync_replicas = int(query.get("sync_replicas", "0"))
        self._sync_timeout_ms = int(query.get("sync_timeout_ms", "1000"))
        # the cluster client fails a call beyond max_connections to a node at once instead of waiting for a
        # connection (as the single-primary store's blocking pool does): calls beyond it wait here
        self._slots = asyncio.Semaphore(max_connections)
        self._homes: set[str] = set()  # tenants this process added to cy:journals
        self.outbox = Outbox(self)  # the cross-tenant views ({agg}) and their drain
        self._channels: dict[str, ScriptChannel] = {}  # per primary (host:port): the scripts' fast path
        self._stale_map, self._map_lock = False, asyncio.Lock()
        self._user, self._password = parsed.username, parsed.password
        self._timeouts = (connect_timeout_s, socket_timeout_s)
        # MOVED / ASK are followed and the slot map refreshed; a connection error (a primary that died) is
        # retried against the refreshed map, which names the promoted replica once the cluster failed over
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)], decode_responses=True,
            socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
            max_connections=max_connections, username=parsed.username or None, password=parsed.password or None,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3))  # scripts: see _eval

    async def _eval(self, script: Any, keys: list[str], argv: list[Any]) -> Any:
        """EVALSHA on a pipelined channel to the primary of the key's slot (redis_wire: the single-primary
        store's fast path, one per primary), by the client's slot map. A redirect (the slot moved: MOVED,
        ASK) means the script did not run: it runs through redis-py, which follows the redirect and
        refreshes the map. A connection error fails the call (503; the client's retry with its
        idempotency key replays or runs it) and refreshes the map first on the next call, so calls go to
        the promoted replica once the cluster has failed over."""
        channel = await self._channel(key_slot(keys[0].encode()))
        try:
            return await self._call(lambda: channel.evalsha(script.sha, script.script, keys, argv))
        except StoreUnavailable:
            self._stale_map = True
            raise
        except rex.ResponseError as exc:
            if not str(exc).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                raise
            self._stale_map = True
        return await self._call(lambda: script(keys=keys, args=argv))

    async def _channel(self, slot: int) -> ScriptChannel:
        manager = self.r.nodes_manager
        if self._stale_map or not manager.slots_cache:
            async with self._map_lock:
                if not manager.slots_cache:
                    # the client's own start (its command parser too: a keyed command after a first
                    # script would otherwise find the map loaded and the parser not)
                    await self._call(self.r.initialize)
                elif self._stale_map:
                    await self._call(manager.initialize)
                self._stale_map = False
        node = manager.get_node_from_slot(slot)
        channel = self._channels.get(node.name)
        if channel is None:
            auth = f"{quote(self._user or '')}:{quote(self._password)}@" if self._password else ""
            channel = self._channels[node.name] = ScriptChannel(
                f"redis://{auth}{node.host}:{node.port}/0", connect_timeout_s=self._timeouts[0],
                socket_timeout_s=self._timeouts[1])
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        await super().close()

    async def _call(self, op: Any) -> Any:
        try:
            async with self._slots:
                return await super()._call(op)
        except (rex.ClusterDownError, rex.TryAgainError, rex.MasterDownError, rex.ClusterError) as exc:
            raise StoreUnavailable(f"Redis Cluster unavailable: {exc}") from exc

    async def _count_existing(self) -> None:
        self._counted = True  # counters are kept per tenant from the first write on

    async def _index_keys(self) -> None:
        self._keys_indexed = True

    async def _mget(self, keys: list[str]) -> list[str | None]:
        out: list[str | None] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            out += await self._call(lambda c=chunk: self.r.mget_nonatomic(c))
        return out

    async def _pipe(self, commands: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        if not commands:
            return []

        async def run() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for name, args in commands:
                getattr(pipe, name)(*args)
            return await pipe.execute()

        return await self._call(run)

    # ---- scripts: one slot each; rows of other tenants ride in the script's outbox ----

    async def _script(self, name: str, tenant: str, args: list[Any], *, journal: bool = True,
                      entries: list[dict[str, Any]] | None = None, route: str | None = None) -> Any:
        pending = pending_journal() if journal else []
        rows = (entries or []) + pending
        owners = {str(e.get("tenant_id")) for e in rows if e.get("journal") != "context"}
        if tenant:
            # the cross-tenant scans, the purge and the drain walk cy:tenants and cy:journals: a home of rows
            # outside the first (__admin__, the analyzers' __system__, an operator's documents) joins the
            # second before its first row
            new = owners - self._homes
            if new:
                await self._call(lambda: self.r.sadd(JOURNALS, *new))
                self._homes |= new
            # rows of another tenant (an operator's __admin__ audit row) ride in this script's outbox
            # (outbox.lua): written with the change or not at all; the drain puts them in their owner's slot
            out = await super()._script(name, tenant, args, journal=False, entries=rows, route=route)
            self.outbox.dirty.add(tenant)
            if self._sync_replicas:
                await self._replicated(route or prefix(tenant) + "tenant")
            if pending:
                pending.clear()
            return out
        # a script outside any tenant's slot (a setting; a bare journal append): its rows follow, each
        # owner's in a script on the owner's slot, stamped from the first script's answer
        if name == "audit" and args[:1] == ["append"]:
            out: Any = {}
        else:
            if route is None:
                route = {"setting": lambda: "cy:setting:" + str(args[0])}[name]()
            out = await super()._script(name, tenant, args, journal=False, entries=[], route=route)
            if self._sync_replicas:
                await self._replicated(route)
        if pending:
            pending.clear()
        request = next((e for e in rows if e.get("journal", "audit") in ("audit", "context")), None)
        groups: dict[str, list[dict[str, Any]]] = {}
        for e in rows:
            if e.get("journal") != "context":
                groups.setdefault(str(e.get("tenant_id")), []).append(e)
        for group in groups.values():
            if request is not None and not any(request is e for e in group):
                group.insert(0, {**request, "journal": "context"})  # the request ids its events take
        if groups:
            answer = out if isinstance(out, dict) else {}
            new = set(groups) - self._homes
            if new:
                await self._call(lambda: self.r.sadd(JOURNALS, *new))
                self._homes |= new
            for owner, group in groups.items():
                await super()._script("audit", owner, ["append", _encode(answer).decode()], journal=False,
                                      entries=group)
                self.outbox.dirty.add(owner)
                if self._sync_replicas:
                    await self._replicated(prefix(owner) + "tenant")
        return out

    async def _replicated(self, key: str) -> None:
        """Wait until the shard's replicas have what this process wrote to `key`'s slot. WAIT counts the
        writes of its own connection, so a marker write goes first on the same connection: replication is
        in order, so a replica that has the marker has the script's writes before it."""
        marker = key[:key.index("}") + 1] + ":sync" if "{" in key else "{" + key + "}:sync"  # key's slot

        async def run() -> int:
            node = self.r.get_node_from_key(marker)
            cmds = [PipelineCommand(0, "INCR", marker),
                    PipelineCommand(1, "WAIT", self._sync_replicas, self._sync_timeout_ms)]
            await node.execute_pipeline(cmds)
            for cmd in cmds:
                if isinstance(cmd.result, Exception):
                    raise cmd.result
            return int(cmds[1].result)

        acked = await self._call(run)
        if acked < self._sync_replicas:
            # the write is on the primary but not yet on enough replicas: a retry with the same
            # idempotency key replays it (and waits again)
            raise StoreUnavailable(f"only {acked} of {self._sync_replicas} replicas acknowledged the write")

    # ---- registries written before the records they name ----

    async def create_tenant(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        await self._call(lambda: self.r.sadd(TENANTS, record["tenant_id"]))
        return await super().create_tenant(record)

    async def _key_tenant(self, key_id: str) -> str | None:
        return await self._call(lambda: self.r.get("cy:ki:" + key_id))

    async def create_api_key(self, record: dict[str, Any]) -> None:
        tenant, key_id, key_prefix = record["tenant_id"], record["key_id"], record["key_prefix"]
        for pointer in ("cy:kp:" + key_prefix, "cy:ki:" + key_id):
            await self._call(lambda k=pointer: self.r.set(k, tenant, nx=True))
            if await self._call(lambda k=pointer: self.r.get(k)) != tenant:
                raise ProtocolError(ErrorCode.INTERNAL_ERROR, "API key prefix collision; retry the request")
        await self._script("apikey", tenant, ["create", key_id, key_prefix, tenant, _encode(record).decode()])

    async def find_api_key(self, key_prefix: str) -> dict[str, Any] | None:
        tenant = await self._call(lambda: self.r.get("cy:kp:" + key_prefix))
        if not tenant:
            return None
        raw = await self._call(lambda: self.r.get(prefix(tenant) + "apikey:" + key_prefix))
        return _decode(raw) if raw else None

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        tenant = await self._key_tenant(key_id)
        if not tenant:
            return None
        key_prefix = await self._call(lambda: self.r.hget(prefix(tenant) + "apikeys:id", key_id))
        if not key_prefix:
            return None
        raw = await self._call(lambda: self.r.get(prefix(tenant) + "apikey:" + key_prefix))
        return _decode(raw) if raw else None

    async def list_api_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        tenants = [tenant] if tenant is not None else sorted(await self._call(lambda: self.r.smembers(TENANTS)))
        indexes = await self._pipe([("zrange", (prefix(t) + "apikeys", 0, -1, False, True)) for t in tenants])
        rows: list[tuple[float, str, str]] = []
        for t, index in zip(tenants, indexes):
            rows += [(score, key_id, t) for key_id, score in index]
        rows.sort()  # creation time, ties by key id (the single-primary index's order)
        prefixes = await self._pipe([("hget", (prefix(t) + "apikeys:id", key_id)) for _, key_id, t in rows])
        raws = await self._mget([prefix(t) + "apikey:" + kp for (_, _, t), kp in zip(rows, prefixes) if kp])
        return [_decode(raw) for raw in raws if raw]

    async def update_api_key(self, key_id: str, changes: dict[str, Any], *,
                             guard_tenant: bool = True) -> dict[str, Any]:
        tenant = await self._key_tenant(key_id)
        if not tenant:
            raise _key_error(key_id)
        out = await self._script("apikey", tenant, ["update", key_id, _encode(changes).decode(),
                                                    "1" if guard_tenant else "0"])
        return _decode(out["record"])

    async def touch_api_keys(self, last_used: dict[str, int]) -> None:
        by_tenant: dict[str, list[Any]] = {}
        for key_id, at_ms in last_used.items():
            tenant = await self._key_tenant(key_id)
            if tenant:
                by_tenant.setdefault(tenant, []).extend([key_id, str(int(at_ms))])
        for tenant, pairs in by_tenant.items():
            await self._script("apikey", tenant, ["touch", *pairs])

    # ---- documents: records in the owner's slot, found by id through a pointer ----

    def _doc_key(self, owner: str, kind: str, doc_id: str) -> str:
        return prefix(owner) + f"doc:{kind}:{doc_id}"

    async def get_doc(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        owner = await self._call(lambda: self.r.get(f"cy:dp:{kind}:{doc_id}"))
        if not owner:
            return None
        raw = await self._call(lambda: self.r.hget(self._doc_key(owner, kind, doc_id), "r"))
        return _decode(raw) if raw else None

    async def _doc_owners(self, tenant: str | None) -> list[str]:
        if tenant is not None:
            return [tenant]
        return sorted(await self._call(lambda: self.r.smembers(DOC_OWNERS)))

    async def list_docs(self, kind: str, tenant: str | None) -> list[dict[str, Any]]:
        owners = await self._doc_owners(tenant)
        indexes = await self._pipe([("zrange", (prefix(o) + f"docs:{kind}", 0, -1)) for o in owners])
        ids = sorted((doc_id, o) for o, index in zip(owners, indexes) for doc_id in index)
        raws = await self._pipe([("hget", (self._doc_key(o, kind, doc_id), "r")) for doc_id, o in ids])
        return [_decode(raw) for raw in raws if raw]

    async def save_doc(self, kind: str, tenant: str, doc_id: str, record: dict[str, Any] | None,
                       expect_version: int | None, *, guard_tenant: bool = True) -> dict[str, Any] | None:
        pointer = f"cy:dp:{kind}:{doc_id}"
        owner = await self._call(lambda: self.r.get(pointer))
        if owner and owner != tenant:
            exists = await self._call(lambda: self.r.exists(self._doc_key(owner, kind, doc_id)))
            if exists:
                if expect_version is None:
                    raise ProtocolError(ErrorCode.DUPLICATE_RESOURCE, f"{kind} {doc_id} already exists")
                raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                    f"{kind} {doc_id} belongs to another owner; it cannot move on Redis Cluster")
        if owner != tenant:
            if expect_version is not None:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"{kind} {doc_id} not found")
            await self._call(lambda: self.r.sadd(DOC_OWNERS, tenant))
            await self._call(lambda: self.r.set(pointer, tenant))
        return await super().save_doc(kind, tenant, doc_id, record, expect_version, guard_tenant=guard_tenant)

    async def due_docs(self, kind: str, now_ms: int, limit: int = 100) -> list[dict[str, Any]]:
        owners = await self._doc_owners(None)
        queues = await self._pipe([("zrangebyscore", (prefix(o) + f"docs:{kind}:due", "-inf", now_ms, 0, limit, True))
                                   for o in owners])
        due = sorted((score, doc_id, o) for o, queue in zip(owners, queues) for doc_id, score in queue)[:limit]
        raws = await self._pipe([("hget", (self._doc_key(o, kind, doc_id), "r")) for _, doc_id, o in due])
        return [_decode(raw) for raw in raws if raw]

    # ---- cross-tenant views: the aggregated ones ({agg}, redis_outbox) and those read across tenants ----

    async def _tenants(self) -> list[str]:
        return sorted(await self._call(lambda: self.r.smembers(TENANTS)))

    async def _period_indexes(self) -> list[str]:
        return [prefix(t) + "periods" for t in await self._tenants()]

    async def counters(self) -> dict[str, int]:
        await self.outbox.catch_up()  # this server's own writes show at once
        return {name: int(v) for name, v in (await self._call(lambda: self.r.hgetall(AGG + "counters"))).items()}

    async def catch_up_views(self) -> None:
        await self.outbox.drain_all()

    async def top_budgets(self, kind: str, limit: int = 10) -> list[dict[str, Any]]:
        suffix = "over_limit" if kind == "over_limit" else "with_debt"
        tenants = await self._tenants()
        rows: list[dict[str, Any]] = []
        for t, members in zip(tenants, await self._pipe([("smembers", (prefix(t) + suffix,)) for t in tenants])):
            budgets = sorted(m.partition(" ")[2] for m in members)
            for row in await self._budget_rows(t, budgets) if budgets else []:
                led = row["ledger"]
                if (led.is_over_limit if kind == "over_limit" else led.debt > 0):
                    rows.append(row)
        rows.sort(key=lambda r: (-r["ledger"].debt, r["tenant_id"], r["ledger"].scope))
        return rows[:limit]

    async def _journal_homes(self) -> list[str]:
        homes = set(await self._call(lambda: self.r.smembers(TENANTS)))
        homes |= set(await self._call(lambda: self.r.smembers(JOURNALS)))
        return sorted(homes)

    async def _scan(self, records: str, index: str, suffix: str, scan: AuditScan) -> list[dict[str, Any]]:
        # read-your-writes: this server's writes are in the view (and an operator's rows that rode in a
        # tenant's outbox are in their owner's slot) before it reads
        await self.outbox.catch_up()
        if scan.tenant is None:  # the view, as the single-primary store reads its global log
            return await super()._scan(AGG + suffix + ":rec", AGG + suffix, suffix, scan)
        key = prefix(scan.tenant) + suffix
        ids = [member for member, _ in await self._scan_ids(key, scan)]
        raws = await self._call(lambda: self.r.hmget(key + ":rec", ids)) if ids else []
        return [_decode(raw) for raw in raws if raw]  # a row purged meanwhile is gone

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.r.hget(AGG + "events:rec", event_id))
        if raw:
            return _decode(raw)
        # not in the view yet (or written before it existed): every tenant's own log
        homes = await self._journal_homes()
        for raw in await self._pipe([("hget", (prefix(h) + "events:rec", event_id)) for h in homes]):
            if raw:
                return _decode(raw)
        return None

    async def _purge(self, log: str, older_than_ms: int) -> int:
        # rows still waiting in outboxes (an operator's rows reach their owner's log only through the drain)
        # are placed first, so the purge finds every old row where it looks
        await self.outbox.drain_all()
        total = 0
        for home in await self._journal_homes():
            while True:
                out = await self._script("audit", home, ["purge", str(int(older_than_ms)), PURGE_BATCH, log],
                                         journal=False)
                total += int(out["purged"])
                if int(out["purged"]) < PURGE_BATCH:
                    break
        await self.outbox.purge(log, older_than_ms, PURGE_BATCH)  # the view (its rows are counted above)
        await self.append_journal([])  # the request's own rows
        return total

    async def health(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (rex.RedisError, OSError):
            return False

