"""Redis Cluster: the cross-tenant views, maintained from per-tenant outboxes (docs/redis.md).

Every script appends what it recorded (audit rows, events, overview counter deltas) to its tenant's outbox
`cy:{T}:outbox` in the same script as the change (lua/outbox.lua). The drain moves a tenant's entries, in
sequence order, into the views in the `{agg}` slot with lua/outbox_apply.lua, which applies only entries past
the tenant's cursor and advances it in the same script; then it trims the outbox up to the applied sequence.
Every step is idempotent, so a drain that dies anywhere is simply run again (resumable, at-least-once, each
entry counted once), and any number of drainers may run at once.

Who drains: every `cycles serve` runs a round every CYCLES_AGGREGATE_INTERVAL_MS when it holds the lease
`cy:{agg}:lease` (one server at a time; any server takes over when the holder stops renewing it), and
publishes the lag in `cy:{agg}:lag`, which every server reports in /metrics and /actuator/health. Besides,
before a cross-tenant read a server drains the tenants it wrote itself (read-your-writes through one
server), and the webhook dispatcher's leader runs a full round before it reads events.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from .redis import prefix

if TYPE_CHECKING:
    from .redis_cluster import RedisClusterStore

AGG = "cy:{agg}:"
CURSOR, LEASE, LAG, STATS = AGG + "cursor", AGG + "lease", AGG + "lag", AGG + "stats"
BATCH = 500  # outbox entries per apply script
ROUND_BATCHES = 20  # batches of one tenant per round, so a flood from one tenant does not starve the rest


def outbox_key(tenant: str) -> str:
    return f"cy:{{{tenant}}}:outbox"


def _entry_ms(member: str) -> int:
    parts = member.split("\n", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _foreign_rows(tenant: str, members: list[str]) -> list[tuple[str, str, str, str, str]]:
    """The rows of other tenants than the outbox's (kind, owner, id, ts, text): the drain writes them into
    their owner's slot as well, where the tenant-filtered reads find them."""
    out = []
    for member in members:
        for line in member.split("\n")[2:]:
            if line[:1] in ("a", "e"):
                kind, owner, ident, ts, text = line.split("\t", 4)
                if owner != tenant:
                    out.append((kind, owner, ident, ts, text))
    return out


