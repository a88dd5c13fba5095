"""Counting failures per source address and per key prefix, in fixed one-minute windows, in memory.

Used to throttle failed key checks (each costs a slow scrypt verification) and to bound how many
failed-authentication audit rows and events a flood of bad keys can write. Per process: with N server
processes an attacker gets N times the allowance, which is still a constant.

The unauthenticated routes (the evidence envelopes and key set, the action-kind registry) use PublicLimit:
counted in the store when it can share counts (Redis: one allowance for every server of the store), else
per process.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

WINDOW_S = 60.0
_MAX_TRACKED = 100_000
RECORD_PER_SOURCE = 10  # failed authentications recorded (audit row + event) per source and minute
RECORD_TOTAL = 300  # ... and in all  # beyond this many counters the table starts over (bounded memory)


class WindowCounter:
    """How many times each key was counted in the current window."""

    def __init__(self, limit: int, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._window = -1
        self._counts: dict[str, int] = {}

    def _roll(self) -> float:
        now = self._clock()
        window = int(now // self.window_s)
        if window != self._window or len(self._counts) > _MAX_TRACKED:
            self._window, self._counts = window, {}
        return now

    def count(self, key: str) -> int:
        """Count one more for `key`; the count so far in this window."""
        self._roll()
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        return n

    def over(self, key: str) -> bool:
        self._roll()
        return self._counts.get(key, 0) >= self.limit

    def retry_after_s(self) -> int:
        now = self._roll()
        return max(1, math.ceil((self._window + 1) * self.window_s - now))


class FailureRecords:
    """Which failed authentications get an audit row and an event."""

    def __init__(self, per_source: int = RECORD_PER_SOURCE, total: int = RECORD_TOTAL,
                 on_unrecorded: Callable[[], None] = lambda: None) -> None:
        self.by_source = WindowCounter(per_source)
        self.total = WindowCounter(max(total, per_source))
        self.on_unrecorded = on_unrecorded

    def allow(self, source: str | None) -> bool:
        if self.by_source.count(source or "?") > self.by_source.limit or self.total.count("*") > self.total.limit:
            self.on_unrecorded()
            return False
        return True


class PublicLimit:
    """At most `limit` requests per source address and minute on a public route. The store's shared count
    decides (Store.count_public); this process's own count answers first when it alone is over the limit (a
    flood from one address then costs the store nothing), and alone when the store shares no counts or
    cannot be reached (the route keeps its protection through a store outage)."""

    def __init__(self, route: str, limit: int, window_s: int = int(WINDOW_S)) -> None:
        self.route = route
        self.limit = limit
        self.window_s = window_s
        self.local = WindowCounter(limit, float(window_s))

    async def retry_after(self, store: Any, source: str) -> int | None:
        """Count one request from `source`; None if it may pass, else the seconds to wait."""
        if self.local.count(source) > self.limit:
            return self.local.retry_after_s()
        try:
            shared = await store.count_public(f"{self.route}:{source}", self.window_s)
        except Exception:  # noqa: BLE001 - a store outage must not open (or close) the public routes
            logging.getLogger("cycles.server").debug("public throttle: store count failed", exc_info=True)
            return None
        if shared is not None and shared > self.limit:
            return max(1, math.ceil(self.window_s - time.time() % self.window_s))
        return None
