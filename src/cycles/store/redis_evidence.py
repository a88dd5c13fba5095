"""CyclesEvidence on the Redis store: envelopes at `cy:ev:<evidence_id>` and links at `cy:evl:<link>`
(global keys: an envelope is fetched by its content id alone), written by one script (lua/evidence.lua).
Neither expires: evidence is kept for audit as long as the store is.

The public routes' throttle counts at `cy:pub:<route>:<source>:<window>` (one key per source and minute,
written by INCR alone, so any node of a cluster may hold it; it expires after two windows)."""

from __future__ import annotations

import time
from typing import Any


class RedisEvidence:
    """Mixed into RedisStore, whose `r`, `_call` and `_script` it uses."""

    r: Any
    _call: Any
    _script: Any
    _evidence_prefix = "cy:"  # one hash tag on Redis Cluster (redis_cluster.py)

    async def put_evidence(self, evidence_id: str, body: bytes, links: list[str]) -> str:
        out = await self._script("evidence", "", [evidence_id, body.decode("utf-8"), *links], journal=False,
                                 route=self._evidence_prefix + "ev:" + evidence_id)
        return out["id"]

    async def get_evidence(self, evidence_id: str) -> bytes | None:
        raw = await self._call(lambda: self.r.get(self._evidence_prefix + "ev:" + evidence_id))
        return raw.encode("utf-8") if raw is not None else None

    async def evidence_links(self, links: list[str]) -> list[str | None]:
        if not links:
            return []
        return list(await self._call(lambda: self.r.mget([self._evidence_prefix + "evl:" + link for link in links])))

    async def count_public(self, key: str, window_s: int) -> int | None:
        name = f"cy:pub:{key}:{int(time.time()) // window_s}"

        async def hit() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, 2 * window_s)
            return await pipe.execute()

        return int((await self._call(hit))[0])
