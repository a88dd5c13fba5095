"""CyclesEvidence envelopes as stored: by content id, with links (an operation's idempotency key, a
reservation's artifacts) that point at the envelope emitted for them."""

from __future__ import annotations

import sqlite3

from .core import _Core


class _Evidence(_Core):
    async def put_evidence(self, evidence_id: str, body: bytes, links: list[str]) -> str:
        def tx(conn: sqlite3.Connection, now: int) -> str:
            row = conn.execute("SELECT evidence_id FROM evidence_links WHERE link=?", (links[0],)).fetchone() \
                if links else None
            if row is not None:
                return row[0]  # a concurrent request for the same operation emitted first: its envelope stands
            conn.execute("INSERT OR IGNORE INTO evidence (evidence_id, body, created_at_ms) VALUES (?, ?, ?)",
                         (evidence_id, body.decode("utf-8"), now))
            conn.executemany("INSERT OR IGNORE INTO evidence_links (link, evidence_id) VALUES (?, ?)",
                             [(link, evidence_id) for link in links])
            return evidence_id

        return await self._awrite(tx, [])  # not the request's journal: that rides with its own change

    async def get_evidence(self, evidence_id: str) -> bytes | None:
        rows = self._read("SELECT body FROM evidence WHERE evidence_id=?", (evidence_id,))
        return rows[0][0].encode("utf-8") if rows else None

    async def evidence_links(self, links: list[str]) -> list[str | None]:
        if not links:
            return []
        rows = dict(self._read(f"SELECT link, evidence_id FROM evidence_links WHERE link IN "
                               f"({','.join('?' * len(links))})", links))
        return [rows.get(link) for link in links]
