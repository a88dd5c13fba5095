"""Whether an error body carries trace_id.

The spec (CORRELATION AND TRACING) puts trace_id in every error body. The published Python SDK,
runcycles 0.5.3, validates error bodies with extra="forbid": given a trace_id it cannot parse the body
at all, loses the error code and, on its commit path, journals and retries RESERVATION_FINALIZED or
IDEMPOTENCY_MISMATCH instead of stopping. That SDK sends `User-Agent: python-httpx/<version>` (it sets
no agent of its own) and never sends trace context. By default (`configured` None) the body leaves
trace_id out for exactly that signature and keeps it for every other client; the X-Cycles-Trace-Id
response header carries it in every case. `--error-trace-id` / `--no-error-trace-id` force it.
"""

from __future__ import annotations

from typing import Any

SDK_AGENT_PREFIX = "python-httpx/"


def trace_in_error_body(headers: Any, configured: bool | None) -> bool:
    """`headers`: the request's headers (a case-insensitive mapping, or a dict with lowercase keys);
    `configured`: the operator's choice, None for the default. Costs one header lookup by default."""
    if configured is not None:
        return configured
    agent = headers.get("user-agent")
    if not agent or not agent.startswith(SDK_AGENT_PREFIX):
        return True
    # a caller that sends trace context reads trace ids: it gets the spec's body
    return headers.get("traceparent") is not None or headers.get("x-cycles-trace-id") is not None


def parse_setting(raw: str | None) -> bool | None:
    """CYCLES_ERROR_TRACE_ID: 1/true/yes/on always, 0/false/no/off never, auto or unset the default."""
    value = (raw or "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value == "auto":
        return None
    raise ValueError(f"CYCLES_ERROR_TRACE_ID must be 1, 0 or auto, not {raw!r}")
