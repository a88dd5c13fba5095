"""Action quota reads of the Redis store beyond one tenant's script (lua/quota_admin.lua): the overview's
quota health. Every tenant's counters at 80 % or more of their limit are indexed by the reserve script in the
tenant's own sorted set `cy:{tenant}:aqh` (scored by window end), so this reads that index and those counters
only, never every counter."""

from __future__ import annotations

from typing import Any

from .redis_keys import TENANTS, prefix as _prefix


class RedisQuotas:
    """Mixed into RedisStore, whose `r`, `_call` and `now_ms` it uses."""

    r: Any
    _call: Any
    now_ms: Any

    async def hot_action_counters(self) -> list[dict[str, Any]]:
        now = await self.now_ms()
        tenants = sorted(await self._call(lambda: self.r.smembers(TENANTS)))
        if not tenants:
            return []

        async def hot_keys() -> list[list[str]]:
            pipe = self.r.pipeline(transaction=False)
            for t in tenants:
                pipe.zrangebyscore(_prefix(t) + "aqh", f"({now}", "+inf")
            return await pipe.execute()

        found = [(t, key) for t, keys in zip(tenants, await self._call(hot_keys)) for key in sorted(keys)]
        if not found:
            return []

        async def states() -> list[list[str | None]]:
            pipe = self.r.pipeline(transaction=False)
            for t, key in found:
                pipe.hmget(_prefix(t) + "aq:" + key, "used", "exp", "lim")
            return await pipe.execute()

        out = []
        for (t, key), (used, exp, lim) in zip(found, await self._call(states)):
            # reset or released since it was indexed: only counters that are still hot and live count
            if used is not None and int(exp) > now and int(used) * 5 >= int(lim) * 4:
                out.append({"tenant_id": t, "counter": key, "used": int(used), "limit": int(lim)})
        return out
