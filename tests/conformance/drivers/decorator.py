"""The @cycles decorator against our server. Modes: happy, no_actual, raise, keyboard_interrupt,
dry_allow, dry_deny, reject_overage (actual above the estimate under REJECT),
expire (reservation expires while the guarded function runs), finalized (the reservation is released by
another caller while the guarded function runs, so the decorator's commit meets RESERVATION_FINALIZED)."""

from __future__ import annotations

import time
from typing import Any

from _common import config, emit, exc_info, flush_sync_engines, journal_files, params, wait_journal_empty

from runcycles import CyclesClient, CyclesMetrics, DryRunResult, ReleaseRequest, cycles, get_cycles_context

p = params()
mode = p["mode"]
client = CyclesClient(config(p))
state: dict[str, Any] = {"executions": 0, "reservation_id": None, "ctx_expires_at_ms": None, "decision": None,
                         "caps": None, "shell_allowed": None, "release_status": None}
common = dict(action_kind="llm.completion", action_name="conformance-model", client=client)


def _body(sleep_s: float = 0.0) -> str:
    state["executions"] += 1
    ctx = get_cycles_context()
    if ctx is not None:
        state["reservation_id"] = ctx.reservation_id
        state["ctx_expires_at_ms"] = ctx.expires_at_ms
        state["decision"] = str(getattr(ctx.decision, "value", ctx.decision))
        if ctx.has_caps():
            state["caps"] = ctx.caps.model_dump(mode="json", exclude_none=True)
            state["shell_allowed"] = ctx.caps.is_tool_allowed("shell")
        ctx.metrics = CyclesMetrics(tokens_input=11, tokens_output=22, model_version="conformance-1")
    if sleep_s:
        time.sleep(sleep_s)
    return "done"


estimate = p.get("estimate", 1000)
result: Any = None
error: BaseException | None = None

if mode in ("happy", "caps"):
    fn = cycles(estimate=estimate, actual=lambda r: p.get("actual", 700), **common)(lambda: _body())
elif mode == "no_actual":
    fn = cycles(estimate=estimate, **common)(lambda: _body())
elif mode in ("raise", "keyboard_interrupt"):
    def _failing() -> None:
        _body()
        raise (ValueError("boom") if mode == "raise" else KeyboardInterrupt())
    fn = cycles(estimate=estimate, actual=lambda r: 1, **common)(_failing)
elif mode in ("dry_allow", "dry_deny"):
    fn = cycles(estimate=estimate, dry_run=True, **common)(lambda: _body())
elif mode == "reject_overage":
    fn = cycles(estimate=estimate, actual=lambda r: p["actual"], overage_policy="REJECT", **common)(lambda: _body())
elif mode == "expire":
    fn = cycles(estimate=estimate, actual=lambda r: p["actual"], ttl_ms=1000, grace_period_ms=0,
                **common)(lambda: _body(p["sleep_s"]))
elif mode == "finalized":
    def _released_meanwhile() -> str:
        done = _body()
        rid = state["reservation_id"]
        released = client.release_reservation(rid, ReleaseRequest(idempotency_key=f"rel-{rid}", reason="elsewhere"))
        state["release_status"] = released.status
        return done
    fn = cycles(estimate=estimate, actual=lambda r: p.get("actual", 700), **common)(_released_meanwhile)
else:
    raise SystemExit(f"unknown mode {mode}")

try:
    result = fn()
except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt is part of the scenario
    error = exc

out: dict[str, Any] = {
    "mode": mode,
    "executions": state["executions"],
    "reservation_id": state["reservation_id"],
    "ctx_expires_at_ms": state["ctx_expires_at_ms"],
    "decision": state["decision"],
    "caps": state["caps"],
    "shell_allowed": state["shell_allowed"],
    "release_status": state["release_status"],
    "result_type": type(result).__name__,
    "result": result.model_dump(mode="json", exclude_none=True) if isinstance(result, DryRunResult) else result,
    "error": exc_info(error),
}
if mode == "expire":
    # The event fallback runs on a background retry thread: wait for it, then for the journal to drain.
    flush_sync_engines(p.get("flush_s", 15.0))
    out["journal_files"] = wait_journal_empty(p, 2.0)
else:
    flush_sync_engines(2.0)
    out["journal_files"] = journal_files(p)
client.close()
emit(out)