class Outbox:
    def __init__(self, store: RedisClusterStore) -> None:
        self.store = store
        self.dirty: set[str] = set()  # tenants this process wrote since it last drained them
        self.owner = secrets.token_hex(8)  # this process, as the lease holder
        self._script: Any = None
        self._lock = asyncio.Lock()  # one background round at a time in this process
        self._catching = asyncio.Lock()  # a read waits for a catch-up already draining its writes

    @property
    def script(self) -> Any:
        if self._script is None:
            text = resources.files("cycles.store").joinpath("lua/outbox_apply.lua").read_text()
            self._script = self.store.r.register_script(text)
        return self._script

    async def _run(self, *argv: Any) -> Any:
        return await self.store._eval(self.script, [CURSOR], list(argv))

    # ---- draining ----

    async def apply(self, tenant: str, members: list[str]) -> tuple[int, int]:
        """Apply a batch of a tenant's outbox entries (in sequence order) to the views: (the batch's highest
        sequence, entries applied now)."""
        last, applied = await self._run("apply", tenant, *members)
        return int(last), int(applied)

    async def drain_tenant(self, tenant: str, max_batches: int = ROUND_BATCHES) -> tuple[int, bool]:
        """Move a tenant's outbox into the views: (entries applied, whether entries are left)."""
        key, total = outbox_key(tenant), 0
        for _ in range(max_batches):
            members = await self.store._call(lambda: self.store.r.zrangebyscore(key, "-inf", "+inf", start=0,
                                                                                 num=BATCH))
            if not members:
                return total, False
            foreign = _foreign_rows(tenant, members)
            if foreign:
                # idempotent (the same id, record and score every time), so a crash before the apply just
                # writes them again on the next drain
                await self.store._pipe([c for kind, owner, ident, ts, text in foreign for c in (
                    ("hset", (prefix(owner) + ("audit:rec" if kind == "a" else "events:rec"),
                              ident, text)),
                    ("zadd", (prefix(owner) + ("audit" if kind == "a" else "events"),
                              {ident: int(ts)})))])
            last, applied = await self.apply(tenant, members)
            total += applied
            await self.store._call(lambda: self.store.r.zremrangebyscore(key, "-inf", last))
            if len(members) < BATCH:
                return total, False
        return total, True

    async def catch_up(self) -> int:
        """Read-your-writes: drain the tenants this process wrote since it last drained them."""
        if not self.dirty and not self._catching.locked():
            return 0
        async with self._catching:
            tenants, self.dirty = self.dirty, set()
            total = 0
            try:
                for tenant in sorted(tenants):
                    applied, _ = await self.drain_tenant(tenant, max_batches=1_000_000)
                    total += applied
            except BaseException:
                self.dirty |= tenants  # drained again next time (applying twice counts once)
                raise
            return total

    async def drain_all(self) -> dict[str, int]:
        """One round over every tenant with a waiting entry; returns what it saw and did."""
        homes = await self.store._journal_homes()
        heads = await self.store._pipe([("zrange", (outbox_key(h), 0, 0)) for h in homes])
        waiting = [(h, head[0]) for h, head in zip(homes, heads) if head]  # in their own slots: see _peek
        now = int(time.time() * 1000)
        oldest = min((_entry_ms(m) for _, m in waiting), default=0)
        applied, left = 0, 0
        for tenant, _ in waiting:
            n, more = await self.drain_tenant(tenant)
            applied += n
            left += more
        return {"at_ms": now, "lag_ms": now - oldest if oldest else 0, "waiting": len(waiting),
                "left": left, "applied": applied, "tenants": len(homes)}

    async def round(self, interval_ms: int) -> dict[str, int] | None:
        """The background step: with the lease, one full round and its lag published; None without it."""
        lease_ms = max(3 * interval_ms, 5000)
        if not int(await self._run("lease", self.owner, lease_ms)):
            return None
        async with self._lock:
            stats = await self.drain_all()
        await self.store._pipe([("hset", (LAG, None, None, {
            "at_ms": stats["at_ms"], "lag_ms": stats["lag_ms"], "waiting": stats["waiting"],
            "left": stats["left"], "interval_ms": interval_ms, "owner": self.owner}))])
        return stats

    async def release(self) -> None:
        """Give the lease up (a graceful stop), so another server takes over at once."""
        if await self.store._call(lambda: self.store.r.get(LEASE)) == self.owner:
            await self.store._call(lambda: self.store.r.delete(LEASE))

    async def purge(self, log: str, older_than_ms: int, batch: int) -> int:
        total = 0
        while True:
            n = int(await self._run("purge", log, str(int(older_than_ms)), batch))
            total += n
            if n < batch:
                return total

    # ---- what /metrics and /actuator/health report ----

    async def _peek(self) -> tuple[int, int]:
        """(tenants whose outbox holds entries, the oldest entry's time in ms or 0): one read per tenant."""
        homes = await self.store._journal_homes()
        heads = [head[0] for head in await self.store._pipe([("zrange", (outbox_key(h), 0, 0)) for h in homes]) if head]
        return len(heads), min((_entry_ms(m) for m in heads), default=0)

    async def status(self, bound_s: float = 30.0) -> dict[str, Any]:
        """The lag of the views in seconds: the age of the oldest unapplied entry when the last drain round
        began. When no round was published lately (no server drains: CYCLES_AGGREGATE_INTERVAL_MS=0 everywhere,
        or the lease holder is stuck), the outboxes are read here instead (one read per tenant), so the
        figure keeps growing and tenants_waiting stays true."""
        lag, applied = await self.store._pipe([("hgetall", (LAG,)), ("hget", (STATS, "applied"))])
        now = int(time.time() * 1000)
        drained = bool(lag) and now - int(lag.get("at_ms", 0)) <= max(3 * int(lag.get("interval_ms", 1000)), 5000)
        if drained:
            lag_ms, waiting = int(lag.get("lag_ms", 0)), int(lag.get("waiting", 0))
        else:
            waiting, oldest = await self._peek()
            lag_ms = now - oldest if oldest else 0
        lag_s = round(max(lag_ms, 0) / 1000, 3)
        return {"lag_seconds": lag_s, "tenants_waiting": waiting, "entries_applied": int(applied or 0),
                "bound_seconds": bound_s, "over_bound": lag_s > bound_s, "draining": drained}
