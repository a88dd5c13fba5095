"""The runaway-agent replica: a guarded call in a loop until the budget says no.
Modes: loop (sequential), threads (N threads), async (asyncio.gather of N calls on AsyncCyclesClient)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from _common import config, emit, exc_info, flush_sync_engines, journal_files, params

from runcycles import AsyncCyclesClient, BudgetExceededError, CyclesClient, cycles

p = params()
mode = p["mode"]
estimate = p["estimate"]
cap = p.get("max_calls", 1000)  # a safety stop so a broken server cannot make the driver spin forever
lock = threading.Lock()
executions = 0
successes = 0
first_denial: BaseException | None = None
other_errors: list[dict[str, Any]] = []
denials = 0


def note_denial(exc: BaseException) -> None:
    global denials, first_denial
    with lock:
        denials += 1
        if first_denial is None:
            first_denial = exc


if mode in ("loop", "threads"):
    client = CyclesClient(config(p))

    @cycles(estimate=estimate, actual=lambda r: estimate, action_kind="llm.completion", action_name="runaway",
            client=client)
    def call_llm() -> str:
        global executions
        with lock:
            executions += 1
        return "tokens"

    def worker() -> None:
        global successes, executions
        for _ in range(cap):
            try:
                call_llm()
            except BudgetExceededError as exc:
                note_denial(exc)
                return
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    other_errors.append(exc_info(exc))
                return
            with lock:
                successes += 1

    if mode == "loop":
        worker()
    else:
        threads = [threading.Thread(target=worker, name=f"agent-{i}") for i in range(p["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    flush_sync_engines(2.0)
    client.close()
elif mode == "async":
    async def main() -> None:
        global successes, executions
        async with AsyncCyclesClient(config(p)) as aclient:
            @cycles(estimate=estimate, actual=lambda r: estimate, action_kind="llm.completion",
                    action_name="runaway", client=aclient)
            async def call_llm() -> str:
                global executions
                executions += 1
                await asyncio.sleep(0.005)
                return "tokens"

            results = await asyncio.gather(*(call_llm() for _ in range(p["calls"])), return_exceptions=True)
            for r in results:
                if isinstance(r, BudgetExceededError):
                    note_denial(r)
                elif isinstance(r, BaseException):
                    other_errors.append(exc_info(r))
                else:
                    successes += 1

    asyncio.run(main())
else:
    raise SystemExit(f"unknown mode {mode}")

emit({
    "mode": mode,
    "successes": successes,
    "executions": executions,
    "denials": denials,
    "first_denial": exc_info(first_denial),
    "other_errors": other_errors[:5],
    "other_error_count": len(other_errors),
    "journal_files": journal_files(p),
})
