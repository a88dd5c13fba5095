"""Lease heartbeat scheduling: the PRIMARY ALGORITHM of the protocol's HEARTBEAT GUIDANCE
(extendReservation), driven by `remaining_ttl_ms`. I/O-free; sync.py and aio.py run the extends.

* After every schema-valid create/extend: lead_floor = max(0, remaining_ttl_ms - rtt);
  attempt_budget = max(request timeout budget, 1 s, 2 x max rtt); safety = max(1 s, 2 x max rtt);
  next_delay = max(0, lead_floor - (2 x attempt_budget + safety)). A lease long enough for the call
  therefore sees no extend at all. Two consecutive zero delays stop the heartbeat (lease shorter than
  the retry-safety budget); each new beat uses a new idempotency key.
* After a failed extend: estimate = max(0, lead_floor - elapsed since that success);
  window = estimate - attempt_budget - safety. window < 0 -> stop. Transport/5xx/ambiguous 2xx ->
  retry with the SAME key after min(30 s, estimate / 4, window). 429 -> retry after Retry-After only
  if it fits in the window, else stop. Any other 4xx (404, 409 FINALIZED, 410, ...) -> stop.
* Without `remaining_ttl_ms` (older servers) the lead is estimated from `expires_at_ms` and the local
  clock, which is weaker (documented in docs/sdk.md).

Policy (`warn`): every failure is logged at WARNING with the reservation id and disposition and
recorded in the context's `heartbeat_events`; it never cancels the guarded work nor its commit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from . import errors as e

STOP_CODES = frozenset({"RESERVATION_EXPIRED", "RESERVATION_FINALIZED", "MAX_EXTENSIONS_EXCEEDED", "TENANT_CLOSED",
                        "NOT_FOUND"})


@dataclass
class Decision:
    delay_s: float | None  # None: stop
    same_key: bool = False
    reason: str = ""


class LeaseSchedule:
    def __init__(self, request_budget_s: float) -> None:
        self.request_budget_ms = int(math.ceil(request_budget_s * 1000))
        self.max_rtt_ms = 0
        self.lead_floor_ms = 0
        self.success_at = 0.0
        self.zero_delays = 0
        self.zero_window_retry_used = False
        self.last_elapsed_ms: int | None = None

    def _budget(self) -> tuple[int, int]:
        attempt_budget = max(self.request_budget_ms, 1000, 2 * self.max_rtt_ms)
        safety = max(1000, 2 * self.max_rtt_ms)
        return attempt_budget, safety

    def on_success(self, remaining_ttl_ms: int | None, expires_at_ms: int | None, rtt_ms: float,
                   received_at: float | None = None) -> Decision:
        rtt = int(math.ceil(rtt_ms))
        self.max_rtt_ms = max(self.max_rtt_ms, rtt)
        if remaining_ttl_ms is None:
            remaining_ttl_ms = max(0, (expires_at_ms or 0) - int(time.time() * 1000))  # fallback: local clock
        self.lead_floor_ms = max(0, remaining_ttl_ms - rtt)
        self.success_at = received_at if received_at is not None else time.monotonic()
        self.zero_window_retry_used = False
        self.last_elapsed_ms = None
        attempt_budget, safety = self._budget()
        delay = max(0, self.lead_floor_ms - (2 * attempt_budget + safety))
        if delay == 0:
            self.zero_delays += 1
            if self.zero_delays >= 2:
                return Decision(None, reason="lease shorter than the retry-safety budget")
        else:
            self.zero_delays = 0
        return Decision(delay / 1000)

    def on_failure(self, err: e.CyclesError, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        elapsed = int((now - self.success_at) * 1000)
        if self.last_elapsed_ms is not None and elapsed <= self.last_elapsed_ms:
            return Decision(None, reason="no time elapsed between failures")
        self.last_elapsed_ms = elapsed
        estimate = max(0, self.lead_floor_ms - elapsed)
        attempt_budget, safety = self._budget()
        window = estimate - attempt_budget - safety
        if isinstance(err, e.CyclesProtocolError) and not isinstance(err, (e.CyclesTransportError,
                                                                            e.InvalidResponseError)):
            if err.status == 429:
                ra = err.retry_after_ms
                if ra is None or window < 0 or ra > window:
                    return Decision(None, reason="rate limited beyond the safe retry window")
                return Decision(ra / 1000, same_key=True, reason="rate limited")
            if err.status < 500:
                return Decision(None, reason=f"terminal {err.error_code or err.status}")
        if window < 0:
            return Decision(None, reason="no complete retry fits in the remaining lease")
        if window == 0:
            if self.zero_window_retry_used:
                return Decision(None, reason="retry window exhausted")
            self.zero_window_retry_used = True
        delay = min(30_000, estimate // 4, window)
        return Decision(max(0, delay) / 1000, same_key=True, reason="transient")
