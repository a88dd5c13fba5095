"""CyclesEvidence on the Redis store: envelopes at `cy:ev:<evidence_id>` and links at `cy:evl:<link>`
(global keys: an envelope is fetched by its content id alone), written by one script (lua/evidence.lua).
Neither expires: evidence is kept for audit as long as the store is."""

from __future__ import annotations

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
